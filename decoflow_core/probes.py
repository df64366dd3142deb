"""Probes of the data, the features and trained models behind notebooks 00-06: sample and
anomaly-map galleries, the feature extractor (Sec. 3.4), the spectrum of the weight change a new task
needs (Sec. 4.3.3, 4.4.3), per-patch gradients under the tail-aware loss (Sec. 4.4.4) and the router
(Sec. 3.8, 4.4.6). Each function's docstring says which item it serves.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import files
from .config import Config, make_config


# ----------------------------------------------------------------------------- images and maps
def pick_test_samples(category, n_good: int = 1, n_defect: int = 2) -> list:
    """The first ``n_good`` good test samples and ``n_defect`` defects of distinct types where possible."""
    good = [s for s in category.test if s.label == 0][:n_good]
    defects, seen = [], set()
    for sample in category.test:
        if sample.label == 1 and sample.defect_type not in seen and len(defects) < n_defect:
            defects.append(sample)
            seen.add(sample.defect_type)
    rest = [s for s in category.test if s.label == 1 and s not in defects]
    return good + defects + rest[:n_defect - len(defects)]


def show_image(ax, image, mask=None, title: str = "") -> None:
    """An image with its defect mask outlined in red (nothing drawn for an empty mask)."""
    ax.imshow(image, cmap="gray" if np.ndim(image) == 2 else None)
    if mask is not None and np.any(mask):
        ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(title, fontsize=6)
    ax.axis("off")


def sample_gallery(root, tasks: list[str], n_good: int = 1, n_defect: int = 2):
    """One row per category: normal test images, then defects with their masks outlined (Sec. 4.1)."""
    import matplotlib.pyplot as plt
    from .data import load_category, load_image, mask_for
    cols = n_good + n_defect
    fig, axes = plt.subplots(len(tasks), cols, figsize=(1.5 * cols, 1.5 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for ax, sample in zip(row, pick_test_samples(load_category(root, task), n_good, n_defect)):
            show_image(ax, load_image(sample.path, None), mask_for(sample, None), f"{task}: {sample.defect_type}")
    fig.tight_layout()
    return fig


def anomaly_map_examples(run_dir, root, tasks: list[str], n_per_task: int = 2) -> list[dict]:
    """Image, mask, anomaly map (Eq. 22 upsampled and smoothed, Sec. 3.9), score and routed task of
    the first defects of each task, scored by a finished run as its evaluation does (routed unless the
    run is an oracle one), with the map at the image's resolution rather than eval_size."""
    from .data import load_category, load_image, mask_for
    from .features import load_batch
    from .report import load_run
    from .scoring import image_score, pixel_maps
    config, extractor, learner, device = load_run(run_dir)
    examples = []
    for task in tasks:
        samples = pick_test_samples(load_category(root, task), 0, n_per_task)
        patch, pooled = extractor(load_batch([s.path for s in samples], config.image_size, config.image_resize).to(device))
        routed = learner.route(pooled.cpu()) if learner.uses_router and config.task_agnostic else [task] * len(samples)
        for sample, patches, chosen in zip(samples, patch.cpu(), routed):
            nll = learner.patch_nll(chosen, patches[None])
            amap = pixel_maps(nll, config, config.image_size)[0].numpy()
            examples.append({"task": task, "routed": chosen, "image": load_image(sample.path, config.image_size),
                             "mask": mask_for(sample, config.image_size), "map": amap,
                             "score": float(image_score(nll, mode=config.score_mode, k=config.score_k)[0])})
    return examples


def map_gallery(examples: list[dict], per_row: int = 2):
    """Rows of (image with mask outline, anomaly map) pairs."""
    import matplotlib.pyplot as plt
    rows = math.ceil(len(examples) / per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(3 * per_row, 1.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        example = examples[k // 2] if k // 2 < len(examples) else None
        if example is None:
            continue
        if k % 2 == 0:
            show_image(ax, example["image"], example["mask"], f"{example['task']} (routed: {example['routed']})")
        else:
            ax.imshow(example["map"], cmap="inferno")
            ax.contour(example["mask"].astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(f"anomaly map, score {example['score']:.1f}", fontsize=6)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- features (Sec. 3.4)
def backbone_table(extractor, image_size: int) -> pd.DataFrame:
    """The backbone stages the patch features come from: channels, stride, map size, pooled grid."""
    info = extractor.body.feature_info
    return pd.DataFrame({"stage": info.module_name(), "channels": info.channels(), "stride": info.reduction(),
                         "map size": [f"{image_size // r}x{image_size // r}" for r in info.reduction()],
                         "pooled to": f"{extractor.grid}x{extractor.grid}"})


def time_feature_extraction(extractor, paths, image_size: int, cache_dir) -> dict:
    """Seconds to get features of ``paths``: without a cache, on the run that writes it, and cached."""
    import time
    from .features import extract_features
    seconds = {}
    for label, cache in (("no cache", None), ("first run, writes cache", cache_dir), ("cached", cache_dir)):
        start = time.perf_counter()
        extract_features(extractor, paths, image_size=image_size, cache_dir=cache, desc=label)
        seconds[label] = time.perf_counter() - start
    return seconds


def task_separation(pooled: dict) -> pd.DataFrame:
    """Pairs of tasks by how far apart their pooled features are (the router's view, Sec. 3.8):
    centroid distance divided by the mean RMS spread of the two tasks; below ~1 they overlap."""
    names = list(pooled)
    feats = {t: np.asarray(x, dtype=float) for t, x in pooled.items()}
    centre = {t: x.mean(axis=0) for t, x in feats.items()}
    spread = {t: np.sqrt(((x - centre[t]) ** 2).sum(axis=1).mean()) for t, x in feats.items()}
    rows = [{"task a": a, "task b": b,
             "separation": float(np.linalg.norm(centre[a] - centre[b]) / ((spread[a] + spread[b]) / 2))}
            for i, a in enumerate(names) for b in names[i + 1:]]
    return pd.DataFrame(rows).sort_values("separation").reset_index(drop=True)


# ----------------------------------------------------------------------------- SVD of Delta W (Sec. 4.4.3)
def cumulative_energy(delta) -> np.ndarray:
    """Share of ||Delta W||_F^2 in the top r singular values, for r = 1..min(m, n) (ends at 1)."""
    s = np.linalg.svd(np.asarray(delta, dtype=np.float64), compute_uv=False)
    cumulative = np.cumsum(s ** 2)
    # dividing by the last partial sum (not a separate total) makes the curve end at exactly 1.0
    return cumulative / cumulative[-1] if cumulative[-1] > 0 else np.ones_like(cumulative)


def energy_at_rank(delta, rank: int) -> float:
    """Share of the energy of Delta W captured by its best rank-``rank`` approximation (Eckart-Young)."""
    curve = cumulative_energy(delta)
    return float(curve[min(rank, len(curve)) - 1])


def mean_energy_curve(curves: list) -> np.ndarray:
    """Mean of cumulative-energy curves of different lengths: past its full rank a curve stays at 1."""
    length = max(len(c) for c in curves)
    mean = np.mean([np.concatenate([c, np.ones(length - len(c))]) for c in curves], axis=0)
    return np.minimum(mean, 1.0)  # float rounding of the average must not exceed a share of 1


def random_energy(shape, rank: int, seed: int = 0) -> float:
    """energy_at_rank of a Gaussian matrix of ``shape``: what a ΔW without low-rank structure gives."""
    return energy_at_rank(np.random.default_rng(seed).standard_normal(shape), rank)


def base_linears(model) -> dict:
    """The shared (base) nn.Linear of every LoRA layer in the DCS blocks, by name."""
    from .flow import LoRALinear
    return {name: module.base for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def first_task_model(run_dir):
    """(config, model) of a decoflow run right after its first task: base + that task's parameters."""
    from .methods import build_flow
    run_dir = Path(run_dir)
    meta = files.read_json(run_dir / "config.json")
    config = Config(**meta["config"])
    model = build_flow(config, meta["feature_dim"])
    task_file = sorted((run_dir / "checkpoints").glob("task_00_*.pt"))[0]
    model.load_task_state_dict(meta["tasks"][0], torch.load(task_file, map_location="cpu", weights_only=False))
    model.load_base_state_dict(torch.load(run_dir / "checkpoints" / "base.pt", map_location="cpu", weights_only=False))
    return config, model


def full_finetune_delta(model, task: str, patches: torch.Tensor, config: Config, *, seed: int) -> dict:
    """Delta W = W_after - W_before of every base Linear when a new task fine-tunes ALL base weights.

    The new task gets its own TSA, SCM gate and ACL as in DeCoFlow, but no LoRA: its adapters stay at
    B = 0 and out of the optimizer, so the base alone absorbs the change LoRA would carry (Sec. 4.4.3).
    ``model`` is left untouched; the result depends on ``seed`` only.
    """
    from .flow import LoRALinear
    from .methods import fit
    model = copy.deepcopy(model)
    before = {k: lin.weight.detach().clone() for k, lin in base_linears(model).items()}
    torch.manual_seed(seed)  # the new task's initial weights must not depend on what ran before
    model.add_task(task)
    model.set_task(task)
    lora = [p for m in model.modules() if isinstance(m, LoRALinear) for p in m.task_parameters(task).values()]
    for p in lora:
        p.requires_grad_(False)
    params = model.base_parameters() + [p for p in model.task_parameters(task) if all(p is not q for q in lora)]
    for p in params:
        p.requires_grad_(True)
    fit(model, params, patches, config, seed=seed, desc=f"{task} full fine-tune")
    return {k: (lin.weight.detach() - before[k]).numpy() for k, lin in base_linears(model).items()}


def delta_w_table(deltas: dict, profile_rank: int, paper_ranks: dict, paper_rank: int = 64) -> pd.DataFrame:
    """Per layer: shape, full rank, energy in the top 64, at the profile's rank, and at the rank that is
    the same fraction of the layer's full rank as 64 is of the paper-sized layer's."""
    rows = []
    for name, delta in deltas.items():
        full = min(delta.shape)
        matched = max(1, math.ceil(full * paper_rank / paper_ranks[name]))
        rows.append({"layer": name, "shape": f"{delta.shape[0]}x{delta.shape[1]}", "full rank": full,
                     f"energy@{paper_rank}": energy_at_rank(delta, paper_rank),
                     f"top {paper_rank} is full rank": full <= paper_rank,
                     f"energy@{profile_rank} (profile rank)": energy_at_rank(delta, profile_rank),
                     "matched rank": matched, "energy@matched rank": energy_at_rank(delta, matched)})
    return pd.DataFrame(rows)


def paper_layer_ranks(names) -> dict:
    """Full rank of the same base Linear layers in the paper-sized flow (D = 768, Sec. 4.1)."""
    from .methods import build_flow
    paper = make_config("paper")
    layers = base_linears(build_flow(paper.replace(n_dcs=max(int(n.split(".")[1]) for n in names) + 1), 768))
    return {n: min(layers[n].weight.shape) for n in names}


# ----------------------------------------------------------------------------- TAL gradients (Sec. 4.4.4)
def patch_feature_gradients(model, x: torch.Tensor, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(patch NLL, ||dL/dx_p||_2) for every patch p of a batch x (B, D, H, W), L = TAL of ``config``.

    The gradient is taken w.r.t. the patch features that enter the flow model (before TSA). With
    lambda_tail = 0 the loss is the plain mean NLL.
    """
    from .methods import training_loss
    from .losses import patch_nll
    x = x.clone().requires_grad_(True)
    loss = training_loss(model, x, config)
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        nll = patch_nll(model.log_prob(x), dim=model.dim)
    return nll.flatten().numpy(), grad.norm(dim=1).flatten().numpy()


def tail_share(grad_norms, nll, top_k: float) -> float:
    """Share of the summed per-patch gradient magnitude carried by the top-k fraction of patches by NLL."""
    grad_norms, nll = np.asarray(grad_norms, float), np.asarray(nll, float)
    k = max(1, math.ceil(top_k * nll.size))
    tail = np.argsort(-nll, kind="stable")[:k]
    return float(grad_norms[tail].sum() / grad_norms.sum())


def expected_tail_weight(lambda_tail: float, top_k: float) -> float:
    """Share of dL/dNLL that Eq. 21 puts on the top-k patches: (1 - lambda) k + lambda."""
    return (1 - lambda_tail) * top_k + lambda_tail


# ----------------------------------------------------------------------------- routing (Sec. 3.8, 4.4.6)
def routing_confusion(train: dict, test: dict, **router_options) -> tuple[np.ndarray, float]:
    """(confusion counts true x routed, accuracy) of a PrototypeRouter fit on ``train`` pooled features
    and tested on ``test`` ({task: (N, G)}, same task order)."""
    from .router import PrototypeRouter
    router = PrototypeRouter(**router_options)
    for task, feats in train.items():
        router.add_task(task, feats)
    tasks = list(train)
    confusion = np.zeros((len(tasks), len(tasks)), dtype=int)
    for i, task in enumerate(tasks):
        for routed in router.route(test[task]):
            confusion[i, tasks.index(routed)] += 1
    return confusion, float(np.trace(confusion) / confusion.sum())


def routing_errors(confusion, tasks: list[str]) -> pd.DataFrame:
    """Every off-diagonal cell of a routing confusion matrix: (true task, routed to, images)."""
    confusion = np.asarray(confusion)
    rows = [{"true task": tasks[i], "routed to": tasks[j], "images": int(confusion[i, j])}
            for i, j in zip(*np.nonzero(confusion)) if i != j]
    return pd.DataFrame(rows, columns=["true task", "routed to", "images"])


def row_normalise(confusion) -> np.ndarray:
    confusion = np.asarray(confusion, dtype=float)
    return confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)

