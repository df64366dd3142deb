"""Reading runs: the results table, and scoring new images with a saved run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib import cm
from PIL import Image

from . import files
from .config import Config
from .data import DataError, verified_size
from .features import load_batch
from .learners import SHARED, make_learner
from .learners.baselines import PaDiMReference
from .scoring import image_score, pixel_maps
from .train import METRICS, RunError, build_extractor, is_run_dir, resolve_device


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def load_metrics(run_dir) -> dict:
    """A finished run's metrics.json; RunError saying what ``run_dir`` is when it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} does not exist (expected a run directory)")
    if not is_run_dir(run_dir):
        raise RunError(f"{run_dir} is not a run of this kit (no readable config.json)")
    if not path.exists():
        raise RunError(f"{run_dir} has not finished: no metrics.json yet (continue it with run ... --resume)")
    try:
        return files.read_json(path)
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is damaged ({err}); delete it and finish the run with --resume") from None


def _mean_cell(metrics: dict, metric: str) -> str:
    """The mean over tasks, marked "(k/T)" when k < T tasks have the metric (no masks for the others)."""
    value = _fmt(metrics["mean"].get(metric))
    over, total = (metrics.get("mean_over") or {}).get(metric), len(metrics["tasks"])
    return value if over is None or over in (0, total) else f"{value} ({over}/{total})"


def _metric_cells(values: dict) -> list[str]:
    return [_fmt(values.get(k)) for k in METRICS]


def format_report(run_dirs, per_task: bool = False) -> str:
    """A Markdown table: one row per finished run (mean final metrics, forgetting, cost); a run that is
    not finished or not readable gets a note instead of a row."""
    header = ["run", "method", "tasks", "I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO", "FM (I)", "BWT (I)",
              "routing", "params/task", "train s"]
    blank = [""] * (len(header) - 4)
    rows, notes = [], []
    for run_dir in run_dirs:
        try:
            m = load_metrics(run_dir)
        except RunError as err:
            notes.append(f"{Path(run_dir).name}: not in the table: {err}")
            continue
        seconds = sum(m["seconds"]["train"].values())
        classes = m.get("task_classes") or {t: [t] for t in m["tasks"]}
        n_classes = sum(len(c) for c in classes.values())
        count = str(len(m["tasks"])) + (f" ({n_classes} classes)" if n_classes > len(m["tasks"]) else "")
        routing = _fmt(m["routing_accuracy"])
        if m.get("class_routing_accuracy") is not None:
            routing += f" (class {_fmt(m['class_routing_accuracy'])})"
        rows.append([Path(run_dir).name, m["method"], count] +
                     [_mean_cell(m, k) for k in METRICS] +
                     [_fmt(m["forgetting"]["image_auroc"]), _fmt(m["bwt"]["image_auroc"]), routing,
                      f"{m['params']['per_task']:,}", f"{seconds:.0f}"])
        if m.get("breaks_no_replay"):
            notes.append(f"{Path(run_dir).name}: replay stores earlier tasks' features: it breaks the no-replay rule.")
        if not m.get("continual", True):
            why = {"joint": "it trains one flow on all tasks at once",
                   "padim": "it keeps one Gaussian model per task and is given the task id"}.get(m["method"], "")
            notes.append(f"{Path(run_dir).name}: {m['method']} is a reference, not continual: {why}.")
        if any(0 < m.get("mean_over", {}).get(k, len(m["tasks"])) < len(m["tasks"]) for k in METRICS):
            notes.append(f"{Path(run_dir).name}: (k/T) marks a mean over the k of T tasks that have the metric "
                         "(the others lack masks).")
        if per_task:
            by_defect = m.get("final_by_defect") or {}
            by_class = m.get("final_by_class") or {}
            for task, values in m["final"].items():
                members = classes.get(task, [task])
                rows.append(["", f"  {task}", ""] + _metric_cells(values) + blank[:-1])
                for name in members:
                    if len(members) > 1:  # a task of several classes: each class's own results below it
                        rows.append(["", f"    {name}", ""] + _metric_cells(by_class.get(name, {})) + blank[:-1])
                    if len(by_defect.get(name, {})) > 1:  # good against each defect type alone
                        rows += [["", f"    {'  ' * (len(members) > 1)}{kind}", "", _fmt(v)] + blank
                                 for kind, v in by_defect[name].items()]
    if not rows:
        raise RunError("no finished run to report: " + "; ".join(notes))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    table = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    return "\n".join(table + [""] + notes)


def report_is_complete(run_dirs) -> bool:
    """Whether every run of a report is finished (the CLI exits non-zero otherwise)."""
    return all((Path(d) / "metrics.json").exists() for d in run_dirs)


def load_run(run_dir, *, allow_partial: bool = False):
    """(config, extractor, learner, device) of a run directory, from its config and latest checkpoint.
    An unfinished run is refused unless ``allow_partial`` (its learned tasks only)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir) or not (run_dir / "progress.json").exists():
        raise RunError(f"{run_dir} is not a run of this kit with a finished task (no config.json or progress.json)")
    meta = files.read_json(run_dir / "config.json")
    progress = files.read_json(run_dir / "progress.json")
    if not progress.get("resume_file"):
        raise RunError(f"{run_dir} has no finished task yet: nothing to score with")
    if progress["done"] < len(meta["tasks"]) and not allow_partial:
        learned = meta["tasks"][:progress["done"]]
        raise RunError(f"{run_dir} has not finished: it learned {len(learned)} of {len(meta['tasks'])} tasks "
                       f"({', '.join(learned)}); finish it with --resume, or pass --allow-partial to route among those")
    config = Config(**meta["config"])
    device = resolve_device(config.device)
    extractor = build_extractor(config).to(device)
    learner = make_learner(meta["method"], config, extractor.dim, device)
    learner.load_state_dict(torch.load(run_dir / "checkpoints" / progress["resume_file"],
                                       map_location=device, weights_only=False))
    return config, extractor, learner, device


def map_targets(images: list[Path], out_dir: Path) -> list[Path]:
    """One anomaly-map path per image that no two images share: the image's path relative to the
    images' common folder, with ``_map.png`` for its suffix."""
    images = [Path(p).resolve() for p in images]
    parents = [p.parent for p in images]
    common = parents[0] if len(set(parents)) == 1 else Path(*_common_parts([p.parts for p in parents]))
    return [out_dir / p.relative_to(common).with_name(f"{p.stem}_map.png") for p in images]


def _common_parts(parts: list[tuple]) -> tuple:
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return tuple(common)


def score_images(run_dir, images, out_dir=None, *, allow_partial: bool = False, overwrite: bool = False):
    """Route and score each image and write its anomaly map. Yields one record per image: image, task
    (the routed task, or "unknown" when the image lies beyond every task's accepted distance), nearest
    (the nearest task, which scores it either way), distance (to that task's prototype), score, map --
    or image and error for an image that cannot be read (the others are still scored)."""
    config, extractor, learner, device = load_run(run_dir, allow_partial=allow_partial)
    if isinstance(learner, PaDiMReference):
        raise RunError(f"{run_dir} is a padim run: it scores with a given task id, which `score` does not take")
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "scores"
    images = [Path(p) for p in images]
    targets = map_targets(images, out_dir)
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise RunError(f"{len(existing)} anomaly map(s) already exist, e.g. {existing[0]}; choose another --out "
                       "or pass --overwrite")
    for path, target in zip(images, targets):
        try:
            verified_size(path)
            batch = load_batch([path], config.image_size, config.image_resize)
        except (DataError, OSError) as err:
            yield {"image": str(path), "error": str(err)}
            continue
        patch, pooled = extractor(batch.to(device))
        if learner.uses_router:
            decision = learner.router.route_or_unknown(pooled.cpu())[0]
        else:  # one shared flow
            decision = {"task": SHARED, "nearest": SHARED, "distance": None}
        nll = learner.patch_nll(decision["nearest"], patch.cpu())  # an unknown image is scored by its nearest task
        score = image_score(nll, mode=config.score_mode, k=config.score_k).item()
        amap = pixel_maps(nll, config, config.image_size)[0].numpy()
        norm = (amap - amap.min()) / max(float(np.ptp(amap)), 1e-12)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((cm.inferno(norm)[..., :3] * 255).astype(np.uint8)).save(target)
        yield {"image": str(path), **decision, "score": score, "map": str(target)}


def score_lines(records, as_json: bool = False):
    """Tab-separated lines (a header first) or JSON lines of ``score_images`` records."""
    if not as_json:
        yield "image\ttask\tnearest\tdistance\tscore\tmap"
    for record in records:
        if as_json:
            yield json.dumps(record)
        elif "error" in record:
            yield f"{record['image']}\t-\t-\t-\t-\terror: {record['error']}"
        else:
            distance = "n/a" if record["distance"] is None else f"{record['distance']:.3f}"
            yield (f"{record['image']}\t{record['task']}\t{record['nearest']}\t{distance}\t{record['score']:.4f}\t"
                   f"{record['map']}")
