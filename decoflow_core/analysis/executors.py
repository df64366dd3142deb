"""Where missing runs train: ``local``, processes on this machine (the default), or ``ray``, one Ray
task per run on a cluster (docs/cluster.md).

Both call the same function for a run (``runs.ensure_run``, which writes the run directory with
``train.run``), so a run computes and writes the same files wherever it trains. ``train_missing``
does the bookkeeping both share: the order of the runs, one progress line (or bar) per finished run,
and every failure collected by run, so that one failed run or one dead worker never stops the others.
With Ray, every worker writes its run into the run root itself: the run root (and the feature cache)
must be a folder that every node mounts at the same path.
"""
from __future__ import annotations

import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing, contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import make_config
from ..train import RunError

EXECUTORS = ("local", "ray")
QUIET_WORKERS = {"TQDM_DISABLE": "1"}  # a worker's progress bars would only garble the driver's terminal


class RunsFailed(RunError):
    """Some runs of a batch failed; the others finished. ``failures``: {run directory: error}."""

    def __init__(self, failures: dict):
        self.failures = failures
        super().__init__(f"{len(failures)} run(s) failed: " + "; ".join(f"{Path(d).name}: {e}" for d, e in failures.items()))


def check_writable(run_root) -> None:
    """RunError naming ``run_root`` and this machine when a run cannot be written there."""
    try:
        Path(run_root).mkdir(parents=True, exist_ok=True)
        probe = Path(run_root) / f".write-check-{platform.node()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"run root {run_root}: cannot write there from {platform.node()} ({err.strerror}); every "
                       "worker needs it as a folder it can write to, on a filesystem all nodes share") from None


def in_worker(work, job: dict) -> str:
    """Train one run in a worker process, a pool's or a Ray task's: ``work(**job)`` with one torch
    thread (on few cores, parallel runs beat threads) and no progress bars."""
    check_writable(job["run_root"])
    torch.set_num_threads(1)
    return str(work(**job, progress_bar=False))


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


@contextmanager
def environment(**variables):
    """``os.environ`` with ``variables`` set for the duration (processes started meanwhile inherit them)."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class LocalExecutor:
    """``workers`` processes on this machine, one torch thread each; with one worker or one run, the
    run trains in this process, with its own progress bars."""

    name = "local"

    def __init__(self, workers: int = 2):
        self.workers = max(1, int(workers))

    def results(self, jobs: dict, work, *, quiet: bool = False):
        """Train ``jobs`` ({run directory: keyword arguments of ``work``}); yields (run directory,
        error or None) as each finishes. ``quiet``: no progress bars of the runs themselves."""
        if self.workers == 1 or len(jobs) == 1:
            for out, job in jobs.items():
                try:
                    work(**job, progress_bar=not quiet)
                except (RunError, ValueError) as err:
                    yield out, str(err)
                else:
                    yield out, None
            return
        with environment(**QUIET_WORKERS):  # the pool's processes start during the submissions
            pool = ProcessPoolExecutor(min(self.workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
            futures = {pool.submit(in_worker, work, job): out for out, job in jobs.items()}
        try:
            for future in as_completed(futures):
                error = future.exception()
                yield futures[future], None if error is None else describe(error)
        finally:
            pool.shutdown(cancel_futures=True)  # after Ctrl-C, the runs not yet started never start


def import_ray():
    try:
        import ray
    except ImportError:
        raise RunError("the ray executor needs Ray, which is not installed: pip install -e '.[ray]'") from None
    return ray


def task_resources(job: dict, cluster_gpus: float) -> dict:
    """One GPU for a run whose device resolves to CUDA (``auto`` does on a cluster with GPUs), else one CPU."""
    device = make_config(job["profile"], {k: str(v) for k, v in (job.get("sets") or {}).items()}).device
    if device.startswith("cuda:"):
        raise RunError(f"--set device={device}: with the ray executor each run is given one GPU, which it sees "
                       "as cuda; use device=cuda or auto")
    return {"num_gpus": 1} if device == "cuda" or (device == "auto" and cluster_gpus > 0) else {"num_cpus": 1}


class RayExecutor:
    """One Ray task per run on the cluster at ``address``: ``auto`` (the cluster this machine belongs
    to), an address such as ``10.0.0.1:6379`` or ``ray://head:10001``, or None: ``RAY_ADDRESS`` when it
    is set, else a local instance started here. Tasks are never retried, so a run whose worker was
    killed is reported, not trained again behind your back."""

    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or None

    def connect(self) -> str:
        """Join (or start) the cluster once per process; returns its address, for other processes to join."""
        ray = import_ray()
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address)
                else:
                    ray.init(include_dashboard=False)
            except ConnectionError as err:
                raise RunError(f"--ray-address {self.address}: no Ray cluster to join ({err}); start one with "
                               "`ray start --head`, or leave the address out for a local instance") from None
        return ray.get_runtime_context().gcs_address

    def results(self, jobs: dict, work, *, quiet: bool = False):
        """As ``LocalExecutor.results``; the runs' own progress bars are always off."""
        self.connect()
        ray = import_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {out: task_resources(job, gpus) for out, job in jobs.items()}  # every job checked first
        train = ray.remote(max_retries=0)(in_worker)
        pending = {train.options(**resources[out], runtime_env={"env_vars": QUIET_WORKERS}).remote(work, job): out
                   for out, job in jobs.items()}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout keeps Ctrl-C responsive
                for ref in ready:
                    out = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayTaskError as err:  # the run raised: its own error, not Ray's wrapper
                        yield out, describe(err.cause) if err.cause is not None else str(err)
                    except ray.exceptions.RayError as err:  # the worker or its node died, or the task was cancelled
                        yield out, describe(err)
                    else:
                        yield out, None
        finally:
            for ref in pending:  # Ctrl-C (or a failure of this loop): the remaining runs stop
                ray.cancel(ref, force=True)


def make_executor(name: str = "local", *, workers: int = 2, ray_address: str | None = None):
    """The executor called ``name``: ``local`` with ``workers`` processes, or ``ray`` at ``ray_address``."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(ray_address)
    raise RunError(f"--executor {name}: expected one of {', '.join(EXECUTORS)}")


def train_missing(jobs: dict, work, executor=None, *, progress_bar: bool = False) -> None:
    """Train every job ({run directory: keyword arguments of ``work``}) with ``executor`` (default:
    ``LocalExecutor()``), the longest task streams first, printing one line per finished run (and,
    with ``progress_bar``, one bar over the runs instead of the runs' own bars). A finished run must
    be visible here: a worker that wrote it elsewhere (a run root not shared) counts as a failure.
    RunsFailed names every failed run and its error once all the others have finished."""
    if not jobs:
        return
    executor = executor or LocalExecutor()
    order = sorted(jobs, key=lambda out: -len(jobs[out].get("tasks") or range(99)))
    results = executor.results({out: jobs[out] for out in order}, work, quiet=progress_bar)
    failures, start = {}, time.perf_counter()
    # closing: on Ctrl-C the executor stops at once the runs still queued or running
    with tqdm(total=len(jobs), desc="runs", unit="run", disable=not progress_bar) as bar, closing(results):
        for done, (out, error) in enumerate(results, 1):
            if error is None and not (Path(out) / "metrics.json").exists():
                error = (f"the worker finished, but {Path(out) / 'metrics.json'} is not visible here: the run root "
                         "must be on a filesystem that every node shares")
            if error is None:
                tqdm.write(f"[{done}/{len(jobs)}] trained {Path(out).name} ({time.perf_counter() - start:.0f} s)")
            else:
                failures[out] = error
                tqdm.write(f"[{done}/{len(jobs)}] FAILED {Path(out).name}: {error}")
            bar.update()
    if failures:
        raise RunsFailed(failures)
