"""Invertible building blocks of DeCoFlow: LoRA linear layers and affine coupling blocks.

Tensors inside the flow are channels-last, (B, H, W, D): every linear layer acts on the last
axis, and only the DCS context convolution moves channels to axis 1, for itself.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """Linear layer with one low-rank adapter per task (Eq. 5).

    y = W x + b + (alpha / r) * B_t (A_t x), with the base `W, b` shared by all tasks and
    `A_t` (r x in), `B_t` (out x r) owned by task t. `B_t` starts at zero, so a new task starts
    exactly at the base. The owning model sets `active_task`; when that task has no adapter here
    (or it is None) the base alone is used.
    """

    def __init__(self, in_features, out_features, *, rank, lora_alpha=None):
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.rank = rank
        self.scale = (rank if lora_alpha is None else lora_alpha) / rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.active_task = None

    def add_task(self, name):
        weight = self.base.weight  # new adapters follow the base's device and dtype
        a = torch.empty(self.rank, weight.shape[1], device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(
            torch.zeros(weight.shape[0], self.rank, device=weight.device, dtype=weight.dtype))

    def task_parameters(self, name):
        return {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}

    def forward(self, x):
        task = self.active_task
        if task is None or task not in self.lora_A:
            return self.base(x)
        # W + (alpha/r) B A formed once per call: one product over the patches instead of three
        weight = self.base.weight + self.scale * (self.lora_B[task] @ self.lora_A[task])
        return F.linear(x, weight, self.base.bias)


class AffineCoupling(nn.Module):
    """Affine coupling block: Eq. 4 with the soft clamp of Eq. 17 and the log-det of Eq. 18.

    y1 = x1, y2 = x2 * exp(s~) + t, s~ = clamp * tanh(s / clamp), log|det J| = sum(s~) per patch.
    The block owns the split, clamp and log-det; `subnet(x1) -> (s, t)` is passed in.
    Which channels form x1 is a fixed random permutation (seeded, kept as a buffer); the output
    is put back in the input's channel order, so a block whose subnet outputs zeros is exactly
    the identity and different blocks transform different halves of the channels.
    """

    def __init__(self, *, dim, subnet, clamp, seed):
        super().__init__()
        self.subnet = subnet
        self.clamp = clamp
        self.split = dim // 2  # x1 gets floor(D/2) channels, x2 the rest (odd D is fine)
        perm = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _scale_shift(self, x1):
        s, t = self.subnet(x1)
        return self.clamp * torch.tanh(s / self.clamp), t

    def forward(self, x):  # x: (B, H, W, D)
        y, logdet = self.coupled(x.index_select(-1, self.perm))  # index_select: fast backward
        return y.index_select(-1, self.inv_perm), logdet  # (B, H, W, D), (B, H, W)

    def coupled(self, x):
        """The coupling on input already in this block's channel order (x[..., perm]); the output
        stays in that order. A stack of blocks uses this to merge consecutive permutations."""
        x1, x2 = x[..., : self.split], x[..., self.split :]
        s, t = self._scale_shift(x1)
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=-1), s.sum(dim=-1)

    def inverse(self, y):  # y: (B, H, W, D)
        y = y.index_select(-1, self.perm)
        y1, y2 = y[..., : self.split], y[..., self.split :]
        s, t = self._scale_shift(y1)
        x2 = (y2 - t) * torch.exp(-s)
        return torch.cat([y1, x2], dim=-1).index_select(-1, self.inv_perm)


def _zero_(linear):
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


class DecomposedSubnet(nn.Module):
    """Decomposed Coupling Subnet, DCS (Eq. 12-14); every Linear is a LoRALinear (Eq. 5).

    ctx = alpha * c(x1), alpha = alpha_max * sigmoid(theta)          (Eq. 12)
    s = Linear2_s(ReLU(Linear1_s([x1; ctx])))                          (Eq. 13)
    t = Linear2_t(ReLU(Linear1_t(x1)))                                 (Eq. 14)
    c is a depthwise N x N convolution over the patch grid (zero padding, no bias). The paper
    does not state alpha_max (default 1.0 here) nor the initial theta (0, so alpha = alpha_max/2).
    The last base Linear of s and t starts at zero, so the untrained block is the identity.
    """

    def __init__(self, *, in_dim, out_dim, hidden, rank, lora_alpha=None, context_kernel=5,
                 use_context=True, alpha_max=1.0):
        super().__init__()
        self.alpha_max = alpha_max
        self.context = None
        if use_context:
            self.context = nn.Conv2d(in_dim, in_dim, context_kernel, padding=context_kernel // 2,
                                     groups=in_dim, bias=False)
            self.context_gate = nn.Parameter(torch.zeros(()))  # theta_scale of Eq. 12
        lora = dict(rank=rank, lora_alpha=lora_alpha)
        self.s_in = LoRALinear(2 * in_dim if use_context else in_dim, hidden, **lora)
        self.s_out = LoRALinear(hidden, out_dim, **lora)
        self.t_in = LoRALinear(in_dim, hidden, **lora)
        self.t_out = LoRALinear(hidden, out_dim, **lora)
        _zero_(self.s_out.base)
        _zero_(self.t_out.base)

    def forward(self, x1):  # x1: (B, H, W, d1)
        s_input = x1
        if self.context is not None:
            ctx = self.context(x1.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, d1)
            alpha = self.alpha_max * torch.sigmoid(self.context_gate)
            s_input = torch.cat([x1, alpha * ctx], dim=-1)  # (B, H, W, 2*d1)
        s = self.s_out(F.relu(self.s_in(s_input)))
        t = self.t_out(F.relu(self.t_in(x1)))
        return s, t  # each (B, H, W, d2)


class MLPSubnet(nn.Module):
    """Plain subnet of an ACL block (Eq. 15): one two-layer MLP whose output is split into s, t.

    No LoRA and no context: the whole block belongs to one task. The last layer starts at zero,
    so a new task's ACL is exactly the identity.
    """

    def __init__(self, *, in_dim, out_dim, hidden):
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, 2 * out_dim)
        _zero_(self.out)

    def forward(self, x1):  # x1: (B, H, W, d1)
        s, t = self.out(F.relu(self.hidden(x1))).chunk(2, dim=-1)
        return s, t  # each (B, H, W, d2)
