"""DeCoFlow: a normalizing flow on patch features with a frozen shared base and per-task parts.

Pipeline for the active task t (Sec. 3.2, 3.9): TSA_t -> SCM_t -> n_dcs DCS blocks (base + LoRA_t)
-> n_acl ACL blocks of task t. TSA and SCM form `embed(x) = u`, the flow's input; the density
(Eq. 16-20) is over u, as in the paper: their Jacobians are not in the log-det.

What belongs to a task: LoRA A_t/B_t in every DCS linear, TSA gamma_t/beta_t, the SCM gate, and
the whole ACL stack. Everything else is the base, frozen by `freeze_base()` after the first task.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .flow import AffineCoupling, DecomposedSubnet, LoRALinear, MLPSubnet


class TaskAlignment(nn.Module):
    """Task-specific Alignment, TSA (Eq. 7-10).

    Parameter-free LayerNorm over the channels of each patch (Eq. 7), then a per-task, per-channel
    affine map with bounded gamma_t = 0.5 + 1.5 sigmoid(gamma_raw) in [0.5, 2] (Eq. 8) and
    beta_t = 2 tanh(beta_raw) in [-2, 2] (Eq. 9); out = gamma_t * x + beta_t (Eq. 10).
    Raw values start at logit(1/3) and 0, i.e. gamma ~= 1, beta = 0. `standardize=False` drops
    Eq. 7 and keeps the recalibration: the `cpu` profile's choice (on held-out synthetic defects), since
    the per-patch norm erases each patch's feature energy, e.g. a brightness change. With no task the
    standardization alone is applied.
    """

    def __init__(self, *, dim, standardize=True, eps=1e-5):
        super().__init__()
        self.dim, self.standardize, self.eps = dim, standardize, eps
        self.gamma_raw = nn.ParameterDict()
        self.beta_raw = nn.ParameterDict()

    def add_task(self, name, *, like):
        self.gamma_raw[name] = nn.Parameter(torch.full((self.dim,), math.log(0.5)).to(like))
        self.beta_raw[name] = nn.Parameter(torch.zeros(self.dim).to(like))

    def scale_shift(self, name):
        gamma = 0.5 + 1.5 * torch.sigmoid(self.gamma_raw[name])
        beta = 2.0 * torch.tanh(self.beta_raw[name])
        return gamma, beta  # each (D,)

    def forward(self, x, task):  # x: (B, H, W, D)
        if self.standardize:
            x = F.layer_norm(x, (self.dim,), eps=self.eps)
        if task is None:
            return x
        gamma, beta = self.scale_shift(task)
        return gamma * x + beta


class SpatialContextMixer(nn.Module):
    """Spatial Context Mixer, SCM (Eq. 11): F3 = (1 - a) F2 + a C, C a depthwise k x k conv of F2.

    The kernel (zero padding, no bias) is base; it starts as the identity (centre tap 1), so C = F2
    at first. The gate a = sigmoid(g_t) is one learnable scalar per task, g_t starting at 0
    (a = 0.5); the paper states neither k nor the initial gate. With no task SCM is skipped.
    """

    def __init__(self, *, dim, kernel=3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, kernel // 2, kernel // 2] = 1.0
        self.gate = nn.ParameterDict()

    def add_task(self, name, *, like):
        self.gate[name] = nn.Parameter(torch.zeros(()).to(like))

    def forward(self, x, task):  # x: (B, D, H, W)
        if task is None:
            return x
        a = torch.sigmoid(self.gate[task])
        return (1 - a) * x + a * self.conv(x)


class DeCoFlow(nn.Module):
    """The DeCoFlow model (Sec. 3.3-3.7). All defaults are the paper's except where it is silent:

    clamp=1.9 (Eq. 17 alpha_clamp), alpha_max=1.0 (Eq. 12), scm_kernel=3 (Eq. 11), and the
    subnet width hidden_ratio * dim (also used by ACL). lora_alpha=None means alpha = rank
    (LoRA scale 1). Sec. 3.9 mentions 8 DCS layers; Sec. 4.1 (used here) says 6 DCS + 2 ACL.
    """

    def __init__(self, *, dim, n_dcs=6, n_acl=2, rank=64, lora_alpha=None, hidden_ratio=1.0,
                 clamp=1.9, context_kernel=5, scm_kernel=3, alpha_max=1.0, use_tsa=True,
                 standardize=True, use_scm=True, use_acl=True, use_context=True):
        super().__init__()
        self.config = dict(dim=dim, n_dcs=n_dcs, n_acl=n_acl, rank=rank, lora_alpha=lora_alpha,
                           hidden_ratio=hidden_ratio, clamp=clamp, context_kernel=context_kernel,
                           scm_kernel=scm_kernel, alpha_max=alpha_max, use_tsa=use_tsa,
                           standardize=standardize, use_scm=use_scm, use_acl=use_acl,
                           use_context=use_context)
        self.dim, self.n_dcs, self.clamp = dim, n_dcs, clamp
        self.n_acl = n_acl if use_acl else 0
        self.hidden = max(1, round(hidden_ratio * dim))
        self.split = (dim // 2, dim - dim // 2)  # (d1, d2) of every coupling block
        self.tsa = TaskAlignment(dim=dim, standardize=standardize) if use_tsa else None
        self.scm = SpatialContextMixer(dim=dim, kernel=scm_kernel) if use_scm else None
        self.dcs = nn.ModuleList(
            AffineCoupling(dim=dim, clamp=clamp, seed=i, subnet=DecomposedSubnet(
                in_dim=self.split[0], out_dim=self.split[1], hidden=self.hidden, rank=rank,
                lora_alpha=lora_alpha, context_kernel=context_kernel, use_context=use_context,
                alpha_max=alpha_max))
            for i in range(n_dcs))
        self.acl = nn.ModuleDict()  # task name -> nn.ModuleList of its ACL blocks
        self.tasks = []
        self.active_task = None
        self.base_frozen = False

    # ---- tasks -------------------------------------------------------------------------------
    def add_task(self, name):
        """Create task `name`: LoRA adapters (B = 0), TSA, SCM gate and ACL blocks (identity)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task name must be a non-empty string without '.', got {name!r}")
        if hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):
            raise ValueError(f"task name {name!r} clashes with a torch attribute; "
                             f"use another name such as 'task_{name}'")
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists (tasks: {self.tasks})")
        ref = next(self.parameters(), None)  # new parameters follow the model's device/dtype
        like = torch.empty(0) if ref is None else ref.new_empty(0)
        for module in self.modules():
            if isinstance(module, LoRALinear):
                module.add_task(name)
        if self.tsa is not None:
            self.tsa.add_task(name, like=like)
        if self.scm is not None:
            self.scm.add_task(name, like=like)
        if self.n_acl:
            self.acl[name] = nn.ModuleList(
                AffineCoupling(dim=self.dim, clamp=self.clamp, seed=self.n_dcs + j, subnet=MLPSubnet(
                    in_dim=self.split[0], out_dim=self.split[1], hidden=self.hidden))
                for j in range(self.n_acl)).to(like)
        self.tasks.append(name)

    def set_task(self, name):
        """Activate task `name`'s parameters everywhere; None runs the base alone."""
        if name is not None and name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; known tasks: {self.tasks} (call add_task first)")
        self.active_task = name
        for module in self.modules():
            if isinstance(module, LoRALinear):
                module.active_task = name

    def freeze_base(self):
        """Freeze every shared weight (after the first task); task parameters stay trainable."""
        for p in self.base_parameters():
            p.requires_grad_(False)
        self.base_frozen = True

    # ---- forward pass ------------------------------------------------------------------------
    def embed(self, x):
        """TSA then SCM of the active task: features (B, D, H, W) -> flow input u (B, D, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"expected patch features (B, {self.dim}, H, W), got {tuple(x.shape)}")
        if self.tsa is not None:
            x = self.tsa(x.permute(0, 2, 3, 1), self.active_task).permute(0, 3, 1, 2)
        if self.scm is not None:
            x = self.scm(x, self.active_task)
        return x

    def _blocks(self):
        return list(self.dcs) + list(self.acl[self.active_task] if self.active_task in self.acl else [])

    def flow(self, u):
        """DCS then ACL blocks: u (B, D, H, W) -> z (B, D, H, W), summed log-det (B, H, W) (Eq. 16)."""
        h = u.permute(0, 2, 3, 1)  # (B, H, W, D)
        logdet = torch.zeros(h.shape[:-1], dtype=h.dtype, device=h.device)
        blocks = self._blocks()
        if blocks:  # each block's "undo my permutation" and the next one's permutation as one gather
            h = h.index_select(-1, blocks[0].perm)
        for k, block in enumerate(blocks):
            h, block_logdet = block.coupled(h)
            logdet = logdet + block_logdet
            order = block.inv_perm if k + 1 == len(blocks) else block.inv_perm[blocks[k + 1].perm]
            h = h.index_select(-1, order)
        return h.permute(0, 3, 1, 2), logdet

    def forward(self, x):
        return self.flow(self.embed(x))

    def inverse(self, z):
        """Undo the flow: z (B, D, H, W) -> u = embed(x) (B, D, H, W)."""
        h = z.permute(0, 2, 3, 1)
        for block in reversed(self._blocks()):
            h = block.inverse(h)
        return h.permute(0, 3, 1, 2)

    def log_prob(self, x):
        """Per-patch log-likelihood of the flow input (B, H, W): Eq. 19 plus the log-det (Eq. 20)."""
        z, logdet = self(x)
        log_pz = -0.5 * z.pow(2).sum(dim=1) - 0.5 * self.dim * math.log(2 * math.pi)
        return log_pz + logdet

    # ---- parameter bookkeeping ----------------------------------------------------------------
    def _task_named_parameters(self, name):
        """Task `name`'s parameters under task-independent keys, e.g. 'dcs.0.subnet.s_in.lora_A'."""
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; known tasks: {self.tasks}")
        named = {}
        for path, module in self.named_modules():
            if isinstance(module, LoRALinear):
                named.update({f"{path}.{k}": p for k, p in module.task_parameters(name).items()})
        if self.tsa is not None:
            named["tsa.gamma_raw"] = self.tsa.gamma_raw[name]
            named["tsa.beta_raw"] = self.tsa.beta_raw[name]
        if self.scm is not None:
            named["scm.gate"] = self.scm.gate[name]
        if name in self.acl:
            named.update({f"acl.{k}": p for k, p in self.acl[name].named_parameters()})
        return named

    def task_parameters(self, name):
        return list(self._task_named_parameters(name).values())

    def _base_named_parameters(self):
        task_ids = {id(p) for name in self.tasks for p in self.task_parameters(name)}
        return {k: p for k, p in self.named_parameters() if id(p) not in task_ids}

    def base_parameters(self):
        return list(self._base_named_parameters().values())

    def trainable_parameters(self):
        """What an optimizer gets now: the base unless frozen, plus the active task's parameters."""
        params = [] if self.base_frozen else self.base_parameters()
        if self.active_task is not None:
            params += self.task_parameters(self.active_task)
        return params

    def base_state_dict(self):
        """Copies of the shared weights and buffers (block permutations)."""
        task_ids = {id(p) for name in self.tasks for p in self.task_parameters(name)}
        task_keys = {k for k, p in self.named_parameters() if id(p) in task_ids}
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if k not in task_keys and not k.startswith("acl.")}  # ACL buffers are per task too

    def load_base_state_dict(self, state):
        expected = set(self.base_state_dict())
        if set(state) != expected:
            raise KeyError(f"base state does not match this model: missing "
                           f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}; "
                           f"build the model with the config saved beside the base weights")
        self.load_state_dict(state, strict=False)

    def task_state_dict(self, name):
        """Copies of one task's parameters alone (small; load with `load_task_state_dict`)."""
        return {k: p.detach().clone() for k, p in self._task_named_parameters(name).items()}

    def load_task_state_dict(self, name, state):
        """Load one task's parameters, creating the task if it does not exist yet."""
        if name not in self.tasks:
            self.add_task(name)
        target = self._task_named_parameters(name)
        if set(state) != set(target):
            raise KeyError(f"task state for {name!r} does not match this model: missing "
                           f"{sorted(set(target) - set(state))}, unexpected {sorted(set(state) - set(target))}")
        with torch.no_grad():
            for key, p in target.items():
                if state[key].shape != p.shape:
                    raise ValueError(f"{key}: expected shape {tuple(p.shape)}, got {tuple(state[key].shape)}")
                p.copy_(state[key])

    def count_parameters(self, name=None):
        """{'base', 'per_task' (one task, default the first), 'per_task_ratio' = per_task / base}."""
        if not self.tasks:
            raise ValueError("count_parameters needs at least one task; call add_task first")
        base = sum(p.numel() for p in self.base_parameters())
        per_task = sum(p.numel() for p in self.task_parameters(name or self.tasks[0]))
        return {"base": base, "per_task": per_task, "per_task_ratio": per_task / base}
