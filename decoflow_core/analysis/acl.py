"""What the ACL blocks do to the latent (Sec. 4.4.5; notebook 10): moments before and after, and how
far the map is from an affine one."""
from __future__ import annotations

import numpy as np
import torch


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
