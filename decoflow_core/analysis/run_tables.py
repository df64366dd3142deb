"""Tables of finished runs for the main results, forgetting and first-task analyses (Sec. 4.2-4.3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import files
from ..report import load_metrics
from ..train import matrices_from_rows

PAPER_MVTEC = {"I-AUROC": 98.05, "P-AUROC": 97.81, "P-AP": 55.80, "FM (I-AUROC)": 0.0, "routing": 100.0}


def category_frame(summaries: list[dict]) -> pd.DataFrame:
    """The benchmark table (data.validate_tree summaries) as a DataFrame."""
    return pd.DataFrame([{"category": s["category"], "train good": s["train_good"], "test good": s["test_good"],
                          "test defect": sum(s["defects"].values()), "defect types": len(s["defects"]),
                          "masks": s["masks"]} for s in summaries])


def summary_row(metrics: dict) -> dict:
    """One run's headline numbers: final mean metrics, FM and BWT of image AUROC, routing, cost."""
    mean = metrics["mean"]
    return {"I-AUROC": mean["image_auroc"], "P-AUROC": mean["pixel_auroc"], "P-AP": mean["pixel_ap"],
            "FM (I-AUROC)": metrics["forgetting"]["image_auroc"], "BWT (I-AUROC)": metrics["bwt"]["image_auroc"],
            "routing": metrics["routing_accuracy"], "params/task": metrics["params"]["per_task"]}


def seed_table(rows: pd.DataFrame, by: str = "method") -> pd.DataFrame:
    """Mean over seeds of each numeric column per ``by``; with several seeds also "<col> std"."""
    numeric = [c for c in rows.columns if c not in (by, "seed")]
    grouped = rows.groupby(by, sort=False)[numeric]
    table = grouped.mean().astype(float)
    if rows["seed"].nunique() > 1:
        std = grouped.std().astype(float).add_suffix(" std")
        table = pd.concat([table, std], axis=1)[[c for n in numeric for c in (n, f"{n} std")]]
    return table.reset_index()


ORACLE = " (oracle task id)"


def oracle_matrix(run_dir, metric: str = "image_auroc") -> np.ndarray:
    """R of a routed run as it is with the true task id given (its progress.json's oracle rows)."""
    run_dir = Path(run_dir)
    progress, meta = files.read_json(run_dir / "progress.json"), files.read_json(run_dir / "config.json")
    tasks = meta["tasks"]
    classes_of = meta.get("task_classes") or {t: [t] for t in tasks}
    return matrices_from_rows(progress.get("oracle_rows") or [], tasks, classes_of)[metric]


def oracle_view(metrics: dict) -> dict:
    """A routed run's metrics with the scores it recorded for the true task id (``metrics["oracle"]``)
    in place of the routed ones; routing is then not applicable."""
    if not metrics.get("oracle"):
        raise ValueError(f"the {metrics['method']} run has no oracle scores (only routed, task-agnostic runs do)")
    return {**metrics, **metrics["oracle"], "routing_accuracy": None}


def method_metrics(runs: dict) -> dict:
    """{label: [metrics, ...]} from {method: [run_dir, ...]}; for every routed run also the label
    "<method> (oracle task id)", the same model scored with the true task id."""
    out = {}
    for method, dirs in runs.items():
        out[method] = [load_metrics(d) for d in dirs]
        if out[method] and all(m.get("oracle") for m in out[method]):
            out[method + ORACLE] = [oracle_view(m) for m in out[method]]
    return out


def per_task_table(runs: dict, metric: str = "image_auroc") -> pd.DataFrame:
    """Final ``metric`` per task (rows, plus "mean") and method (columns), averaged over seeds.

    runs: {method: [metrics dict, ...]} (see ``method_metrics``) with the same task list everywhere.
    """
    columns = {}
    for method, seeds in runs.items():
        finals = [[m["final"][t][metric] for t in m["tasks"]] for m in seeds]
        columns[method] = np.nanmean(np.array(finals, dtype=float), axis=0) if finals else []
    tasks = next(iter(runs.values()))[0]["tasks"]
    df = pd.DataFrame(columns, index=tasks)
    df.loc["mean"] = df.mean(axis=0)
    return df.rename_axis("task").reset_index()


def forgetting_row(metrics: dict) -> dict:
    """FM and BWT of every metric of one run (Sec. 4.2, Table 3; definitions in metrics.py)."""
    names = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP"}
    row = {}
    for key, label in names.items():
        row[f"FM ({label})"] = metrics["forgetting"][key]
        row[f"BWT ({label})"] = metrics["bwt"][key]
    return row


def first_task_curve(R: np.ndarray) -> np.ndarray:
    """R[i][0] for i = 0..T-1: the first task's score after each task of the stream (Fig. 3)."""
    return np.asarray(R, dtype=float)[:, 0]
