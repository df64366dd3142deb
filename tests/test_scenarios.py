"""Task streams (scenarios.py): scenarios B-I, orders, explicit groups -- and runs over tasks of
several classes on the tiny tree of conftest.py."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import read_json, read_matrix, run_argv


def matrix_of(path) -> np.ndarray:
    columns, rows, cells = read_matrix(path)
    return np.array([[float(c) if c else np.nan for c in row] for row in cells])

from decoflow_core.cli import main
from decoflow_core.config import ConfigError, make_config
from decoflow_core.scenarios import (
    EMBEDDED,
    MVTEC_AD,
    PRESETS,
    StreamError,
    grouped,
    ordered,
    task_stream,
)

LETTERS = list("abcdefghij")


@pytest.mark.parametrize("scenario, sizes", [("1-1", [1] * 10), ("3-3", [3, 3, 3, 1]), ("5-5", [5, 5]),
                                             ("10-5", [10]), ("9-1", [9, 1]), ("4-2", [4, 2, 2, 2])])
def test_scenario_b_i_gives_b_classes_first_then_i_in_stream_order(scenario, sizes):
    groups = grouped(LETTERS, scenario)
    assert [len(g) for g in groups] == sizes
    assert [c for g in groups for c in g] == LETTERS  # nothing lost, nothing reordered


def test_official_scenarios_on_mvtec_give_the_official_task_counts():
    counts = {s: len(grouped(MVTEC_AD, s)) for s in ("1-1", "14-1", "10-5", "3-3", "10-1", "5-5")}
    assert counts == {"1-1": 15, "14-1": 2, "10-5": 2, "3-3": 5, "10-1": 6, "5-5": 3}


@pytest.mark.parametrize("bad", ["3", "0-1", "1-0", "a-b", "3-3-3", ""])
def test_a_malformed_scenario_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match=f"--scenario {bad}: expected B-I"):
        make_config("smoke", {"scenario": bad})


def test_a_first_task_larger_than_the_stream_is_refused():
    with pytest.raises(StreamError, match="the first task needs 11 classes, the stream has 10"):
        grouped(LETTERS, "11-1")


def test_presets_are_permutations_of_their_data_set_and_easy_first_reverses_hard_first_on_embedded():
    for preset in PRESETS.values():
        assert sorted(preset["MVTec-AD"]) == MVTEC_AD and sorted(preset["embedded"]) == EMBEDDED
    assert PRESETS["easy-first"]["embedded"] == PRESETS["hard-first"]["embedded"][::-1]
    assert PRESETS["hard-first"]["MVTec-AD"][:3] == ["screw", "toothbrush", "capsule"]
    assert PRESETS["texture-first"]["MVTec-AD"][:5] == ["carpet", "grid", "leather", "tile", "wood"]


def test_orders_reorder_the_classes_and_random_depends_on_its_seed_only():
    shuffled = list(reversed(MVTEC_AD))
    assert ordered(shuffled, "given") == shuffled
    assert ordered(shuffled, "alphabetical") == MVTEC_AD
    assert ordered(shuffled, "hard-first") == PRESETS["hard-first"]["MVTec-AD"]
    assert ordered(EMBEDDED, "texture-first")[:2] == ["brick_wall", "carpet"]
    one, again, two = ordered(LETTERS, "random:1"), ordered(LETTERS, "random:1"), ordered(LETTERS, "random:2")
    assert one == again and one != two and sorted(one) == LETTERS and one != LETTERS


def test_a_preset_order_on_other_classes_says_where_it_is_defined():
    with pytest.raises(StreamError, match="hard-first is defined for the full class sets of MVTec-AD: 15"):
        ordered(LETTERS, "hard-first")
    with pytest.raises(ConfigError, match="--order sideways: expected one of given, alphabetical"):
        make_config("smoke", {"order": "sideways"})


def test_explicit_groups_are_the_tasks_and_refuse_a_scenario_or_a_repeated_class():
    assert task_stream(LETTERS, ["a+b + c", "d"]) == [["a", "b", "c"], ["d"]]
    assert task_stream(LETTERS, ["c", "a"], order="alphabetical", scenario="1-1") == [["a"], ["c"]]
    assert task_stream(["b", "a", "c"], None, scenario="2-1") == [["a", "b"], ["c"]]  # all, alphabetically
    with pytest.raises(StreamError, match="drop --scenario and --order"):
        task_stream(LETTERS, ["a+b", "c"], scenario="1-2")
    with pytest.raises(StreamError, match="a appear"):
        task_stream(LETTERS, ["a+b", "a"])
    with pytest.raises(StreamError, match="unknown task"):
        task_stream(LETTERS, ["a+zz"])


# ----------------------------------------------------------------------------- runs of several classes per task
GROUPS = ["checker+gradient", "noise"]


@pytest.fixture(scope="module")
def grouped_runs(tiny_tree, smoke_args, tmp_path_factory):
    """A two-task run (checker+gradient, then noise) with task prototypes, one with class prototypes,
    and the same with the oracle task id."""
    root = tmp_path_factory.mktemp("grouped")
    runs = {"task": [], "class": ["--set", "router_prototypes=class"], "oracle": ["--set", "task_agnostic=false"]}
    for name, extra in runs.items():
        assert main(run_argv(tiny_tree, root / name, smoke_args, tasks=["checker", "gradient", "noise"],
                             extra=["--scenario", "2-1", *extra])) == 0
    return {name: root / name for name in runs}


def test_a_task_of_two_classes_trains_once_and_is_scored_per_class(grouped_runs):
    out = grouped_runs["task"]
    config, metrics = read_json(out / "config.json"), read_json(out / "metrics.json")
    assert config["tasks"] == GROUPS and config["config"]["scenario"] == "2-1"
    assert config["task_classes"] == {"checker+gradient": ["checker", "gradient"], "noise": ["noise"]}
    assert list(metrics["history"]) == GROUPS  # one training per task
    assert sorted((out / "checkpoints").glob("task_*")) == [out / "checkpoints/task_00_checker+gradient.pt",
                                                         out / "checkpoints/task_01_noise.pt"]
    assert set(metrics["final_by_class"]) == {"checker", "gradient", "noise"}
    # a task's cell of R is the mean of its classes' results
    by_class = metrics["final_by_class"]
    first = np.mean([by_class[c]["image_auroc"] for c in ("checker", "gradient")])
    assert metrics["final"]["checker+gradient"]["image_auroc"] == pytest.approx(first, abs=1e-12)
    assert read_matrix(out / "matrix_image_auroc.csv")[0] == GROUPS
    matrix = matrix_of(out / "matrix_image_auroc.csv")
    assert matrix.shape == (2, 2) and np.isnan(matrix[0, 1])
    assert matrix[1, 0] == pytest.approx(first, abs=1e-6)
    assert metrics["mean_by_class"]["image_auroc"] == pytest.approx(
        np.mean([v["image_auroc"] for v in by_class.values()]), abs=1e-12)
    # every test image of every class is routed to a task; no class-level accuracy without class prototypes
    assert metrics["class_routing_accuracy"] is None
    assert 0.0 <= metrics["routing_accuracy"] <= 1.0
    confusion = matrix_of(out / "routing_confusion.csv")
    assert confusion.sum() == 3 * 8 and confusion[0].sum() == 2 * 8


def test_class_prototypes_give_class_and_task_level_routing_accuracy(grouped_runs):
    metrics = read_json(grouped_runs["class"] / "metrics.json")
    assert metrics["class_routing_accuracy"] is not None
    # the classes of the tiny tree look nothing alike: every image finds its class, hence its task
    assert metrics["class_routing_accuracy"] == 1.0 and metrics["routing_accuracy"] == 1.0
    assert read_json(grouped_runs["task"] / "config.json")["config"]["router_prototypes"] == "task"


def test_tasks_of_several_classes_keep_zero_forgetting_with_the_task_id(grouped_runs):
    metrics = read_json(grouped_runs["oracle"] / "metrics.json")
    assert metrics["forgetting"]["image_auroc"] == 0.0
    matrix = matrix_of(grouped_runs["oracle"] / "matrix_image_auroc.csv")
    assert matrix[0, 0] == matrix[1, 0]  # the first task's classes score the same after the second task


def test_order_random_changes_the_stream_and_config_json_says_so(tiny_tree, smoke_args, tmp_path):
    out = tmp_path / "run"
    assert main(run_argv(tiny_tree, out, smoke_args, tasks=["checker", "gradient", "noise"],
                         extra=["--order", "random:3", "--set", "epochs=1"])) == 0
    config = read_json(out / "config.json")
    expected = ordered(["checker", "gradient", "noise"], "random:3")
    assert config["config"]["order"] == "random:3" and config["tasks"] == expected
    assert expected != ["checker", "gradient", "noise"]


@pytest.mark.parametrize("method", ["finetune", "ewc", "replay", "joint", "independent", "padim", "ae_lora"])
def test_every_method_runs_a_scenario_of_several_classes_per_task(method, run_method):
    out = run_method(method, tasks=["checker", "gradient", "noise"], extra=("--scenario", "2-1"))
    metrics = read_json(out / "metrics.json")
    assert metrics["tasks"] == GROUPS and set(metrics["final_by_class"]) == {"checker", "gradient", "noise"}
    assert all(v["image_auroc"] is not None for v in metrics["final_by_class"].values())
    assert metrics["final"]["checker+gradient"]["image_auroc"] == pytest.approx(
        np.mean([metrics["final_by_class"][c]["image_auroc"] for c in ("checker", "gradient")]), abs=1e-12)
