"""Invertible building blocks of DeCoFlow: LoRA linear layers and affine coupling blocks.

Tensors inside the flow are channels-last, (B, H, W, D): every linear layer acts on the last
axis, and only the DCS context convolution moves channels to axis 1, for itself.

Two coupling conventions are here, both with the same subnets: the paper's (Eq. 4, 17: a soft
clamp s~ = clamp * tanh(s / clamp), channels permuted around each block) and the one of FrEIA's
``AllInOneBlock`` that the official code uses for the DCS blocks (s~ = clamp * tanh(0.1 s), shift
0.1 t, a fixed per-channel affine, channels permuted after each block).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FREIA_FACTOR = 0.1  # FrEIA's AllInOneBlock multiplies the subnet output by 0.1 before the clamp


def random_permutation(dim, seed):
    """The kit's channel permutation of a block: torch.randperm with its own seeded generator."""
    return torch.randperm(dim, generator=torch.Generator().manual_seed(seed))


def freia_permutations(dim, count, seed=0):
    """``count`` permutations drawn one after the other as the official code draws them: numpy's
    ``permutation(dim)`` after ``np.random.seed(seed)`` (FrEIA uses the global numpy generator)."""
    rng = np.random.RandomState(seed)
    return [torch.from_numpy(rng.permutation(dim)) for _ in range(count)]


def gather_channels(x, index):
    """x[..., index] for a channels-last x: index_select on the (N, D) view, which is several times
    faster on CPU, forward and backward, than on the last axis of the 4-D tensor."""
    return x.reshape(-1, x.shape[-1]).index_select(1, index).reshape(*x.shape[:-1], len(index))


class LoRALinear(nn.Module):
    """Linear layer with one low-rank adapter per task (Eq. 5).

    y = W x + b + (alpha / r) * B_t (A_t x) [+ b_t], with the base `W, b` shared by all tasks and
    `A_t` (r x in), `B_t` (out x r) and, with ``task_bias``, `b_t` (out) owned by task t. `B_t` and
    `b_t` start at zero, so a new task starts exactly at the base; `A_t` starts Kaiming-uniform
    (torch's Linear init) or Xavier-uniform (``init="xavier"``, the official code). The owning model
    sets `active_task`; when that task has no adapter here (or it is None) the base alone is used.
    """

    def __init__(self, in_features, out_features, *, rank, lora_alpha=None, init="kaiming", task_bias=False):
        super().__init__()
        if init not in ("kaiming", "xavier"):
            raise ValueError(f"LoRA init must be 'kaiming' or 'xavier', got {init!r}")
        self.base = nn.Linear(in_features, out_features)
        self.rank, self.init = rank, init
        self.scale = (rank if lora_alpha is None else lora_alpha) / rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.task_bias = nn.ParameterDict() if task_bias else None
        self.active_task = None

    def add_task(self, name):
        weight = self.base.weight  # new adapters follow the base's device and dtype
        like = dict(device=weight.device, dtype=weight.dtype)
        a = torch.empty(self.rank, weight.shape[1], **like)
        if self.init == "xavier":
            nn.init.xavier_uniform_(a)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(weight.shape[0], self.rank, **like))
        if self.task_bias is not None:
            self.task_bias[name] = nn.Parameter(torch.zeros(weight.shape[0], **like))

    def task_parameters(self, name):
        params = {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}
        if self.task_bias is not None:
            params["task_bias"] = self.task_bias[name]
        return params

    def forward(self, x):
        task = self.active_task
        if task is None or task not in self.lora_A:
            return self.base(x)
        # W + (alpha/r) B A formed once per call: one product over the patches instead of three
        weight = self.base.weight + self.scale * (self.lora_B[task] @ self.lora_A[task])
        bias = self.base.bias if self.task_bias is None else self.base.bias + self.task_bias[task]
        return F.linear(x, weight, bias)


class AffineCoupling(nn.Module):
    """Affine coupling block: Eq. 4 with the soft clamp of Eq. 17 and the log-det of Eq. 18.

    y1 = x1, y2 = x2 * exp(s~) + t, log|det J| = sum(s~) per patch. The block owns the split, clamp
    and log-det; `subnet(x1) -> (s, t)` is passed in. x1 is the first ``passive`` channels
    (default floor(D/2)) of the input taken in the order ``perm``.

    ``freia=False`` (the paper): s~ = clamp * tanh(s / clamp); the output is put back in the input's
    channel order, so a block whose subnet outputs zeros is exactly the identity.
    ``freia=True`` (FrEIA's AllInOneBlock, the official DCS blocks): x1 is the first ceil(D/2)
    channels in input order; s~ = clamp * tanh(0.1 s), shift 0.1 t; then a fixed per-channel affine
    y * affine_scale + affine_offset (log-det + sum log affine_scale; identity unless imported, never
    trained); then the channels are permuted by ``perm`` for the next block.

    A stack of blocks reads ``pre`` (gather before the coupling, or None) and ``post`` (after) so
    that consecutive gathers can be merged into one.
    """

    def __init__(self, *, dim, subnet, clamp, perm=None, passive=None, freia=False):
        super().__init__()
        self.subnet, self.clamp, self.freia = subnet, clamp, freia
        self.split = passive if passive is not None else (dim - dim // 2 if freia else dim // 2)
        perm = torch.arange(dim) if perm is None else torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(dim)):
            raise ValueError(f"perm must be a permutation of range({dim})")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        if freia:
            self.register_buffer("affine_scale", torch.ones(dim))
            self.register_buffer("affine_offset", torch.zeros(dim))

    @property
    def pre(self):
        return None if self.freia else self.perm

    @property
    def post(self):
        return self.perm if self.freia else self.inv_perm

    def _scale_shift(self, x1):
        s, t = self.subnet(x1)
        if self.freia:
            return self.clamp * torch.tanh(FREIA_FACTOR * s), FREIA_FACTOR * t
        return self.clamp * torch.tanh(s / self.clamp), t

    def forward(self, x):  # x: (B, H, W, D)
        if self.pre is not None:
            x = gather_channels(x, self.pre)
        y, logdet = self.coupled(x)
        return gather_channels(y, self.post), logdet  # (B, H, W, D), (B, H, W)

    def coupled(self, x):
        """The coupling on input already gathered by ``pre``; ``post`` is not applied. A stack of
        blocks uses this to merge consecutive gathers."""
        x1, x2 = x.split([self.split, x.shape[-1] - self.split], dim=-1)  # split: a cheaper backward than slicing
        if self.freia:
            s, t = self._scale_shift(x1)
            y2, logdet = x2 * torch.exp(s) + t, s.sum(dim=-1)
        else:  # the same computation with a shorter backward (most of a training step's small operations)
            y2, logdet = SoftClampAffine.apply(x2, *self.subnet(x1), self.clamp)
        y = torch.cat([x1, y2], dim=-1)
        if self.freia:
            y = y * self.affine_scale + self.affine_offset
            logdet = logdet + self.affine_scale.log().sum()
        return y, logdet

    def inverse(self, y):  # y: (B, H, W, D)
        y = gather_channels(y, self.inv_perm if self.freia else self.perm)
        if self.freia:
            y = (y - self.affine_offset) / self.affine_scale
        y1, y2 = y[..., : self.split], y[..., self.split :]
        s, t = self._scale_shift(y1)
        x = torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=-1)
        return x if self.freia else gather_channels(x, self.inv_perm)


class SoftClampAffine(torch.autograd.Function):
    """y2 = x2 * exp(s~) + t and log|det J| = sum(s~), s~ = clamp * tanh(s / clamp) (Eq. 4, 17, 18),
    with a hand-written backward: d s~/ds = 1 - tanh^2, saved from the forward pass."""

    @staticmethod
    def forward(ctx, x2, s, t, clamp):
        tanh = torch.tanh(s / clamp)
        scaled = tanh * clamp
        scale = scaled.exp()
        ctx.save_for_backward(x2, tanh, scale)
        return x2 * scale + t, scaled.sum(dim=-1)

    @staticmethod
    def backward(ctx, grad_y2, grad_logdet):
        x2, tanh, scale = ctx.saved_tensors
        grad_x2 = grad_y2 * scale
        grad_scaled = torch.addcmul(grad_logdet.unsqueeze(-1), grad_x2, x2)  # dy2/ds~ = x2 exp(s~), plus log-det
        return grad_x2, grad_scaled * (1 - tanh * tanh), grad_y2, None


def _zero_(linear):
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


class DecomposedSubnet(nn.Module):
    """Decomposed Coupling Subnet, DCS (Eq. 12-14); every Linear is a LoRALinear (Eq. 5).

    ctx = alpha * c(x1), alpha = alpha_max * sigmoid(theta)          (Eq. 12)
    s = Linear2_s(ReLU(Linear1_s([x1; ctx])))                          (Eq. 13)
    t = Linear2_t(ReLU(Linear1_t(x1)))                                 (Eq. 14)
    c is a depthwise N x N convolution over the patch grid (zero padding), theta starts at 0
    (alpha = alpha_max / 2). The paper states neither alpha_max (1.0 here; the official code 0.2)
    nor c's bias and init (here none and torch's default; the official code: a bias, both zero).
    With ``zero_init`` the last base Linear of s and t starts at zero, so the untrained block is the
    identity; the official code keeps torch's default init.
    """

    def __init__(self, *, in_dim, out_dim, hidden, rank, lora_alpha=None, lora_init="kaiming",
                 lora_task_bias=False, context_kernel=5, use_context=True, alpha_max=1.0,
                 context_bias=False, context_zero_init=False, zero_init=True):
        super().__init__()
        self.alpha_max = alpha_max
        self.context = None
        if use_context:
            self.context = nn.Conv2d(in_dim, in_dim, context_kernel, padding=context_kernel // 2,
                                     groups=in_dim, bias=context_bias)
            if context_zero_init:
                nn.init.zeros_(self.context.weight)
                if context_bias:
                    nn.init.zeros_(self.context.bias)
            self.context_gate = nn.Parameter(torch.zeros(()))  # theta_scale of Eq. 12
        lora = dict(rank=rank, lora_alpha=lora_alpha, init=lora_init, task_bias=lora_task_bias)
        self.s_in = LoRALinear(2 * in_dim if use_context else in_dim, hidden, **lora)
        self.s_out = LoRALinear(hidden, out_dim, **lora)
        self.t_in = LoRALinear(in_dim, hidden, **lora)
        self.t_out = LoRALinear(hidden, out_dim, **lora)
        if zero_init:
            _zero_(self.s_out.base)
            _zero_(self.t_out.base)

    def forward(self, x1):  # x1: (B, H, W, d1)
        x1 = x1.contiguous()  # one copy of the split's view, read by the convolution and both subnets
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


def _mlp(in_dim, hidden, out_dim, depth):
    widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < depth - 1 else [])
    _zero_(layers[-1])
    return nn.Sequential(*layers)


class SeparateMLPSubnet(nn.Module):
    """The official ACL subnet: s and t from two MLPs of ``depth`` Linear layers (ReLU between),
    both reading x1. The last layer of each starts at zero, so a new task's ACL is the identity."""

    def __init__(self, *, in_dim, out_dim, hidden, depth=3):
        super().__init__()
        self.s_net = _mlp(in_dim, hidden, out_dim, depth)
        self.t_net = _mlp(in_dim, hidden, out_dim, depth)

    def forward(self, x1):  # x1: (B, H, W, d1)
        return self.s_net(x1), self.t_net(x1)  # each (B, H, W, d2)
