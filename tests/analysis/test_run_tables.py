"""Result tables of finished runs (analysis/run_tables.py), on hand-made metrics."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from decoflow_core import files
from decoflow_core.analysis import run_tables


def _scores(offset: float) -> dict:
    per = {"image_auroc": 0.9 + offset, "pixel_auroc": 0.8 + offset, "pixel_ap": 0.3 + offset}
    return {"final": {"t0": dict(per), "t1": dict(per)}, "mean": dict(per),
            "forgetting": {k: 0.05 + offset for k in per}, "bwt": {k: -0.05 - offset for k in per}}


def _metrics(method: str, routed: bool) -> dict:
    return {"method": method, "tasks": ["t0", "t1"], **_scores(0.0),
            "oracle": _scores(0.05) if routed else None, "routing_accuracy": 0.75 if routed else None,
            "params": {"base": 100, "per_task": 10, "per_task_ratio": 0.1}}


def test_seed_table_means_and_stds():
    rows = pd.DataFrame({"method": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "x": [1.0, 3.0, 2.0, 2.0]})
    table = run_tables.seed_table(rows)
    assert list(table.columns) == ["method", "x", "x std"]
    assert table["x"].tolist() == [2.0, 2.0] and table["x std"].tolist() == [pytest.approx(math.sqrt(2)), 0.0]
    one_seed = run_tables.seed_table(rows[rows.seed == 0])
    assert list(one_seed.columns) == ["method", "x"]


def test_summary_and_forgetting_rows_read_a_metrics_dict():
    metrics = {"mean": {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_ap": 0.3},
               "forgetting": {"image_auroc": 0.1, "pixel_auroc": 0.2, "pixel_ap": None},
               "bwt": {"image_auroc": -0.1, "pixel_auroc": -0.2, "pixel_ap": None},
               "routing_accuracy": 1.0, "params": {"per_task": 123}}
    assert run_tables.summary_row(metrics) == {"I-AUROC": 0.9, "P-AUROC": 0.8, "P-AP": 0.3, "FM (I-AUROC)": 0.1,
                                             "BWT (I-AUROC)": -0.1, "routing": 1.0, "params/task": 123}
    row = run_tables.forgetting_row(metrics)
    assert row["FM (P-AUROC)"] == 0.2 and row["BWT (P-AP)"] is None and len(row) == 6


def test_first_task_curve_is_the_first_column():
    R = np.array([[0.9, np.nan], [0.5, 0.8]])
    np.testing.assert_array_equal(run_tables.first_task_curve(R), [0.9, 0.5])


def test_oracle_view_swaps_in_the_oracle_scores():
    metrics = _metrics("decoflow", routed=True)
    view = run_tables.oracle_view(metrics)
    for key in ("final", "mean", "forgetting", "bwt"):
        assert view[key] == metrics["oracle"][key]
    assert view["mean"]["image_auroc"] == pytest.approx(0.95)
    assert view["routing_accuracy"] is None
    assert view["method"] == "decoflow" and view["params"] == metrics["params"] and view["tasks"] == ["t0", "t1"]
    # the routed metrics themselves are left alone
    assert metrics["mean"]["image_auroc"] == pytest.approx(0.9) and metrics["routing_accuracy"] == 0.75


@pytest.mark.parametrize("oracle", [None, {}, "absent"])
def test_oracle_view_without_oracle_scores_names_the_method(oracle):
    metrics = _metrics("ewc", routed=False)
    if oracle == "absent":
        del metrics["oracle"]
    else:
        metrics["oracle"] = oracle
    with pytest.raises(ValueError, match="ewc"):
        run_tables.oracle_view(metrics)


def _run(folder: Path, metrics: dict) -> Path:
    """A run directory holding ``metrics`` (and the config.json that makes it a run)."""
    files.write_json(folder / "config.json", {"method": metrics["method"], "tasks": metrics["tasks"], "config": {}})
    return files.write_json(folder / "metrics.json", metrics).parent


def test_method_metrics_adds_an_oracle_label_only_for_routed_runs(tmp_path):
    routed = [_run(tmp_path / f"decoflow-s{s}", _metrics("decoflow", True)) for s in (0, 1)]
    plain = _run(tmp_path / "ewc-s0", _metrics("ewc", False))
    out = run_tables.method_metrics({"decoflow": routed, "ewc": [plain]})
    assert list(out) == ["decoflow", "decoflow (oracle task id)", "ewc"]
    assert len(out["decoflow"]) == 2 and len(out["decoflow (oracle task id)"]) == 2 and len(out["ewc"]) == 1
    assert out["decoflow"][0]["routing_accuracy"] == 0.75
    assert out["decoflow"][0]["mean"]["image_auroc"] == pytest.approx(0.9)
    oracle = out["decoflow (oracle task id)"][1]
    assert oracle["routing_accuracy"] is None
    assert oracle["mean"]["image_auroc"] == pytest.approx(0.95)
    assert oracle["final"]["t1"]["pixel_ap"] == pytest.approx(0.35)
    assert out["ewc"][0]["oracle"] is None and out["ewc"][0]["method"] == "ewc"


def test_method_metrics_needs_oracle_scores_in_every_seed(tmp_path):
    with_oracle = _run(tmp_path / "a", _metrics("decoflow", True))
    without = _run(tmp_path / "b", _metrics("decoflow", False))
    out = run_tables.method_metrics({"decoflow": [with_oracle, without]})
    assert list(out) == ["decoflow"]
