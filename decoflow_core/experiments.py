"""Runs that notebooks share: train once, reuse afterwards.

``ensure_run`` returns the run directory of (method, profile, seed, overrides) on a data set,
training it only when its ``metrics.json`` is missing and resuming a run that was interrupted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import files
from .config import make_config
from .train import METRICS, run


def run_name(method: str, profile: str, seed: int, sets: dict | None, tag: str | None,
             tasks: list[str] | None = None) -> str:
    """``<method>-<profile>-s<seed>``, plus a hash of the overrides and of an explicit task list."""
    suffix = ""
    if sets:
        suffix += "-" + hashlib.sha1(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:8]
    if tasks:
        suffix += f"-{len(tasks)}t" + hashlib.sha1(",".join(tasks).encode()).hexdigest()[:6]
    return f"{tag or method}-{profile}-s{seed}{suffix}"


def data_tag(data: str) -> str:
    return "embedded" if data == "embedded" else Path(data).resolve().name


def ensure_run(run_root, method: str, *, data: str = "embedded", tasks=None, profile: str = "cpu",
               seed: int = 0, sets: dict | None = None, tag: str | None = None,
               progress_bar: bool = True) -> Path:
    """``tasks=None`` means every category alphabetically (the default stream)."""
    from .cli import resolve_data
    out = Path(run_root) / data_tag(data) / run_name(method, profile, seed, sets, tag, tasks)
    if (out / "metrics.json").exists():
        return out
    config = make_config(profile, {k: str(v) for k, v in (sets or {}).items()})
    run(data_root=resolve_data(data), tasks=tasks, method=method, config=config, seed=seed, out=out,
        resume=(out / "progress.json").exists(), progress_bar=progress_bar)
    return out


def load_matrix(run_dir, metric: str = "image_auroc"):
    """(R as a T x T array with NaN above the diagonal, task names) from a run's CSV."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    lines = (Path(run_dir) / f"matrix_{metric}.csv").read_text().strip().splitlines()
    tasks = lines[0].split(",")[1:]
    rows = [[float(v) if v else np.nan for v in line.split(",")[1:]] for line in lines[1:]]
    return np.array(rows), tasks


def load_metrics(run_dir) -> dict:
    return files.read_json(Path(run_dir) / "metrics.json")
