"""Per-patch gradients under the Tail-Aware Loss (Sec. 4.4.4; notebook 05): how much of the update
the tail patches carry."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..config import Config
from ..losses import patch_nll, training_loss


def patch_feature_gradients(model, x: torch.Tensor, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(patch NLL, ||dL/dx_p||_2) for every patch p of a batch x (B, D, H, W), L = TAL of ``config``.

    The gradient is taken w.r.t. the patch features that enter the flow model (before TSA). With
    lambda_tail = 0 the loss is the plain mean NLL.
    """
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
