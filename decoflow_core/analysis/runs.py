"""Runs that notebooks share: train once, reuse afterwards; and settings chosen on held-out data.

``ensure_run`` returns the run directory of (method, profile, seed, overrides) on a data set,
training it only when its ``metrics.json`` is missing and resuming a run that was interrupted; a
finished run whose saved config is not what the profile gives now is refused, never reused.
``select`` picks settings by a validation score of held-out train/good images, never by test data.
Processes that ask for the same run at once (two notebooks open side by side, say) train
it once: the first holds a lock on it, the others wait and then read it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

try:
    import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

from .. import files
from ..config import changed_fields, make_config
from ..datasets import BUILT, resolve_data
from ..report import load_metrics
from ..train import METRICS, RunError, run
from .executors import LocalExecutor, RunsFailed, train_missing


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
    return data if data in BUILT else Path(data).resolve().name


def run_dir(run_root, method: str, *, data: str = "embedded", tasks=None, profile: str = "cpu",
            seed: int = 0, sets: dict | None = None, tag: str | None = None) -> Path:
    return Path(run_root) / data_tag(data) / run_name(method, profile, seed, sets, tag, tasks)


def profile_sets(profile: str, sets: dict) -> dict:
    """``sets`` less the entries the profile already has, so equal configs share one run name."""
    base = make_config(profile)
    return {k: v for k, v in sets.items() if getattr(base, k) != v}


def ensure_run(run_root, method: str, *, data: str = "embedded", tasks=None, profile: str = "cpu",
               seed: int = 0, sets: dict | None = None, tag: str | None = None,
               progress_bar: bool = True) -> Path:
    """``tasks=None`` means every category alphabetically (the default stream)."""
    out = run_dir(run_root, method, data=data, tasks=tasks, profile=profile, seed=seed, sets=sets, tag=tag)
    config = make_config(profile, {k: str(v) for k, v in (sets or {}).items()})
    with run_lock(out):
        if (out / "metrics.json").exists():
            changed = changed_fields(files.read_json(out / "config.json")["config"], config, method)
            if changed:  # e.g. a profile changed since: never reuse a run the current settings would not give
                raise RunError(f"{out} was trained with other settings ({', '.join(changed)} differ from the "
                               f"'{profile}' profile now); delete it (or `make clean-runs`) to retrain")
            return out
        run(data_root=resolve_data(data), tasks=tasks, method=method, config=config, seed=seed, out=out,
            resume=(out / "progress.json").exists(), progress_bar=progress_bar)
    return out


@contextmanager
def run_lock(out: Path):
    """Hold an exclusive lock on run directory ``out`` (the file ``<out>.lock`` beside it) for the
    duration; another process asking for the same run waits here. The operating system releases the
    lock when its holder dies, so a crashed run never blocks the next one (which resumes it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def load_matrix(run_dir, metric: str = "image_auroc"):
    """(R as a T x T array with NaN above the diagonal, task names) from a run's CSV."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    lines = (Path(run_dir) / f"matrix_{metric}.csv").read_text().strip().splitlines()
    tasks = lines[0].split(",")[1:]
    rows = [[float(v) if v else np.nan for v in line.split(",")[1:]] for line in lines[1:]]
    return np.array(rows), tasks


def ensure_runs(run_root, jobs: list[dict], workers: int = 2, executor=None, *,
                progress_bar: bool = False) -> list[Path]:
    """``ensure_run`` for many jobs (keyword dicts): the missing ones are trained by ``executor``
    (``executors.make_executor``; default: ``workers`` local processes of one thread each), longest
    streams first, one line printed per finished run. A run that fails does not stop the others:
    RunsFailed names every failed run and its error at the end. Returns the jobs' run directories."""
    dirs = [run_dir(run_root, **job) for job in jobs]
    missing = {}
    for job, d in zip(jobs, dirs):
        if (d / "metrics.json").exists():
            ensure_run(run_root, **job)  # refuses a finished run that the current settings would not give
        else:
            missing[d] = dict(job, run_root=run_root)
    train_missing(missing, ensure_run, executor or LocalExecutor(workers), progress_bar=progress_bar)
    return dirs


def diverged(run: Path) -> bool:
    """Whether the run stopped because a task's training loss became non-finite."""
    progress = Path(run) / "progress.json"
    return progress.exists() and files.read_json(progress).get("diverged") is not None


# criterion -> (its score in metrics.json["validation"], its column in the selection table, the best end,
# its name in messages)
CRITERIA = {"nll": ("mean_patch_nll", "mean_val_nll", min, "validation NLL"),
            "synthetic": ("mean_synthetic_auroc", "mean_val_synthetic_auroc", max,
                          "validation synthetic-defect AUROC")}


def select(run_root, method: str, grid: dict[str, list[str]] | None = None, *, candidates: dict | None = None,
           data: str = "embedded", tasks=None, profile: str = "cpu", seed: int = 0, sets: dict | None = None,
           val_fraction: float = 0.1, workers: int = 2, criterion: str = "nll",
           executor=None) -> tuple[dict, list[dict]]:
    """Run every combination of ``grid`` ({key: [values]}) -- or the named ``candidates``
    ({name: {key: value}}, e.g. a bundle of settings against the profile as it is, ``{}``) -- with
    ``val_fraction`` of each task's train/good images held out, and choose by a validation score of
    those images (``train.validation_scores``):
    ``nll`` -- the lowest mean patch NLL (settings that model the same flow input), or
    ``synthetic`` -- the highest mean AUROC against synthetic defects (settings that change the input).

    Only validation scores are read: the candidate runs' test metrics play no part. A candidate whose
    score is not finite (a diverged run) is never chosen. The runs train with ``executor`` (default:
    ``workers`` local processes). Returns (chosen row, all rows).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    key, column, best_of, _ = CRITERIA[criterion]
    if (grid is None) == (candidates is None):
        raise ValueError("select needs either a grid or named candidates")
    if grid is not None:
        named = [(None, dict(zip(grid, values))) for values in itertools.product(*grid.values())]
    else:
        named = list(candidates.items())
    jobs = [dict(method=method, data=data, tasks=tasks, profile=profile, seed=seed,
                 sets={**(sets or {}), **candidate, "val_fraction": val_fraction}) for _, candidate in named]
    keys = list(dict.fromkeys(k for _, candidate in named for k in candidate))  # a missing key: the profile's
    try:
        outs = ensure_runs(run_root, jobs, workers, executor=executor)
    except RunsFailed as err:  # a diverged candidate is a result (never chosen); any other failure is not
        if not all(diverged(d) for d in err.failures):
            raise
        outs = [run_dir(run_root, **job) for job in jobs]
    rows = []
    for (name, candidate), out in zip(named, outs):
        validation = {} if diverged(out) else (load_metrics(out)["validation"] or {})
        rows.append({**({"candidate": name} if name is not None else {}), **{k: candidate.get(k) for k in keys},
                     **{col: validation.get(score) for score, col, *_ in CRITERIA.values()}, "run": str(out)})
    finite = [r for r in rows if r[column] is not None and np.isfinite(r[column])]
    if not finite:
        raise ValueError(f"no candidate of {grid} has a finite {key} (diverged, or a run from before "
                         f"the kit recorded it: delete those runs under {run_root} and select again)")
    best = best_of(finite, key=lambda r: r[column])
    for row in rows:
        row["chosen"] = row is best
    return best, rows


def sweep_jobs(methods: list[str], seeds: list[int], grid: dict[str, list[str]] | None = None, *,
               data: str = "embedded", tasks=None, profile: str = "cpu", sets: dict | None = None) -> list[dict]:
    """``ensure_run`` keywords of every method x seed x combination of ``grid`` ({key: [values]}) on
    top of ``sets``. The overrides are kept as the config types them, less what the profile already
    has, so that a run is named (``run_dir``) as a notebook's run of the same settings is."""
    grid = grid or {}
    jobs = []
    for values in itertools.product(*grid.values()):
        changes = {**(sets or {}), **dict(zip(grid, values))}
        config = make_config(profile, {k: str(v) for k, v in changes.items()})  # a bad key or value fails here
        typed = profile_sets(profile, {k: getattr(config, k) for k in changes})
        jobs += [dict(method=method, data=data, tasks=tasks, profile=profile, seed=seed, sets=typed)
                 for method in methods for seed in seeds]
    return jobs


def save_selection(run_root, data: str, method: str, names: list[str], rows: list[dict]) -> tuple[Path, str]:
    """Write a selection's rows to ``ROOT/<data>/selection-<method>-<names>.csv``; (path, printable table)."""
    table = pd.DataFrame(rows)
    target = Path(run_root) / data_tag(data) / f"selection-{method}-{'-'.join(names)}.csv"
    files.write_text(target, table.to_csv(index=False))
    return target, table.drop(columns="run").to_string(index=False)
