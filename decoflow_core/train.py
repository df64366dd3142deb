"""Training: ``fit``, the optimisation loop, and the continual protocol (Sec. 3.1, 4.1): tasks arrive
one at a time, no earlier data is kept, and no task id is given at inference (the router chooses).

A task is one class or several (``scenarios.py``); it trains once on the union of its classes. After
training task i the learner is evaluated on every class of every task j <= i; a task's cell of the
R[i][j] matrices (image AUROC and AP, pixel AUROC and AP, AUPRO) is the mean over its classes, and
``final_by_class`` keeps the classes' own results. A run directory receives ``config.json``,
``metrics.json``, the matrices as CSV, ``routing_confusion.csv`` and ``checkpoints/``. Progress is
committed after every task (``progress.json``, written last and atomically), so a killed run
restarted with ``resume=True`` continues after the last finished task and ends with the same results.
"""
from __future__ import annotations

import hashlib
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
from tqdm.auto import tqdm

from . import files
from .backbone import FeatureExtractor
from .config import Config, as_dict, changed_fields, validate
from .data import Category, list_categories, load_category, load_image, mask_for, validate_tree
from .datasets.synthetic import synthetic_defects
from .features import array_features, extract_features, pooled_key
from .learners import METHODS, Learner, make_learner
from .losses import training_loss
from .metrics import backward_transfer, forgetting, image_ap, image_auroc, image_auroc_by_type, pixel_metrics
from .optim import AdamP
from .router import UNKNOWN
from .scenarios import StreamError, task_name, task_stream
from .scoring import image_score, pixel_maps

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")
REPO = Path(__file__).resolve().parents[1]


def epoch_lr(config: Config, epoch: int, *, first: bool) -> float:
    """The learning rate of ``epoch`` (0-based). A task after the first warms up linearly over
    ``warmup_epochs`` (lr (e + 1) / warmup), then follows the schedule from its start: constant, or
    cosine from lr to lr_min_ratio * lr over ``epochs`` epochs (as torch's CosineAnnealingLR with
    T_max = epochs stepped once per epoch; the official code starts it after the warm-up, so a
    later task's last epoch stops short of the minimum)."""
    warmup = 0 if first else config.warmup_epochs
    if epoch < warmup:
        return config.lr * (epoch + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")
    low = config.lr_min_ratio * config.lr
    return low + (config.lr - low) * (1 + math.cos(math.pi * (epoch - warmup) / config.epochs)) / 2


DROP_LAST_FROM = 32  # the official loader drops the last partial batch from 32 training images on


def fit(model: torch.nn.Module, params: list, patches: torch.Tensor, config: Config, *, seed: int,
        penalty=None, replay: torch.Tensor | None = None, desc: str = "train", loss_fn=None,
        first: bool = True) -> dict:
    """Train ``params`` with AdamP for ``config.epochs`` epochs on patch features (N, D, H, W).

    ``loss_fn(model, x)`` defaults to the flow's ``training_loss``. The lr follows ``epoch_lr``
    (``first``: the model's first task, no warm-up); gradients are clipped to ``grad_clip``. Every
    epoch runs to the end: no epoch is chosen by any score. A non-finite loss stops training with
    TrainingDiverged (``on_nonfinite="skip"``: skips its step and is counted, as the official code does);
    a loss above ``skip_loss_above`` skips its step and is counted.
    Returns {"loss": [mean loss per epoch], "nonfinite": count, "skipped": count}.
    """
    loss_fn = loss_fn or (lambda m, x: training_loss(m, x, config))
    device = next(model.parameters()).device
    optimizer = AdamP(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    drop_last = config.drop_last and len(patches) >= DROP_LAST_FROM
    model.train()
    history, nonfinite, skipped = [], 0, 0
    for epoch in tqdm(range(config.epochs), desc=desc, unit="epoch", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config, epoch, first=first)
        losses = []
        for idx in torch.randperm(len(patches), generator=generator).split(config.batch_size):
            if drop_last and len(idx) < config.batch_size:
                continue
            x = patches[idx]
            if replay is not None and len(replay):
                pick = torch.randint(len(replay), (max(1, len(idx) // 2),), generator=generator)
                x = torch.cat([x, replay[pick]])
            loss = loss_fn(model, x.to(device))
            if penalty is not None:
                loss = loss + penalty()
            if not torch.isfinite(loss):
                if config.on_nonfinite == "stop":
                    raise TrainingDiverged(epoch, optimizer.param_groups[0]["lr"], loss.item())
                nonfinite += 1
                continue
            if config.skip_loss_above is not None and loss.item() > config.skip_loss_above:
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
        history.append(sum(losses) / max(1, len(losses)))
    model.eval()
    return {"loss": history, "nonfinite": nonfinite, "skipped": skipped}


def learn(learner: Learner, task: str, features: dict, *, seed: int) -> dict:
    """One task: the learner's plan, ``fit``, then whatever the learner does after training."""
    plan = learner.prepare_task(task, features, seed=seed)
    log = {"loss": [], "nonfinite": 0, "skipped": 0}
    if plan is not None:
        log = fit(plan.model, plan.params, features["patch"], plan.config, seed=seed, penalty=plan.penalty,
                  replay=plan.replay, desc=task, loss_fn=plan.loss_fn, first=plan.first)
    learner.finish_task(task, features, seed=seed)
    return log


class RunError(ValueError):
    """A run cannot start or resume; the message says why."""


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite (NaN or infinite)."""

    def __init__(self, epoch: int, lr: float, loss: float):
        super().__init__(f"the loss became {loss} in epoch {epoch + 1} at lr {lr:g}")
        self.epoch, self.lr, self.loss = epoch, lr, loss


# what a run that stopped on a diverged task may change when it is resumed: how the next tasks train
RETRY_FIELDS = ("lr", "task_lr", "independent_lr", "grad_clip", "weight_decay", "lr_schedule", "warmup_epochs",
                "on_nonfinite", "skip_loss_above", "num_threads", "device")


@dataclass
class TaskData:
    name: str
    category: Category
    train: dict  # {"patch": (N, D, g, g), "pooled": (N, G)}
    test: dict
    val: dict | None  # train/good images held out by ``config.val_fraction`` (never trained on)
    synthetic: dict | None  # synthetic defects made from the held-out images (None without them)
    labels: np.ndarray  # (M,) 0 good / 1 defect
    masks: np.ndarray | None  # (M, S, S) bool at eval_size, None when the category lacks masks


def with_router_feature(data: TaskData, router_feature: str) -> TaskData:
    """``data`` whose "pooled" features are ``router_feature``'s (every features dict holds them all)."""
    swap = lambda feats: None if feats is None else {**feats, "pooled": feats[pooled_key(router_feature)]}
    return replace(data, train=swap(data.train), test=swap(data.test), val=swap(data.val),
                   synthetic=swap(data.synthetic))


def resolve_device(name: str) -> str:
    """``auto``: the GPU when there is one. Asking for a device this machine lacks is a RunError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--set device={name}: no CUDA GPU is available here; use device=cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RunError("--set device=mps: Apple's MPS is not available here; use device=cpu or auto")
    return name


def build_extractor(config: Config) -> FeatureExtractor:
    return FeatureExtractor(backbone=config.backbone, weights=config.backbone_weights, grid=config.grid,
                            feature_dim=config.feature_dim, positional_encoding=config.positional_encoding,
                            pe_scale=config.pe_scale, aggregation=config.aggregation,
                            router_feature=config.router_feature, pe_order=config.pe_order)


def load_task(root: Path, name: str, extractor: FeatureExtractor, config: Config, device: str, *,
              seed: int = 0) -> TaskData:
    category = load_category(root, name)
    cache = config.feature_cache
    if cache and not Path(cache).is_absolute():
        cache = REPO / cache  # the kit's data/cache from any working directory (papermill runs in notebooks/)
    common = dict(image_size=config.image_size, resize=config.image_resize, cache_dir=cache, device=device)
    train = extract_features(extractor, category.train, desc=f"{name} train", **common)
    test = extract_features(extractor, [s.path for s in category.test], desc=f"{name} test", **common)
    labels = np.array([s.label for s in category.test])
    masks = (np.stack([mask_for(s, config.eval_size) for s in category.test]) if category.has_masks else None)
    train, val = hold_out(train, config.val_fraction, seed=seed)
    synthetic = None
    if val is not None and len(val["index"]) >= 2:
        images = [load_image(category.train[i], config.image_size, config.image_resize) for i in val["index"].tolist()]
        synthetic = array_features(extractor, synthetic_defects(images, seed=seed), device=device)
    return TaskData(name, category, train, test, val, synthetic, labels, masks)


def hold_out(features: dict, fraction: float, *, seed: int) -> tuple[dict, dict | None]:
    """Split train/good features into (train, validation): round(fraction * N) images, at least
    one and at most N - 2, drawn with ``seed``; ``val["index"]`` says which. ``fraction`` 0 keeps
    everything for training."""
    if not 0.0 <= fraction < 1.0:
        raise RunError(f"val_fraction must be in [0, 1), got {fraction}")
    n = len(features["patch"])
    if fraction == 0.0:
        return features, None
    k = min(max(1, round(fraction * n)), n - 2)
    if k < 1:
        raise RunError(f"val_fraction={fraction}: {n} training images are too few to hold any out")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, keep = order[:k].sort().values, order[k:].sort().values
    split = lambda idx: {key: v[idx] if torch.is_tensor(v) else v for key, v in features.items()}
    return split(keep), {**split(val), "index": val}


def validation_scores(learner: Learner, data: TaskData, config: Config, task: str | None = None) -> dict | None:
    """Scores of the task's held-out train/good images with its own parameters (the true task id) --
    the only scores the kit may select settings by: ``patch_nll``, the mean patch NLL per feature
    dimension, and ``synthetic_auroc``, the image AUROC of those images against synthetic defects made
    from them (``synthetic.py``; None with fewer than two held-out images). ``task``: the task the
    class ``data`` belongs to (default: its own name)."""
    if data.val is None:
        return None
    task = task or data.name
    nll = learner.patch_nll(task, data.val["patch"])
    scores = {"patch_nll": float(nll.mean()) / data.val["patch"].shape[1], "synthetic_auroc": None}
    if data.synthetic is not None:
        good = image_score(nll, mode=config.score_mode, k=config.score_k).numpy()
        bad = image_score(learner.patch_nll(task, data.synthetic["patch"]), mode=config.score_mode,
                          k=config.score_k).numpy()
        scores["synthetic_auroc"] = image_auroc(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])
    return scores


def evaluate_task(learner: Learner, data: TaskData, config: Config, *, oracle: bool = False,
                  cache: dict | None = None, task: str | None = None) -> dict:
    """Score one class's test set (``task``: the task it belongs to, default its own name).
    Task-agnostic: the router picks the adapters for every image; ``oracle=True`` (or
    ``config.task_agnostic=False``) gives the true task id instead.

    ``cache`` (only for a learner whose learned tasks never change, ``learner.isolated``) keeps each
    result by task and routing: the same images sent to the same unchanged parameters give the same
    scores, so a later evaluation with the same routing reuses them instead of recomputing."""
    task = task or data.name
    nearest = None  # the nearest class prototype of every image, when the router has them
    if learner.uses_router and config.task_agnostic and not oracle and config.router_prototypes == "class":
        nearest = learner.router.nearest_prototypes(data.test["pooled"])
        routed = [learner.router.owner(n) for n in nearest]
    elif learner.uses_router and config.task_agnostic and not oracle:
        routed = learner.route(data.test["pooled"])
    else:  # the oracle task id, or a one-flow method that has nothing to route
        routed = [task] * len(data.labels)
    key = (data.name, tuple(routed))
    if cache is not None and key in cache:
        return {**cache[key], "nearest": nearest, "unknown": unknown_shares(learner, data)}
    nll = torch.empty(data.test["patch"].shape[0], *data.test["patch"].shape[2:])
    for chosen in sorted(set(routed)):
        idx = torch.tensor([i for i, r in enumerate(routed) if r == chosen])
        nll[idx] = learner.patch_nll(chosen, data.test["patch"][idx])
    scores = image_score(nll, mode=config.score_mode, k=config.score_k)
    result = {"image_auroc": image_auroc(data.labels, scores.numpy()), "image_ap": image_ap(data.labels, scores.numpy()),
              "pixel_auroc": float("nan"), "pixel_ap": float("nan"), "aupro": float("nan"), "routed": routed,
              "by_defect": image_auroc_by_type([s.defect_type for s in data.category.test], scores.numpy())}
    if data.masks is not None:
        maps = pixel_maps(nll, config).numpy()
        result.update(pixel_metrics(data.masks, maps))
    if cache is not None:
        cache[key] = result
    return {**result, "nearest": nearest, "unknown": unknown_shares(learner, data)}  # changes with every new task


def unknown_shares(learner: Learner, data: TaskData) -> dict | None:
    """Shares of the task's good and defective test images (and held-out train/good images, when there
    are any) that the router calls unknown: beyond every task's acceptance threshold. An unknown image is
    still scored with its nearest task: detection metrics do not change."""
    if learner.router is None:
        return None
    unknown = np.array([d["task"] == UNKNOWN for d in learner.router.route_or_unknown(data.test["pooled"])])
    shares = {"good": float(unknown[data.labels == 0].mean()) if (data.labels == 0).any() else None,
              "defect": float(unknown[data.labels == 1].mean()) if (data.labels == 1).any() else None,
              "held_out_good": None}
    if data.val is not None:  # the false-rejection rate on good images the router never saw
        shares["held_out_good"] = float(np.mean([d["task"] == UNKNOWN for d in
                                                 learner.router.route_or_unknown(data.val["pooled"])]))
    return shares


def run_metadata(config: Config, extractor: FeatureExtractor, method: str, tasks: list[str],
                 data_root: Path, seed: int) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"method": method, "tasks": tasks, "seed": seed, "data": str(data_root),
            "config": as_dict(config), "backbone": extractor.backbone_name,
            "weight_source": extractor.weight_source, "feature_dim": extractor.dim,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "timm": timm.__version__}, "git_commit": commit,
            "breaks_no_replay": method == "replay", "continual": method not in ("joint", "padim")}


def _matrix_csv(matrix: np.ndarray, tasks: list[str], row_label: str) -> str:
    lines = [",".join([row_label] + tasks)]
    for name, row in zip(tasks, matrix):
        lines.append(",".join([name] + ["" if np.isnan(v) else f"{v:.6f}" for v in row]))
    return "\n".join(lines) + "\n"


def _nan_to_none(value: float):
    return None if value is None or np.isnan(value) else float(value)


def _recorded(result: dict) -> dict:
    return {m: _nan_to_none(result.get(m)) for m in METRICS}


def matrices_from_rows(rows: list, tasks: list[str], classes_of: dict) -> dict:
    """R matrices over tasks from rows of per-class results: a task's cell is the mean over its classes."""
    T = len(tasks)
    matrices = {m: np.full((T, T), np.nan) for m in METRICS}
    for i, row in enumerate(rows):
        for j, task in enumerate(tasks):
            results = [row[c] for c in classes_of[task] if c in (row or {})]
            for m in METRICS:
                values = [r[m] for r in results if r.get(m) is not None]
                if values:
                    matrices[m][i, j] = np.mean(values)
    return matrices


def _by_class(rows: list) -> tuple[dict, dict]:
    """(final result per class, mean over classes) from the last recorded row."""
    last = next((row for row in reversed(rows) if row), {})
    final = {c: {m: result.get(m) for m in METRICS} for c, result in last.items()}
    mean = {m: (float(np.mean(values)) if values else None) for m in METRICS
            for values in [[r[m] for r in final.values() if r[m] is not None]]}
    return final, mean


def _scores(matrices: dict, tasks: list[str], continual: bool) -> dict:
    """final, mean, forgetting and bwt of R matrices (final row = after the last task)."""
    last = len(tasks) - 1
    final = {t: {m: _nan_to_none(matrices[m][last, j]) for m in METRICS} for j, t in enumerate(tasks)}
    mean = {m: _nan_to_none(np.nanmean(matrices[m][last])) if not np.isnan(matrices[m][last]).all() else None
            for m in METRICS}
    mean_over = {m: int((~np.isnan(matrices[m][last])).sum()) for m in METRICS}  # tasks behind each mean
    fm = {m: _nan_to_none(forgetting(matrices[m])) if continual else None for m in METRICS}
    bwt = {m: _nan_to_none(backward_transfer(matrices[m])) if continual else None for m in METRICS}
    return {"final": final, "mean": mean, "mean_over": mean_over, "forgetting": fm, "bwt": bwt}


def summarise(progress: dict, meta: dict, learner: Learner) -> dict:
    """metrics.json from the recorded rows (see the module docstring for R). A routed run also gets
    ``oracle``: the same scores with the true task id given (for comparison only)."""
    tasks = meta["tasks"]
    classes_of = meta.get("task_classes") or {t: [t] for t in tasks}
    owner = {c: t for t, members in classes_of.items() for c in members}
    T = len(tasks)
    matrices = matrices_from_rows(progress["rows"], tasks, classes_of)
    continual = meta["continual"]
    scores = _scores(matrices, tasks, continual)
    final_by_class, mean_by_class = _by_class(progress["rows"])
    oracle_rows = progress.get("oracle_rows") or []
    oracle = None
    if any(oracle_rows):
        oracle = {**_scores(matrices_from_rows(oracle_rows, tasks, classes_of), tasks, continual),
                  "mean_by_class": _by_class(oracle_rows)[1]}
    confusion = np.zeros((T, T), dtype=int)
    routing = class_routing = None
    if learner.uses_router and meta["config"]["task_agnostic"]:
        for c, routed in progress["final_routing"].items():
            for r in routed:
                confusion[tasks.index(owner[c]), tasks.index(r)] += 1
        routing = float(np.trace(confusion) / confusion.sum())
        nearest = progress.get("final_nearest") or {}
        if nearest and all(v is not None for v in nearest.values()):  # class prototypes: the class-level accuracy
            class_routing = float(np.mean([n == c for c, names in nearest.items() for n in names]))
    validation = progress.get("validation")
    if validation:
        synthetic = progress.get("synthetic_auroc") or {}
        validation = {"patch_nll": validation, "mean_patch_nll": float(np.mean(list(validation.values()))),
                      "synthetic_auroc": synthetic or None, "mean_synthetic_auroc": None}
        if synthetic and None not in synthetic.values():
            validation["mean_synthetic_auroc"] = float(np.mean(list(synthetic.values())))
    elsewhere = ({c: float(np.mean([r != owner[c] for r in routed])) for c, routed in progress["final_routing"].items()}
                 if routing is not None else None)
    return {"method": meta["method"], "tasks": tasks, "task_classes": classes_of, **scores,
            "final_by_class": final_by_class, "mean_by_class": mean_by_class, "oracle": oracle,
            "routing_accuracy": routing, "class_routing_accuracy": class_routing,
            "routed_elsewhere": elsewhere, "unknown": progress.get("final_unknown") if routing is not None else None,
            "validation": validation, "final_by_defect": progress.get("final_by_defect"),
            "params": learner.params(), "seconds": progress["seconds"], "history": progress["history"],
            "breaks_no_replay": meta["breaks_no_replay"], "continual": continual,
            "backbone": meta["backbone"], "weight_source": meta["weight_source"],
            "_matrices": matrices, "_confusion": confusion}


def write_results(out: Path, summary: dict) -> dict:
    matrices, confusion = summary.pop("_matrices"), summary.pop("_confusion")
    tasks = summary["tasks"]
    for m in METRICS:
        files.write_text(out / f"matrix_{m}.csv", _matrix_csv(matrices[m], tasks, "after\\tested"))
    if summary["routing_accuracy"] is not None:  # only routed, task-agnostic runs have a confusion matrix
        files.write_text(out / "routing_confusion.csv", _matrix_csv(confusion.astype(float), tasks, "true\\routed"))
    files.write_json(out / "metrics.json", summary)
    return summary


def _save_checkpoints(out: Path, learner: Learner, step: int, task: str) -> str:
    ckpt = out / "checkpoints"
    state = learner.state_dict()
    if "base" in state:  # decoflow: the shared base once, then one small file per task
        if step == 0:
            files.write_torch(ckpt / "base.pt", state["base"])
        files.write_torch(ckpt / f"task_{step:02d}_{task}.pt", state["tasks"][task])
    elif "models" in state:  # independent: a whole flow per task
        files.write_torch(ckpt / f"task_{step:02d}_{task}.pt", state["models"][task])
    name = f"resume_{step:02d}.pt"
    files.write_torch(ckpt / name, state)
    return name


def pixel_metric_notes(summaries: list[dict]) -> list[str]:
    """One note per task whose pixel metrics cannot be computed (defect images without masks)."""
    notes = []
    for summary in summaries:
        if summary["masks"] == "all":
            continue
        folders = summary.get("missing_mask_folders") or []
        why = (f"no masks for {', '.join(f.name for f in folders)} ({', '.join(f'{f}/' for f in folders)} missing)"
               if folders else f"masks for {'some' if summary['masks'] == 'partial' else 'none'} of its defect images")
        notes.append(f"task {summary['category']!r}: {why}: its pixel AUROC and pixel AP are not computed, and "
                     "the mean pixel metrics are over the other tasks")
    return notes


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run of this kit (its config.json)."""
    try:
        meta = files.read_json(Path(path) / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"method", "tasks", "config"} <= set(meta)


def check_out(out: Path, resume: bool) -> None:
    """``--out`` must be a new or empty folder, or -- with ``resume`` -- a run of this kit, and writable."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; expected a folder for the run (new, empty, or a run to --resume)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not is_run_dir(out):
        raise RunError(f"--out {out} is not empty and is not a run of this kit (it holds "
                       f"{', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); choose a new or empty folder")
    if held and not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"--out {out}: cannot write there ({err.strerror}); choose a folder you can write to") from None


def data_fingerprint(root: Path, tasks: list[str]) -> dict:
    """{task: SHA-1 over the relative path and the bytes of every file the task reads}."""
    prints = {}
    for task in tasks:
        category = load_category(root, task)
        paths = list(category.train) + [s.path for s in category.test] + [s.mask_path for s in category.test
                                                                            if s.mask_path is not None]
        digest = hashlib.sha1()
        for path in paths:
            digest.update(str(Path(path).relative_to(root)).encode())
            digest.update(hashlib.sha1(Path(path).read_bytes()).digest())
        prints[task] = digest.hexdigest()
    return prints


def _remove_partial_writes(out: Path) -> None:
    """Temporary files a killed atomic write left behind (``files._atomic``)."""
    for folder in (out, out / "checkpoints"):
        for leftover in folder.glob(".*.tmp") if folder.is_dir() else []:
            leftover.unlink(missing_ok=True)


def _resume_state(out: Path, meta: dict, config: Config, method: str) -> tuple[dict, dict]:
    """(progress, meta) of the run in ``out`` when ``meta`` (this call's arguments) may continue it."""
    saved = files.read_json(out / "config.json")
    progress = files.read_json(out / "progress.json") if (out / "progress.json").exists() else None
    same = {k: saved.get(k) for k in ("method", "tasks", "seed")} == {k: meta[k] for k in ("method", "tasks", "seed")}
    changed = changed_fields(saved["config"], config, method)  # a field added since counts as its default
    retry = progress is not None and progress.get("diverged") is not None
    if not same or (changed and not (retry and set(changed) <= set(RETRY_FIELDS))):
        hint = (f"; after a diverged task only {', '.join(RETRY_FIELDS)} may change" if retry and changed else "")
        raise RunError(f"{out} holds a run with another method, tasks, seed or config"
                       + (f" ({', '.join(changed)} differ)" if changed else "") + hint
                       + "; resume it with the same arguments or choose another --out")
    saved_prints = saved.get("data_fingerprint") or {}
    moved = [c for c, now in meta["data_fingerprint"].items() if c in saved_prints and saved_prints[c] != now]
    if moved:
        raise RunError(f"{out} was trained on {saved.get('data')}; the files of task(s) {', '.join(moved)} in "
                       f"{meta['data']} differ from them. Resume with the same data, or choose another --out")
    if changed:  # allowed after a diverged task: recorded with the first task they apply to
        done = progress["done"]
        meta["changes"] = saved.get("changes", []) + [{"from_task": meta["tasks"][done], "fields": {
            k: getattr(config, k) for k in changed}}]
    elif saved.get("changes"):
        meta["changes"] = saved["changes"]
    if progress is None:
        return _new_progress(len(meta["tasks"])), meta
    progress["diverged"] = None
    return progress, meta


def joined_features(parts) -> dict:
    """The training features of several classes (TaskData) as one task's: patches and pooled features
    concatenated, and ``by_class`` {class: pooled} for per-class router prototypes."""
    parts = list(parts)
    if len(parts) == 1:
        return {**parts[0].train, "by_class": {parts[0].name: parts[0].train["pooled"]}}
    return {"patch": torch.cat([d.train["patch"] for d in parts]),
            "pooled": torch.cat([d.train["pooled"] for d in parts]),
            "by_class": {d.name: d.train["pooled"] for d in parts}}


def _new_progress(n_tasks: int) -> dict:
    return {"done": 0, "rows": [None] * n_tasks, "final_routing": {}, "history": {},
            "seconds": {"features": 0.0, "train": {}, "eval": 0.0}, "resume_file": None}


def run(*, data_root: str | Path, tasks: list[str] | None, method: str, config: Config, seed: int,
        out: str | Path, resume: bool = False, progress_bar: bool = True) -> dict:
    """Run the continual protocol and write the run directory; returns the metrics dict.

    Everything is checked before any feature is extracted: the method, the config, the tasks' names and
    files (the same checks as ``info``), ``out`` and, when resuming, that the run in ``out`` was made
    with these arguments and these files.
    """
    if method not in METHODS:
        raise RunError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    validate(config)
    data_root, out = Path(data_root), Path(out)
    try:
        stream = task_stream(list_categories(data_root), tasks, scenario=config.scenario, order=config.order)
    except StreamError as err:
        raise RunError(f"{data_root}: {err}") from None
    tasks = [task_name(group) for group in stream]
    classes_of = dict(zip(tasks, stream))
    classes = [c for group in stream for c in group]
    check_out(out, resume)
    summaries = validate_tree(data_root, classes)  # the verdict `info` gives
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    extractor = build_extractor(config)
    meta = run_metadata(config, extractor, method, tasks, data_root, seed)
    meta["task_classes"] = classes_of
    meta["data_fingerprint"] = data_fingerprint(data_root, classes)
    meta["notes"] = pixel_metric_notes(summaries)
    progress = _new_progress(len(tasks))
    if resume and is_run_dir(out):
        progress, meta = _resume_state(out, meta, config, method)
        _remove_partial_writes(out)
    files.write_json(out / "config.json", meta)
    for note in meta["notes"]:
        tqdm.write(f"note: {note}", file=sys.stderr)

    start = time.perf_counter()
    data = {c: load_task(data_root, c, extractor, config, device, seed=seed)
            for c in tqdm(classes, desc="features", disable=not progress_bar)}
    progress["seconds"]["features"] = time.perf_counter() - start
    dim = data[classes[0]].train["patch"].shape[1]
    torch.manual_seed(seed)  # the initial weights depend on --seed only, not on what ran before in this process
    learner = make_learner(method, config, dim, device)
    if progress["resume_file"]:
        learner.load_state_dict(torch.load(out / "checkpoints" / progress["resume_file"],
                                           map_location=device, weights_only=False))

    routed_run = learner.uses_router and config.task_agnostic
    eval_cache = {} if learner.isolated else None  # learned tasks never change: results by routing are reused
    progress.setdefault("oracle_rows", [None] * len(tasks))
    steps = [len(tasks) - 1] if method == "joint" else range(len(tasks))
    for step in tqdm(steps, desc=f"{method} tasks", disable=not progress_bar):
        if step < progress["done"]:
            continue
        task = tasks[step]
        torch.manual_seed(seed * 1000 + step)
        start = time.perf_counter()
        try:
            if method == "joint":
                log = learn(learner, "all_tasks", joined_features(data.values()), seed=seed * 1000 + step)
            else:
                log = learn(learner, task, joined_features([data[c] for c in classes_of[task]]),
                            seed=seed * 1000 + step)
        except TrainingDiverged as err:
            progress["diverged"] = {"task": task, "epoch": err.epoch + 1, "lr": err.lr}
            files.write_json(out / "progress.json", progress)  # the tasks before it stay committed
            kept = f"tasks {', '.join(tasks[:step])} are kept" if step else "no task had finished"
            raise RunError(f"task {task!r} diverged: {err}. {kept} in {out}. Try a lower learning rate "
                           f"(--set {'lr' if step == 0 else 'task_lr'}=...) or --set grad_clip=1, then --resume: "
                           f"after a diverged task {', '.join(RETRY_FIELDS[:4])} and the like may change") from None
        progress["seconds"]["train"][task] = time.perf_counter() - start
        if config.val_fraction:  # right after learning, with the task's own parameters
            for j in (range(len(tasks)) if method == "joint" else [step]):
                for c in classes_of[tasks[j]]:
                    scores = validation_scores(learner, data[c], config, task=tasks[j])
                    progress.setdefault("validation", {})[c] = scores["patch_nll"]
                    progress.setdefault("synthetic_auroc", {})[c] = scores["synthetic_auroc"]
        progress["history"][task] = log

        start = time.perf_counter()
        row, oracle_row = {}, {}
        for j, c in [(j, c) for j in range(step + 1) for c in classes_of[tasks[j]]]:
            result = evaluate_task(learner, data[c], config, cache=eval_cache, task=tasks[j])
            row[c] = _recorded(result)
            progress["final_routing"][c] = result["routed"]
            progress.setdefault("final_nearest", {})[c] = result["nearest"]
            progress.setdefault("final_unknown", {})[c] = result["unknown"]
            progress.setdefault("final_by_defect", {})[c] = result["by_defect"]
            if routed_run:  # the same model given the true task id; identical inputs when routing was right
                if any(r != tasks[j] for r in result["routed"]):
                    result = evaluate_task(learner, data[c], config, oracle=True, cache=eval_cache, task=tasks[j])
                oracle_row[c] = _recorded(result)
        progress["rows"][step] = row
        progress["oracle_rows"][step] = oracle_row if routed_run else None
        progress["seconds"]["eval"] += time.perf_counter() - start

        previous = progress["resume_file"]
        progress["resume_file"] = _save_checkpoints(out, learner, step, task)
        progress["done"] = step + 1
        files.write_json(out / "progress.json", progress)  # the commit point of this task
        if previous and previous != progress["resume_file"]:
            (out / "checkpoints" / previous).unlink(missing_ok=True)

    return write_results(out, summarise(progress, meta, learner))
