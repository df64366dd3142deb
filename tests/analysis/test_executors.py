"""Where missing runs train (analysis/executors.py): the Ray executor gives the local executor's results
bit for bit, reports a killed worker's run by name, names a run root it cannot write, and stops its
runs on Ctrl-C; Context and the pipeline hand the executor to the notebooks."""
from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import worker_faults
from conftest import read_json

from decoflow_core.analysis import context, executors, pipeline, runs
from decoflow_core.analysis.executors import LocalExecutor, RayExecutor, RunsFailed, train_missing
from decoflow_core.train import METRICS, RunError

HERE = Path(__file__).resolve().parent
TASKS = ["checker", "gradient"]
METHODS, SEEDS = ["decoflow", "finetune"], [0, 1]
KILLED = ("finetune", 1)  # (method, seed) of the run whose worker is killed in the middle


@pytest.fixture(scope="session")
def smoke_sets(smoke_args) -> dict:
    """conftest's smoke_args as the ``sets`` of a run."""
    return dict(smoke_args[i + 1].split("=", 1) for i, arg in enumerate(smoke_args) if arg == "--set")


@pytest.fixture(scope="module")
def sweep(tiny_tree, smoke_sets):
    """{(method, seed): ensure_run keywords} of 2 methods x 2 seeds on two tasks."""
    jobs = runs.sweep_jobs(METHODS, SEEDS, data=str(tiny_tree), tasks=TASKS, profile="smoke", sets=smoke_sets)
    return {(job["method"], job["seed"]): job for job in jobs}


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray instance with 2 CPUs for the session; its workers can import worker_faults."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)  # never a cluster the environment may name
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
        yield ray
        ray.shutdown()


def wait_for(condition, what: str, limit: float = 120.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def local_runs(sweep, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return dict(zip(sweep, runs.ensure_runs(root, list(sweep.values()), workers=2)))


@pytest.fixture(scope="module")
def ray_runs(ray_instance, sweep, tmp_path_factory):
    """The sweep on Ray with the KILLED run's worker killed after its first task, then the same sweep
    again: ({(method, seed): run directory}, the first attempt's RunsFailed, the tasks the killed run
    had committed, the run directories the second attempt trained)."""
    root = tmp_path_factory.mktemp("ray")
    doomed = runs.run_dir(root, **sweep[KILLED])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "ensure_run", partial(worker_faults.killed_after_first_task, doomed.name))
        with pytest.raises(RunsFailed) as failed:
            runs.ensure_runs(root, list(sweep.values()), executor=RayExecutor())
    committed = read_json(doomed / "progress.json")["done"]
    retrained = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "train_missing", lambda jobs, *args, **kw: retrained.extend(jobs) or train_missing(
            jobs, *args, **kw))
        dirs = runs.ensure_runs(root, list(sweep.values()), executor=RayExecutor())
    return dict(zip(sweep, dirs)), failed.value, committed, retrained


def test_a_killed_worker_is_reported_by_name_and_the_rerun_trains_that_run_alone(ray_runs):
    dirs, failed, committed, retrained = ray_runs
    assert list(failed.failures) == [dirs[KILLED]]  # the other three finished
    assert "WorkerCrashedError" in failed.failures[dirs[KILLED]] and dirs[KILLED].name in str(failed)
    assert committed == 1  # killed in the middle: after its first task, before its second
    assert retrained == [dirs[KILLED]]
    assert read_json(dirs[KILLED] / "progress.json")["done"] == len(TASKS)


@pytest.mark.parametrize("key", [(m, s) for m in METHODS for s in SEEDS], ids=lambda k: f"{k[0]}-s{k[1]}")
def test_ray_runs_equal_local_runs_bit_for_bit(key, ray_runs, local_runs):
    """Every metric but the timings; every matrix byte for byte (the killed and resumed run too)."""
    ray_dir, local_dir = ray_runs[0][key], local_runs[key]
    assert ray_dir.name == local_dir.name
    ray_metrics, local_metrics = read_json(ray_dir / "metrics.json"), read_json(local_dir / "metrics.json")
    assert ray_metrics.pop("seconds") and local_metrics.pop("seconds")
    assert ray_metrics == local_metrics
    csvs = sorted(p.name for p in local_dir.glob("*.csv"))
    assert {f"matrix_{m}.csv" for m in METRICS} <= set(csvs)
    assert sorted(p.name for p in ray_dir.glob("*.csv")) == csvs
    for name in csvs:
        assert (ray_dir / name).read_bytes() == (local_dir / name).read_bytes(), name


def test_a_run_root_that_a_worker_cannot_write_is_named(ray_instance, sweep, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a run root cannot live below a file")
    root = blocker / "runs"
    with pytest.raises(RunsFailed) as failed:
        runs.ensure_runs(root, [sweep[("decoflow", 0)]], executor=RayExecutor())
    (error,) = failed.value.failures.values()
    assert f"run root {root}: cannot write there" in error and "a filesystem all nodes share" in error


def test_ctrl_c_stops_the_runs_still_running(ray_instance, sweep, tmp_path, monkeypatch):
    """Ctrl-C arrives while the driver waits for its runs (a KeyboardInterrupt out of ``ray.wait``, where
    the driver spends its time): the run still running is cancelled and its worker stopped."""
    pid_file = tmp_path / "worker.pid"
    job = dict(sweep[("decoflow", 0)], run_root=tmp_path)
    ray = executors.import_ray()
    real_wait = ray.wait

    def wait_until_started_then_interrupt(*args, **kwargs):
        if pid_file.exists():
            raise KeyboardInterrupt  # what Ctrl-C does to the waiting driver
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(ray, "wait", wait_until_started_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_missing({tmp_path / "run": job}, partial(worker_faults.sleep_forever, str(pid_file)), RayExecutor())
    assert pid_file.exists(), "the run never started"
    pid = int(pid_file.read_text())
    wait_for(lambda: not process_alive(pid), f"the worker (pid {pid}) to be stopped")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


def test_a_finished_run_that_the_driver_cannot_see_is_a_failure(sweep, tmp_path):
    job = dict(sweep[("decoflow", 0)], run_root=tmp_path)
    with pytest.raises(RunsFailed, match="not visible here: the run root must be on a filesystem"):
        train_missing({runs.run_dir(**job): job}, worker_faults.train_nothing, LocalExecutor(1))


def test_without_ray_the_ray_executor_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(RunError, match=r"pip install -e '\.\[ray\]'"):
        RayExecutor().connect()


@pytest.mark.parametrize("device, cluster_gpus, expected", [
    ("cuda", 0, {"num_gpus": 1}), ("auto", 8, {"num_gpus": 1}), ("auto", 0, {"num_cpus": 1}),
    ("cpu", 8, {"num_cpus": 1})])
def test_a_run_asks_for_one_gpu_when_its_device_resolves_to_cuda(device, cluster_gpus, expected):
    job = dict(method="decoflow", profile="smoke", sets={"device": device})
    assert executors.task_resources(job, cluster_gpus) == expected


def test_a_numbered_cuda_device_is_refused_with_ray():
    with pytest.raises(RunError, match="device=cuda:1"):
        executors.task_resources(dict(profile="smoke", sets={"device": "cuda:1"}), 8)


def test_context_reads_the_executor_from_the_environment(tiny_tree, tmp_path, monkeypatch):
    make = partial(context.Context, "test", data=str(tiny_tree), tasks=None, profile="smoke", seeds=[0],
                   quick=False, run_root=tmp_path, workers=3)
    monkeypatch.delenv("DECOFLOW_EXECUTOR", raising=False)
    local = make().executor
    assert isinstance(local, LocalExecutor) and local.workers == 3
    monkeypatch.setenv("DECOFLOW_EXECUTOR", "ray")
    monkeypatch.setenv("DECOFLOW_RAY_ADDRESS", "10.0.0.1:6379")
    assert make().executor.address == "10.0.0.1:6379"
    monkeypatch.setenv("DECOFLOW_EXECUTOR", "slurm")
    with pytest.raises(RunError, match="DECOFLOW_EXECUTOR=slurm: expected one of local, ray"):
        make()


def test_the_pipeline_hands_the_ray_cluster_to_every_notebook(tiny_tree, monkeypatch):
    monkeypatch.setenv("DECOFLOW_EXECUTOR", "local")  # restored after the test: the pipeline sets both
    monkeypatch.setenv("DECOFLOW_RAY_ADDRESS", "")
    monkeypatch.setattr(pipeline.RayExecutor, "connect", lambda self: f"joined {self.address}")
    seen = []
    monkeypatch.setattr(pipeline, "execute", lambda notebook, out, params: seen.append(
        (notebook.name, os.environ["DECOFLOW_EXECUTOR"], os.environ["DECOFLOW_RAY_ADDRESS"])))
    assert pipeline.main(["--data", str(tiny_tree), "--only", "00_", "--executor", "ray",
                          "--ray-address", "head:6379"]) == 0
    assert seen == [("00_data_and_protocol.ipynb", "ray", "joined head:6379")]
