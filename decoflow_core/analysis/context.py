"""A notebook's view of the kit: its task stream, the shared runs (trained once by ``runs.ensure_run``
and reused by every later notebook), where figures and tables go, and the JSON record of the numbers
the notebook asserts on.

Where ``prefetch`` trains missing runs comes from the environment, which ``make reproduce`` sets
(``pipeline``): ``DECOFLOW_EXECUTOR`` (``local``, the default: WORKERS processes here; or ``ray``) and
``DECOFLOW_RAY_ADDRESS`` (the Ray cluster to join; unset: ``RAY_ADDRESS``, else a local instance).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import files
from ..config import Config, make_config
from ..data import list_categories
from ..datasets import BUILT, resolve_data
from ..train import RunError, build_extractor, load_task, resolve_device, with_router_feature
from .executors import EXECUTORS, make_executor
from .plots import save_figure
from .runs import ensure_run, ensure_runs, load_metrics, profile_sets

try:  # in a notebook a figure is shown as an image; elsewhere its path is returned
    from IPython.display import Image
except ImportError:
    Image = None


REPO = Path(__file__).resolve().parents[2]


QUICK_TASKS = 3


# sensitivity sweeps (rank, TAL) run on the first tasks only, except with PROFILE=paper or official
SENSITIVITY_TASKS = 5


# QUICK changes sizes only, never the code path: one epoch, a shallower flow, the embedded images'
# own 128 px, and pixel metrics at 64 x 64.
QUICK_SETS = {"epochs": 1, "n_dcs": 2, "n_acl": 1, "image_size": 128, "eval_size": 64}


FULL_PROFILES = ("paper", "official")  # GPU-scale profiles: sweeps run on the whole stream


def task_stream(available: list[str], tasks: list[str] | None, quick: bool) -> list[str]:
    """The task order (Sec. 3.1): ``tasks`` as given, or every category alphabetically; QUICK keeps
    the first three."""
    stream = list(tasks) if tasks else sorted(available)
    unknown = [t for t in stream if t not in available]
    if unknown:
        raise ValueError(f"TASKS names {unknown}, which the data set does not hold; it has {sorted(available)}")
    return stream[:QUICK_TASKS] if quick else stream


def kit_path(path) -> Path:
    """``path`` as given when absolute, else relative to the kit's folder (where make runs)."""
    path = Path(path)
    return path if path.is_absolute() else (REPO / path).resolve()


class Context:
    """Parameters of one notebook turned into the things its cells need."""

    def __init__(self, name: str, *, data: str, tasks, profile: str, seeds, quick: bool, run_root,
                 threads: int = 0, workers: int = 1, sets: dict | None = None):
        if threads:
            torch.set_num_threads(threads)  # on a shared CPU, oversubscribed threads cost several times over
        self.name, self.profile, self.quick = name, profile, bool(quick)
        self.user_sets = {k: str(v) for k, v in (sets or {}).items()}
        make_config(profile, self.user_sets)  # a bad key or value fails here, before any training
        self.workers = max(1, int(workers))
        executor = os.environ.get("DECOFLOW_EXECUTOR") or "local"
        if executor not in EXECUTORS:
            raise RunError(f"DECOFLOW_EXECUTOR={executor}: expected one of {', '.join(EXECUTORS)}")
        self.executor = make_executor(executor, workers=self.workers,
                                      ray_address=os.environ.get("DECOFLOW_RAY_ADDRESS") or None)
        self.seeds = list(seeds)
        self.run_root = Path(run_root).resolve()
        if data not in BUILT and not Path(data).exists():
            data = str(kit_path(data))  # paths given relative to the kit (make reproduce DATA=...)
        self.data_spec = data
        self.data_root = Path(resolve_data(data))
        self.available = list_categories(self.data_root)
        self.tasks = task_stream(self.available, tasks, quick)
        quick_root = self.run_root / "quick"
        self.figures = quick_root / "figures" if quick else REPO / "figures"
        self.results = quick_root / "results" if quick else REPO / "results"
        self.record_file = self.run_root / "notebook_results" / f"{name}.json"
        self.recorded: dict = {}
        self._features: dict = {}

    def sets(self, **changes) -> dict:
        """Overrides of the profile for a run: QUICK's sizes, the notebook's SETS, then ``changes``."""
        quick = dict(QUICK_SETS) if self.quick else {}
        if quick and make_config(self.profile, self.user_sets).aggregation == "unfold":
            quick["grid"] = QUICK_SETS["image_size"] // 8  # the unfold features keep the stride-8 stage's grid
        return profile_sets(self.profile, {**quick, **self.user_sets, **changes})

    def config(self, **changes) -> Config:
        return make_config(self.profile, {k: str(v) for k, v in self.sets(**changes).items()})

    @property
    def sensitivity_stream(self) -> list[str]:
        """The stream of the sensitivity sweeps: the first SENSITIVITY_TASKS tasks unless a FULL_PROFILES one."""
        return self.tasks if self.profile in FULL_PROFILES else self.tasks[:SENSITIVITY_TASKS]

    def _job(self, method: str, seed: int | None = None, *, stream: list[str] | None = None,
             data: str | None = None, **changes) -> dict:
        seed = self.seeds[0] if seed is None else seed
        data = data or self.data_spec
        stream = list(stream or self.tasks)
        default_stream = data == self.data_spec and stream == task_stream(self.available, None, False)
        return dict(method=method, data=data, tasks=None if default_stream else stream, profile=self.profile,
                    seed=seed, sets=self.sets(**changes))

    def run(self, method: str, seed: int | None = None, *, stream: list[str] | None = None,
            data: str | None = None, **changes) -> Path:
        """The run directory of ``method`` on ``stream`` (default: the notebook's task stream) of ``data``
        (default: the notebook's), trained now only if no notebook did it yet."""
        job = self._job(method, seed, stream=stream, data=data, **changes)
        out = ensure_run(self.run_root, **job)
        expected = job["tasks"] or self.available
        metrics = load_metrics(out)
        classes = [c for t in metrics["tasks"] for c in (metrics.get("task_classes") or {}).get(t, [t])]
        if sorted(classes) != sorted(expected):
            raise RuntimeError(f"{out} holds a run on other tasks than {expected}; delete it or use another RUN_ROOT")
        return out

    def prefetch(self, runs: list[tuple]) -> None:
        """Train the missing runs of [(method, seed, {keyword arguments of ``run``}), ...] with the
        executor (``self.workers`` local processes, or Ray); the ``run`` calls that follow then find them."""
        ensure_runs(self.run_root, [self._job(method, seed, **kw) for method, seed, kw in runs], self.workers,
                    executor=self.executor)

    def features(self, data_root=None, **changes) -> dict:
        """{task: train.TaskData} of the stream's features (read from the feature cache); with
        ``data_root``, of every category of that MVTec-layout tree instead. "pooled" is the config's
        ``router_feature``; the features are loaded once for every router feature."""
        config = self.config(**changes)
        root = Path(data_root) if data_root else self.data_root
        tasks = list_categories(root) if data_root else self.tasks
        key = (str(root),) + tuple(getattr(config, k) for k in (
            "backbone", "backbone_weights", "image_size", "image_resize", "grid", "aggregation", "feature_dim",
            "positional_encoding", "pe_order", "pe_scale", "eval_size"))  # what TaskData depends on
        if key not in self._features:
            device = resolve_device(config.device)
            extractor = build_extractor(config)
            self._features[key] = {t: load_task(root, t, extractor, config, device) for t in tasks}
        return {t: with_router_feature(data, config.router_feature) for t, data in self._features[key].items()}

    def figure(self, fig, name: str):
        """Save ``fig`` (PNG and PDF) and return the PNG for the notebook to show."""
        png = save_figure(fig, name, self.figures)[0]
        return png if Image is None else Image(filename=str(png))

    def table(self, df: pd.DataFrame, name: str) -> list[Path]:
        return save_table(df, name, self.results)

    def record(self, key: str, value, meaning: str) -> None:
        """Add one number (or list) to the notebook's JSON record, with what it means."""
        self.recorded[key] = {"value": value, "meaning": meaning}
        files.write_json(self.record_file, {"notebook": self.name, "quick": self.quick, "tasks": self.tasks,
                                            "profile": self.profile, "seeds": self.seeds,
                                            "values": self.recorded})


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-style Markdown table of ``df`` (its columns, not its index); floats to ``digits``,
    except columns of whole numbers such as parameter counts (means over seeds come back as floats)."""
    def whole(column) -> bool:
        values = pd.to_numeric(df[column], errors="coerce").dropna()
        return df[column].dtype.kind == "f" and len(values) > 0 and bool((values % 1 == 0).all() and (values.abs() >= 10).any())

    def cell(value, as_int):
        if isinstance(value, (float, np.floating)):
            return "n/a" if math.isnan(value) else (f"{value:,.0f}" if as_int else f"{value:.{digits}f}")
        return "n/a" if value is None else str(value)
    header = [str(c) for c in df.columns]
    as_int = [whole(c) for c in df.columns]
    rows = [[cell(v, i) for v, i in zip(row, as_int)] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def save_table(df: pd.DataFrame, name: str, folder) -> list[Path]:
    """Write ``df`` as ``<folder>/<name>.csv`` and ``<folder>/<name>.md``; returns both paths."""
    folder = Path(folder)
    csv = files.write_text(folder / f"{name}.csv", df.to_csv(index=False))
    md = files.write_text(folder / f"{name}.md", markdown_table(df))
    return [csv, md]
