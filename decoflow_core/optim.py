"""AdamP (Heo et al., ICLR 2021), the paper's optimiser, with its per-tensor work batched.

Adam's moments, then for every tensor of two or more dimensions the projection of AdamP: when the
update is nearly orthogonal to the weight (|cosine| between gradient and weight below delta / sqrt(n),
tried per output channel, then over the whole tensor), its radial part is removed and the weight decay
scaled by ``wd_ratio``. The same arithmetic as timm's ``AdamP`` (a test checks equality bit for bit),
with the moment updates done by ``torch._foreach_*`` over all tensors and the cosines computed once per
group of tensors of one shape: a flow step has over a hundred small tensors, and one Python-level
operation per tensor and step cost more than the arithmetic.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F


class AdamP(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                                      wd_ratio=wd_ratio))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            by_step = defaultdict(list)  # tensors that have taken the same number of steps share bias corrections
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                by_step[state["step"]].append(p)
            for step, params in by_step.items():
                self._update(group, params, step)

    def _update(self, group, params, step):
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        averages = [self.state[p]["exp_avg"] for p in params]
        squares = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(averages, beta1)
        torch._foreach_add_(averages, grads, alpha=1 - beta1)
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(squares)
        torch._foreach_div_(denominators, math.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denominators, group["eps"])
        perturbs = torch._foreach_div(averages, denominators)
        wd_ratios = self._project(params, grads, perturbs, group)
        if group["weight_decay"] > 0:
            for p, ratio in zip(params, wd_ratios):
                p.mul_(1 - group["lr"] * group["weight_decay"] * ratio)
        torch._foreach_add_(params, perturbs, alpha=-group["lr"] / (1 - beta1 ** step))

    @staticmethod
    def _project(params, grads, perturbs, group) -> list[float]:
        """AdamP's projection of every perturbation of a tensor with two or more dimensions (in place);
        returns each tensor's weight-decay ratio."""
        ratios = [1.0] * len(params)
        by_shape = defaultdict(list)
        for i, p in enumerate(params):
            if p.dim() > 1:
                by_shape[tuple(p.shape)].append(i)
        for shape, members in by_shape.items():
            weight = torch.stack([params[i] for i in members])
            grad = torch.stack([grads[i] for i in members])
            channel = F.cosine_similarity(grad.reshape(len(members), shape[0], -1),
                                          weight.reshape(len(members), shape[0], -1), dim=2, eps=group["eps"]).abs_()
            layer = F.cosine_similarity(grad.reshape(len(members), -1), weight.reshape(len(members), -1), dim=1,
                                        eps=group["eps"]).abs_()
            size, delta = weight[0].numel(), group["delta"]
            per_channel = (channel.max(dim=1).values < delta / math.sqrt(size / shape[0])).tolist()
            whole = (layer < delta / math.sqrt(size)).tolist()
            for k, i in enumerate(members):
                if per_channel[k] or whole[k]:
                    _remove_radial(params[i], perturbs[i], per_channel[k], group["eps"])
                    ratios[i] = group["wd_ratio"]
        return ratios


def _remove_radial(p, perturb, per_channel: bool, eps: float) -> None:
    """perturb -= its component along p: per output channel, or over the whole tensor."""
    view = (lambda x: x.reshape(x.size(0), -1)) if per_channel else (lambda x: x.reshape(1, -1))
    expand = (-1,) + (1,) * (p.dim() - 1)
    unit = p / view(p).norm(p=2, dim=1).add_(eps).reshape(expand)
    perturb -= unit * view(unit * perturb).sum(dim=1).reshape(expand)
