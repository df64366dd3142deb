"""Training losses: patch negative log-likelihood and the Tail-Aware Loss (Sec. 3.7)."""
import math

import torch


def patch_nll(logp, *, dim=None):
    """L_NLL = -log p(x_{u,v}) per patch (Eq. 21's L_NLL; also the anomaly score of Eq. 22).

    With `dim` (the feature dimension D) the NLL is divided by D: nats per dimension. This is
    the one place the kit normalises; training uses it so that the learning rate does not depend
    on D. Anomaly scores use the plain per-patch NLL (dim=None); a positive scale never changes
    a ranking.
    """
    nll = -logp
    return nll if dim is None else nll / dim


def tail_aware_loss(nll, *, lambda_tail=0.7, top_k=0.02):
    """Tail-Aware Loss (Eq. 21): (1 - lambda) mean(NLL) + lambda mean(top-k% NLL).

    nll: (B, H, W) patch NLLs. The tail is the ceil(top_k * N) highest NLLs among all N patches
    of the batch (at least one patch).
    """
    flat = nll.reshape(-1)
    k = max(1, math.ceil(top_k * flat.numel()))
    tail = torch.topk(flat, k).values.mean()
    return (1 - lambda_tail) * flat.mean() + lambda_tail * tail
