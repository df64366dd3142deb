"""Training losses: patch negative log-likelihood, the Tail-Aware Loss (Sec. 3.7), the official code's
log-det regulariser, and the flow's training loss that combines them."""
import math

import torch

from .config import Config
from .model import DeCoFlow, gaussian_log_prob


def patch_nll(logp, *, dim=None):
    """L_NLL = -log p(x_{u,v}) per patch (Eq. 21's L_NLL; also the anomaly score of Eq. 22).

    With `dim` (the feature dimension D) the NLL is divided by D: nats per dimension. This is
    the one place the kit normalises; the paper's and cpu profiles train on it so that the learning
    rate does not depend on D (the official code does not divide). Anomaly scores use the plain
    per-patch NLL (dim=None); a positive scale never changes a ranking.
    """
    nll = -logp
    return nll if dim is None else nll / dim


def tail_aware_loss(nll, *, lambda_tail=0.7, top_k=0.02, per_image=False):
    """Tail-Aware Loss (Eq. 21): (1 - lambda) mean(NLL) + lambda mean(top-k% NLL).

    nll: (B, H, W) patch NLLs; the mean is over all of them. The tail is the ceil(top_k * N) highest
    NLLs among all N patches of the batch (at least one), or with ``per_image`` (the official code)
    the max(1, int(top_k * H * W)) highest of each image, averaged over all B * k of them.
    """
    if per_image:
        flat = nll.reshape(nll.shape[0], -1)  # (B, H*W)
        k = max(1, int(top_k * flat.shape[1]))
        tail = torch.topk(flat, k, dim=1).values.mean()
    else:
        flat = nll.reshape(-1)
        k = max(1, math.ceil(top_k * flat.numel()))
        tail = torch.topk(flat, k).values.mean()
    return (1 - lambda_tail) * flat.mean() + lambda_tail * tail


def logdet_penalty(logdet):
    """mean(log|det J|^2) over the patches (B, H, W): the official code adds 1e-4 times this to the
    loss to keep the flow's volume change small; the paper does not mention it."""
    return logdet.pow(2).mean()


def training_loss(model: DeCoFlow, x: torch.Tensor, config: Config) -> torch.Tensor:
    """Tail-Aware Loss (Eq. 21) on the patch NLL of a batch (B, D, H, W) -- per feature dimension
    unless ``nll_per_dim`` is off -- plus ``lambda_logdet`` times the log-det penalty."""
    z, logdet = model(x)
    nll = patch_nll(gaussian_log_prob(z) + logdet, dim=model.dim if config.nll_per_dim else None)
    loss = tail_aware_loss(nll, lambda_tail=config.lambda_tail, top_k=config.top_k,
                           per_image=config.tail_scope == "image")
    if config.lambda_logdet:
        loss = loss + config.lambda_logdet * logdet_penalty(logdet)
    return loss
