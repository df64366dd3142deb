"""Helpers of the ablation and analysis notebooks 07-11 (paper Sec. 4.3-4.4).

The notebooks stay thin: what is computed lives here, what is run lives in the runs directory
(``analysis.Context`` trains each run once). In the ``cpu`` profile the ablations use a short
stream (``ABLATION_TASKS`` tasks) and ``ABLATION_EPOCHS`` epochs; with ``PROFILE=paper`` or ``official`` they use the
whole stream and the profile's epochs.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from .analysis import FULL_PROFILES

ABLATION_TASKS = 3
ABLATION_EPOCHS = 3
# leave-one-out of the paper's components (Sec. 4.3.1): the config change that removes each one
COMPONENTS = {"TSA": {"use_tsa": False}, "SCM": {"use_scm": False}, "TAL": {"lambda_tail": 0.0},
              "ACL": {"use_acl": False}}
ALL_COMPONENTS_OFF = {k: v for change in COMPONENTS.values() for k, v in change.items()}


def ablation_plan(ctx) -> tuple[list[str], dict]:
    """(stream, config changes) of the ablation runs of a notebook context."""
    if ctx.profile in FULL_PROFILES:
        return ctx.tasks, {}
    return ctx.tasks[:ABLATION_TASKS], ({} if ctx.quick else {"epochs": ABLATION_EPOCHS})


# ----------------------------------------------------------------------------- seed statistics
def paired_effects(rows: pd.DataFrame, reference: str, value: str = "I-AUROC", by: str = "variant") -> pd.DataFrame:
    """Per variant: mean and std over seeds of (variant - reference) paired by seed, and whether the
    effect is within seed noise (|mean| <= 2 standard errors; undecidable with one seed)."""
    wide = rows.pivot(index="seed", columns=by, values=value)
    out = []
    for variant in wide.columns:
        if variant == reference:
            continue
        diff = (wide[variant] - wide[reference]).dropna()
        n = len(diff)
        std = float(diff.std(ddof=1)) if n > 1 else float("nan")
        noise = bool(abs(diff.mean()) <= 2 * std / np.sqrt(n)) if n > 1 else None
        out.append({by: variant, f"Δ {value}": float(diff.mean()), "std over seeds": std, "seeds": n,
                    "within seed noise": noise})
    return pd.DataFrame(out)


def interaction_effect(cells: dict) -> dict:
    """2x2 design {(base, components): value}, base in {"frozen", "trainable"}, components in
    {"absent", "present"}: the components' effect under each base and their difference."""
    frozen = cells[("frozen", "present")] - cells[("frozen", "absent")]
    trainable = cells[("trainable", "present")] - cells[("trainable", "absent")]
    return {"effect_frozen": frozen, "effect_trainable": trainable, "interaction": frozen - trainable}


def first_task_plan(available: list[str], stream: list[str], wanted: list[str], n_candidates: int,
                    n_followers: int = 2) -> tuple[list[str], list[str]]:
    """(candidates for task 0, fixed tasks that follow every candidate). ``wanted`` names that the
    data lacks are replaced by other categories of the stream."""
    candidates = list(dict.fromkeys(t for t in wanted if t in available))[:n_candidates]
    followers = [t for t in stream if t not in candidates][:n_followers]
    for t in available:
        if len(candidates) >= n_candidates:
            break
        if t not in candidates and t not in followers:
            candidates.append(t)
    return candidates, followers


# ----------------------------------------------------------------------------- ACL (Sec. 4.4.5)
@torch.no_grad()
def acl_latents(model, task: str, patches: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(latent after the DCS blocks, latent after the task's ACL blocks), each (patches, D)."""
    previous = model.active_task
    model.set_task(task)
    h = model.embed(patches).permute(0, 2, 3, 1)
    for block in model.dcs:
        h, _ = block(h)
    before = h
    for block in model.acl[task] if task in model.acl else []:
        h, _ = block(h)
    model.set_task(previous)
    flat = lambda t: t.reshape(-1, t.shape[-1]).double().numpy()  # noqa: E731
    return flat(before), flat(h)


def moments(z: np.ndarray) -> dict:
    """Mean over channels of |skewness| and |excess kurtosis| of (N, D) samples (0 for a Gaussian)."""
    centred = z - z.mean(axis=0)
    std = centred.std(axis=0) + 1e-12
    standard = centred / std
    return {"abs_skewness": float(np.abs((standard ** 3).mean(axis=0)).mean()),
            "abs_excess_kurtosis": float(np.abs((standard ** 4).mean(axis=0) - 3).mean())}


def linear_fit_r2(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of the best affine map x -> y (least squares, all channels pooled): 1 = ACL is linear."""
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = ((y - design @ coef) ** 2).sum()
    return float(1 - residual / ((y - y.mean(axis=0)) ** 2).sum())


# ----------------------------------------------------------------------------- cost (Sec. 4.4.7)
def model_size_curve(method: str, params: dict, n_tasks: int, *, router_floats_per_task: int = 0,
                     replay_floats_per_task: int = 0) -> np.ndarray:
    """Stored floats after 1..n_tasks tasks: network parameters, router statistics, replay buffer."""
    t = np.arange(1, n_tasks + 1)
    if method == "decoflow":
        network = params["base"] + t * params["per_task"]
    elif method == "independent":
        network = t * params["per_task"]
    else:  # one shared flow (finetune, ewc, replay)
        network = np.full(n_tasks, params["base"])
    return network + t * (router_floats_per_task + replay_floats_per_task)


@torch.no_grad()
def latency(extractor, learner, images: torch.Tensor, repeats: int = 1) -> dict:
    """Milliseconds per image for backbone, router and flow, one image at a time (CPU wall time)."""
    parts = {"backbone": [], "router": [], "flow": []}
    for _ in range(repeats):
        for image in images:
            t0 = time.perf_counter()
            patch, pooled = extractor(image[None])
            t1 = time.perf_counter()
            task = learner.route(pooled.cpu())[0] if learner.uses_router else None
            t2 = time.perf_counter()
            learner.patch_nll(task, patch.cpu())
            t3 = time.perf_counter()
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[key].append(1000 * seconds)
    return {f"{key} ms": float(np.median(values)) for key, values in parts.items()}
