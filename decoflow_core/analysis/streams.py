"""Scenarios and task orders (notebook 12): headline rows of runs whose tasks hold several classes,
and where DeCoFlow loses ground against one class per task."""
from __future__ import annotations

import pandas as pd

# The authors' own image AUROC on MVTec-AD per scenario (their result table; a different data set
# from the embedded benchmark, quoted for the trend only)
AUTHORS_MVTEC = {"1-1": 0.981, "3-3": 0.838, "5-5": 0.802, "14-1": 0.669}
KEYS = {"I-AUROC": "image_auroc", "I-AP": "image_ap", "P-AUROC": "pixel_auroc", "P-AP": "pixel_ap",
        "AUPRO": "aupro"}


def usable_scenarios(scenarios: list[str], n_classes: int) -> list[str]:
    """The scenarios that leave at least two tasks on ``n_classes`` classes (B < n_classes)."""
    return [s for s in scenarios if int(s.split("-")[0]) < n_classes]


def scenario_row(metrics: dict) -> dict:
    """One run: detection metrics as the mean over classes, forgetting over tasks, routing at both
    levels, and the same model's numbers with the true task id (routed runs only)."""
    by_class = metrics.get("mean_by_class") or metrics["mean"]
    oracle = metrics.get("oracle") or {}
    return {"tasks": len(metrics["tasks"]), **{label: by_class.get(key) for label, key in KEYS.items()},
            "FM (I-AUROC)": metrics["forgetting"]["image_auroc"], "BWT (I-AUROC)": metrics["bwt"]["image_auroc"],
            "routing (task)": metrics["routing_accuracy"], "routing (class)": metrics.get("class_routing_accuracy"),
            "oracle I-AUROC": (oracle.get("mean_by_class") or {}).get("image_auroc"),
            "oracle FM": (oracle.get("forgetting") or {}).get("image_auroc"),
            "train s": sum(metrics["seconds"]["train"].values())}


def where_it_loses(rows: pd.DataFrame, method: str = "decoflow", base: str = "1-1") -> pd.DataFrame:
    """Per scenario, the drop of ``method``'s image AUROC from ``base`` split in two: *routing* (the
    oracle task id minus the routed score: what wrong routing costs) and *capacity* (base minus the
    scenario's oracle score: what one set of task parameters for several classes costs)."""
    own = rows[rows["method"] == method].set_index("scenario")
    if base not in own.index:
        raise ValueError(f"no {method} run under {base} to compare with")
    routed = own["I-AUROC"].astype(float)
    oracle = own["oracle I-AUROC"].astype(float).fillna(routed)  # a run that routes nothing: its own score
    return pd.DataFrame({"scenario": own.index, "I-AUROC": routed.values,
                         "drop from " + base: (routed[base] - routed).values,
                         "routing part": (oracle - routed).values, "capacity part": (oracle[base] - oracle).values,
                         "routing (task)": own["routing (task)"].values,
                         "authors, MVTec-AD": [AUTHORS_MVTEC.get(s) for s in own.index]})
