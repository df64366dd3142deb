"""Reading finished runs: the results table, and scoring new images with a saved run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import cm
from PIL import Image

from . import files
from .config import Config
from .features import load_batch
from .learners import make_learner
from .scoring import image_score, pixel_maps
from .train import RunError, build_extractor, resolve_device


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def load_metrics(run_dir) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise RunError(f"{path} does not exist: the run has not finished (resume it with --resume)")
    return files.read_json(path)


def format_report(run_dirs, per_task: bool = False) -> str:
    """A Markdown table: one row per run (mean final metrics, forgetting, cost)."""
    header = ["run", "method", "tasks", "I-AUROC", "P-AUROC", "P-AP", "FM (I)", "BWT (I)", "routing",
              "params/task", "train s"]
    rows = []
    notes = []
    for run_dir in run_dirs:
        m = load_metrics(run_dir)
        seconds = sum(m["seconds"]["train"].values())
        rows.append([Path(run_dir).name, m["method"], str(len(m["tasks"])), _fmt(m["mean"]["image_auroc"]),
                     _fmt(m["mean"]["pixel_auroc"]), _fmt(m["mean"]["pixel_ap"]),
                     _fmt(m["forgetting"]["image_auroc"]), _fmt(m["bwt"]["image_auroc"]),
                     _fmt(m["routing_accuracy"]), f"{m['params']['per_task']:,}", f"{seconds:.0f}"])
        if m.get("breaks_no_replay"):
            notes.append(f"{Path(run_dir).name}: replay stores earlier tasks' features: it breaks the no-replay rule.")
        if not m.get("continual", True):
            why = {"joint": "it trains one flow on all tasks at once",
                   "padim": "it keeps one Gaussian model per task and is given the task id"}.get(m["method"], "")
            notes.append(f"{Path(run_dir).name}: {m['method']} is a reference, not continual: {why}.")
        if per_task:
            by_defect = m.get("final_by_defect") or {}
            for task, values in m["final"].items():
                rows.append(["", f"  {task}", "", _fmt(values["image_auroc"]), _fmt(values["pixel_auroc"]),
                             _fmt(values["pixel_ap"]), "", "", "", "", ""])
                if len(by_defect.get(task, {})) > 1:  # good against each defect type alone
                    rows += [["", f"    {kind}", "", _fmt(v), "", "", "", "", "", "", ""]
                             for kind, v in by_defect[task].items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    table = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    return "\n".join(table + [""] + notes)


def load_run(run_dir):
    """(config, extractor, learner, device) of a run directory, from its config and latest checkpoint."""
    run_dir = Path(run_dir)
    for needed in ("config.json", "progress.json"):
        if not (run_dir / needed).exists():
            raise RunError(f"{run_dir / needed} does not exist: is {run_dir} a run directory?")
    meta = files.read_json(run_dir / "config.json")
    progress = files.read_json(run_dir / "progress.json")
    config = Config(**meta["config"])
    device = resolve_device(config.device)
    extractor = build_extractor(config).to(device)
    learner = make_learner(meta["method"], config, extractor.dim, device)
    learner.load_state_dict(torch.load(run_dir / "checkpoints" / progress["resume_file"],
                                       map_location=device, weights_only=False))
    return config, extractor, learner, device


def score_images(run_dir, images, out_dir=None):
    """Route and score each image; write its anomaly map as a PNG. Yields one line per image."""
    config, extractor, learner, device = load_run(run_dir)
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "scores"
    out_dir.mkdir(parents=True, exist_ok=True)
    yield "image\ttask\tscore\tmap"
    for path in map(Path, images):
        patch, pooled = extractor(load_batch([path], config.image_size, config.image_resize).to(device))
        task = learner.route(pooled.cpu())[0] if learner.uses_router else "shared"
        nll = learner.patch_nll(task, patch.cpu())
        score = image_score(nll, mode=config.score_mode, k=config.score_k).item()
        amap = pixel_maps(nll, config, config.image_size)[0].numpy()
        norm = (amap - amap.min()) / max(float(np.ptp(amap)), 1e-12)
        target = out_dir / f"{path.stem}_map.png"
        Image.fromarray((cm.inferno(norm)[..., :3] * 255).astype(np.uint8)).save(target)
        yield f"{path}\t{task}\t{score:.4f}\t{target}"
