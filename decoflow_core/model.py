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

from .config import Config
from .data import task_name_problem
from .flow import (
    AffineCoupling,
    DecomposedSubnet,
    LoRALinear,
    MLPSubnet,
    SeparateMLPSubnet,
    freia_permutations,
    gather_channels,
    random_permutation,
)


class TaskAlignment(nn.Module):
    """Task-specific Alignment, TSA (Eq. 7-10).

    Parameter-free LayerNorm over the channels of each patch (Eq. 7), then a per-task, per-channel
    affine map with bounded gamma_t = 0.5 + 1.5 sigmoid(gamma_raw) in [0.5, 2] (Eq. 8) and
    beta_t = 2 tanh(beta_raw) in [-2, 2] (Eq. 9); out = gamma_t * x + beta_t (Eq. 10).
    ``init="identity"``: gamma_raw starts at logit(1/3) (gamma = 1) for every task; ``"official"``:
    -0.7 for the first task (gamma ~= 0.998) and 0 after it (gamma = 1.25). beta_raw starts at 0.
    `standardize=False` drops Eq. 7 and keeps the recalibration: the `cpu` profile's choice (on held-out
    synthetic defects), since the per-patch norm erases each patch's feature energy, e.g. a brightness
    change. With no task the standardization alone is applied.
    """

    def __init__(self, *, dim, standardize=True, init="identity", eps=1e-5):
        super().__init__()
        if init not in ("identity", "official"):
            raise ValueError(f"TSA init must be 'identity' or 'official', got {init!r}")
        self.dim, self.standardize, self.init, self.eps = dim, standardize, init, eps
        self.gamma_raw = nn.ParameterDict()
        self.beta_raw = nn.ParameterDict()

    def add_task(self, name, *, like):
        if self.init == "official":
            start = -0.7 if not self.gamma_raw else 0.0
        else:
            start = math.log(0.5)
        self.gamma_raw[name] = nn.Parameter(torch.full((self.dim,), start).to(like))
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

    The kernel (zero padding) is base. ``gate="per_task"``: a = sigmoid(g_t), one learnable scalar per
    task starting at g_t = 0 (a = 0.5); ``"shared"`` (the official code): one scalar of the base,
    starting at 0.5, so it trains with the first task only. ``init="identity"``: the kernel starts as
    the identity (centre tap 1, so C = F2 at first); ``"box"``: as a 1/k^2 box blur (official).
    ``bias`` adds a per-channel bias to C (official, zero at first). The paper states neither k nor
    the initial gate. With no task SCM is skipped.
    """

    def __init__(self, *, dim, kernel=3, gate="per_task", init="identity", bias=False):
        super().__init__()
        if gate not in ("per_task", "shared") or init not in ("identity", "box"):
            raise ValueError(f"SCM gate must be 'per_task' or 'shared' and init 'identity' or 'box', "
                             f"got {gate!r}, {init!r}")
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=bias)
        with torch.no_grad():
            if init == "box":
                self.conv.weight.fill_(1.0 / kernel ** 2)
            else:
                self.conv.weight.zero_()
                self.conv.weight[:, :, kernel // 2, kernel // 2] = 1.0
            if bias:
                self.conv.bias.zero_()
        self.gate = nn.ParameterDict()  # per task
        self.shared_gate = nn.Parameter(torch.tensor(0.5)) if gate == "shared" else None

    def add_task(self, name, *, like):
        if self.shared_gate is None:
            self.gate[name] = nn.Parameter(torch.zeros(()).to(like))

    def forward(self, x, task):  # x: (B, D, H, W)
        if task is None:
            return x
        a = torch.sigmoid(self.gate[task] if self.shared_gate is None else self.shared_gate)
        return (1 - a) * x + a * self.conv(x)


class DeCoFlow(nn.Module):
    """The DeCoFlow model (Sec. 3.3-3.7). All defaults are the paper's except where it is silent:

    clamp=1.9 (Eq. 17 alpha_clamp), alpha_max=1.0 (Eq. 12), scm_kernel=3 (Eq. 11), and the
    subnet width hidden_ratio * dim (also used by ACL unless acl_hidden_ratio is given). lora_alpha=None
    means alpha = rank (LoRA scale 1). Sec. 3.9 mentions 8 DCS layers; Sec. 4.1 (used here) says 6 DCS + 2 ACL.

    The remaining options reproduce the official code where it departs from the text (the
    ``official`` profile; README "Paper, official code and profiles"): ``coupling="freia"`` (FrEIA's
    AllInOneBlock for the DCS blocks, with its numpy-drawn permutations), ``dcs_zero_init=False``,
    ``lora_init="xavier"``, ``lora_task_bias``, ``context_bias``/``context_zero_init``, the SCM's
    ``scm_gate``/``scm_init``/``scm_bias``, ``tsa_init="official"`` and ``acl_layout="official"`` (two
    couplings on fixed halves, separate three-layer s and t MLPs).
    """

    def __init__(self, *, dim, n_dcs=6, n_acl=2, rank=64, lora_alpha=None, hidden_ratio=1.0,
                 clamp=1.9, context_kernel=5, scm_kernel=3, alpha_max=1.0, use_tsa=True,
                 standardize=True, use_scm=True, use_acl=True, use_context=True, coupling="soft_clamp",
                 dcs_zero_init=True, lora_init="kaiming", lora_task_bias=False, context_bias=False,
                 context_zero_init=False, scm_gate="per_task", scm_init="identity", scm_bias=False,
                 tsa_init="identity", acl_layout="paper", acl_hidden_ratio=None):
        super().__init__()
        if coupling not in ("soft_clamp", "freia") or acl_layout not in ("paper", "official"):
            raise ValueError(f"coupling must be 'soft_clamp' or 'freia' and acl_layout 'paper' or 'official', "
                             f"got {coupling!r}, {acl_layout!r}")
        self.config = dict(dim=dim, n_dcs=n_dcs, n_acl=n_acl, rank=rank, lora_alpha=lora_alpha,
                           hidden_ratio=hidden_ratio, clamp=clamp, context_kernel=context_kernel,
                           scm_kernel=scm_kernel, alpha_max=alpha_max, use_tsa=use_tsa,
                           standardize=standardize, use_scm=use_scm, use_acl=use_acl,
                           use_context=use_context, coupling=coupling, dcs_zero_init=dcs_zero_init,
                           lora_init=lora_init, lora_task_bias=lora_task_bias, context_bias=context_bias,
                           context_zero_init=context_zero_init, scm_gate=scm_gate, scm_init=scm_init,
                           scm_bias=scm_bias, tsa_init=tsa_init, acl_layout=acl_layout,
                           acl_hidden_ratio=acl_hidden_ratio)
        self.dim, self.n_dcs, self.clamp, self.acl_layout = dim, n_dcs, clamp, acl_layout
        self.n_acl = n_acl if use_acl else 0
        self.hidden = max(1, round(hidden_ratio * dim))
        self.acl_hidden = self.hidden if acl_hidden_ratio is None else max(1, round(acl_hidden_ratio * dim))
        self.split = (dim // 2, dim - dim // 2)  # (d1, d2) of the kit's coupling blocks
        self.tsa = TaskAlignment(dim=dim, standardize=standardize, init=tsa_init) if use_tsa else None
        self.scm = (SpatialContextMixer(dim=dim, kernel=scm_kernel, gate=scm_gate, init=scm_init, bias=scm_bias)
                    if use_scm else None)
        freia = coupling == "freia"
        perms = freia_permutations(dim, n_dcs) if freia else [random_permutation(dim, i) for i in range(n_dcs)]
        passive = dim - dim // 2 if freia else dim // 2
        self.dcs = nn.ModuleList(
            AffineCoupling(dim=dim, clamp=clamp, perm=perm, freia=freia, subnet=DecomposedSubnet(
                in_dim=passive, out_dim=dim - passive, hidden=self.hidden, rank=rank, lora_alpha=lora_alpha,
                lora_init=lora_init, lora_task_bias=lora_task_bias, context_kernel=context_kernel,
                use_context=use_context, alpha_max=alpha_max, context_bias=context_bias,
                context_zero_init=context_zero_init, zero_init=dcs_zero_init))
            for perm in perms)
        self.acl = nn.ModuleDict()  # task name -> nn.ModuleList of its ACL blocks
        self.tasks = []
        self.active_task = None
        self.base_frozen = False

    # ---- tasks -------------------------------------------------------------------------------
    def _acl_block(self, j):
        if self.acl_layout == "official":  # fixed halves: x1 is the first half, then the second
            half = self.dim // 2
            perm = None if j % 2 == 0 else torch.cat([torch.arange(half, self.dim), torch.arange(half)])
            passive = half if j % 2 == 0 else self.dim - half
            subnet = SeparateMLPSubnet(in_dim=passive, out_dim=self.dim - passive, hidden=self.acl_hidden)
            return AffineCoupling(dim=self.dim, clamp=self.clamp, perm=perm, passive=passive, subnet=subnet)
        return AffineCoupling(dim=self.dim, clamp=self.clamp, perm=random_permutation(self.dim, self.n_dcs + j),
                              subnet=MLPSubnet(in_dim=self.split[0], out_dim=self.split[1], hidden=self.acl_hidden))

    def add_task(self, name):
        """Create task `name`: LoRA adapters (B = 0), TSA, SCM gate and ACL blocks (identity)."""
        problem = task_name_problem(name)
        if problem:
            raise ValueError(problem)
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
            self.acl[name] = nn.ModuleList(self._acl_block(j) for j in range(self.n_acl)).to(like)
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
        x = x.permute(0, 2, 3, 1).contiguous()  # channels-last in memory from here on (B, H, W, D)
        if self.tsa is not None:
            x = self.tsa(x, self.active_task)
        x = x.permute(0, 3, 1, 2)  # (B, D, H, W) view: the SCM's depthwise convolution is fastest on it
        if self.scm is not None:
            x = self.scm(x, self.active_task)
        return x

    def _blocks(self):
        return list(self.dcs) + list(self.acl[self.active_task] if self.active_task in self.acl else [])

    def flow(self, u, *, record=None):
        """DCS then ACL blocks: u (B, D, H, W) -> z (B, D, H, W), summed log-det (B, H, W) (Eq. 16).

        With a dict ``record``, also stores every block's log-det (``block_logdets``) and the output of
        the DCS blocks alone (``z_base`` (B, H, W, D) and ``logdet_base`` (B, H, W)).
        """
        h = u.permute(0, 2, 3, 1)  # (B, H, W, D)
        logdet = torch.zeros(h.shape[:-1], dtype=h.dtype, device=h.device)
        pending = None  # a gather not applied yet: one block's `post` is merged with the next one's `pre`
        for k, block in enumerate(self._blocks()):
            if record is not None and k == self.n_dcs:
                h, pending = _gather(h, pending), None
                record.update(z_base=h, logdet_base=logdet)
            h = _gather(h, _compose(pending, block.pre))
            h, block_logdet = block.coupled(h)
            logdet = logdet + block_logdet
            pending = block.post
            if record is not None:
                record.setdefault("block_logdets", []).append(block_logdet)
        h = _gather(h, pending)
        if record is not None and "z_base" not in record:
            record.update(z_base=h, logdet_base=logdet)
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
        return gaussian_log_prob(z) + logdet

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
        if self.scm is not None and name in self.scm.gate:
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

    def parameter_breakdown(self, name=None):
        """{'base': {component: count}, 'per_task': {component: count}} for one task (default the
        first). Buffers (block permutations, the fixed FrEIA affine) are not parameters and not counted."""
        if not self.tasks:
            raise ValueError("parameter_breakdown needs at least one task; call add_task first")
        out = {"base": {}, "per_task": {}}
        named = {"base": self._base_named_parameters(), "per_task": self._task_named_parameters(name or self.tasks[0])}
        for part, params in named.items():
            for key, p in params.items():
                component = _component(key)
                out[part][component] = out[part].get(component, 0) + p.numel()
        return out

    def count_parameters(self, name=None):
        """{'base', 'per_task' (one task, default the first), 'per_task_ratio' = per_task / base}."""
        if not self.tasks:
            raise ValueError("count_parameters needs at least one task; call add_task first")
        base = sum(p.numel() for p in self.base_parameters())
        per_task = sum(p.numel() for p in self.task_parameters(name or self.tasks[0]))
        return {"base": base, "per_task": per_task, "per_task_ratio": per_task / base}


def gaussian_log_prob(z):
    """log N(z; 0, I) per patch (Eq. 19): z (B, D, H, W) -> (B, H, W)."""
    return -0.5 * z.pow(2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def _component(key):
    """The part of the model a parameter key belongs to, for parameter counts."""
    parts = key.split(".")
    if parts[0] in ("acl", "tsa"):
        return parts[0]
    if parts[0] == "scm":
        return "scm_gate" if key == "scm.gate" else "spatial_mixer"
    if parts[-1] in ("lora_A", "lora_B", "task_bias"):
        return parts[-1]
    if "base" in parts:
        return "dcs_base_linear"
    return "context_alpha" if parts[-1] == "context_gate" else "context_conv"


def _compose(first, second):
    """One gather equal to gathering by ``first`` then by ``second`` (either may be None)."""
    if first is None or second is None:
        return second if first is None else first
    return first[second]


def _gather(h, index):
    return h if index is None else gather_channels(h, index)


def build_flow(config: Config, dim: int) -> DeCoFlow:
    """The flow a config describes, on ``dim``-channel patch features."""
    return DeCoFlow(dim=dim, n_dcs=config.n_dcs, n_acl=config.n_acl, rank=config.rank, lora_alpha=config.lora_alpha,
                    hidden_ratio=config.hidden_ratio, context_kernel=config.context_kernel,
                    alpha_max=config.context_alpha_max, use_tsa=config.use_tsa, standardize=config.standardize,
                    use_scm=config.use_scm, use_acl=config.use_acl, use_context=config.use_context,
                    coupling=config.coupling, dcs_zero_init=config.dcs_zero_init, lora_init=config.lora_init,
                    lora_task_bias=config.lora_task_bias, context_bias=config.context_bias,
                    context_zero_init=config.context_zero_init, scm_gate=config.scm_gate, scm_init=config.scm_init,
                    scm_bias=config.scm_bias, tsa_init=config.tsa_init, acl_layout=config.acl_layout,
                    acl_hidden_ratio=config.acl_hidden_ratio)
