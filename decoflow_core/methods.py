"""The continual learners compared in the kit: DeCoFlow and the baseline families of the paper.

All use the same features, the same flow (``DeCoFlow``) and the same training loop (``fit``):

* ``decoflow``    -- frozen shared base after task 0, per-task LoRA/TSA/SCM gate/ACL, prototype router.
* ``finetune``    -- one flow, everything trained on each new task: the forgetting lower bound.
* ``ewc``         -- ``finetune`` plus an elastic penalty on the diagonal Fisher of earlier tasks.
* ``replay``      -- ``finetune`` plus a small buffer of stored feature maps of earlier tasks.
                     It BREAKS the no-replay rule of the protocol; it is here as a reference.
* ``joint``       -- one flow trained once on all tasks together: not continual, an upper reference.
* ``independent`` -- a full flow per task and the router: perfect isolation, linear growth.
* ``padim``       -- a reference outside the flow family: one Gaussian per patch position and per
                     task (PaDiM-style), scored with the true task id. Not continual, not routed.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .config import Config
from .losses import logdet_penalty, patch_nll, tail_aware_loss
from .model import DeCoFlow, gaussian_log_prob
from .router import PrototypeRouter

# the same frozen-base + per-task-LoRA decomposition on other density models (alternatives.py)
ALTERNATIVE_METHODS = ("ae_lora", "vae_lora", "ts_lora", "feature_prompt")
METHODS = ("decoflow", "finetune", "ewc", "replay", "joint", "independent", "padim", *ALTERNATIVE_METHODS)
SHARED = "shared"  # the single task name of one-flow baselines


def build_flow(config: Config, dim: int) -> DeCoFlow:
    return DeCoFlow(dim=dim, n_dcs=config.n_dcs, n_acl=config.n_acl, rank=config.rank, lora_alpha=config.lora_alpha,
                    hidden_ratio=config.hidden_ratio, context_kernel=config.context_kernel,
                    alpha_max=config.context_alpha_max, use_tsa=config.use_tsa, standardize=config.standardize,
                    use_scm=config.use_scm, use_acl=config.use_acl, use_context=config.use_context,
                    coupling=config.coupling, dcs_zero_init=config.dcs_zero_init, lora_init=config.lora_init,
                    lora_task_bias=config.lora_task_bias, context_bias=config.context_bias,
                    context_zero_init=config.context_zero_init, scm_gate=config.scm_gate, scm_init=config.scm_init,
                    scm_bias=config.scm_bias, tsa_init=config.tsa_init, acl_layout=config.acl_layout,
                    acl_hidden_ratio=config.acl_hidden_ratio)


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


def with_lr(config: Config, lr: float | None) -> Config:
    """``config`` with its lr replaced by ``lr``; unchanged when ``lr`` is None."""
    return config if lr is None else config.replace(lr=lr)


def task_config(config: Config, first: bool) -> Config:
    """The config a task trains with: after the first task (adapters only, starting from zero)
    the lr is ``config.task_lr`` when set."""
    return config if first else with_lr(config, config.task_lr)


def epoch_lr(config: Config, epoch: int, *, first: bool) -> float:
    """The learning rate of ``epoch`` (0-based). A task after the first warms up linearly over
    ``warmup_epochs`` (lr (e + 1) / warmup), then follows the schedule from its start: constant, or
    cosine from lr to lr_min_ratio * lr over ``epochs`` epochs (as torch's CosineAnnealingLR with
    T_max = epochs stepped once per epoch; the official code starts it after the warm-up, so a
    later task's last epoch stops short of the minimum)."""
    warmup = 0 if first else config.warmup_epochs
    if epoch < warmup:
        return config.lr * (epoch + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")
    low = config.lr_min_ratio * config.lr
    return low + (config.lr - low) * (1 + math.cos(math.pi * (epoch - warmup) / config.epochs)) / 2


DROP_LAST_FROM = 32  # the official loader drops the last partial batch from 32 training images on


def fit(model: torch.nn.Module, params: list, patches: torch.Tensor, config: Config, *, seed: int,
        penalty=None, replay: torch.Tensor | None = None, desc: str = "train", loss_fn=None,
        first: bool = True) -> dict:
    """Train ``params`` with AdamP for ``config.epochs`` epochs on patch features (N, D, H, W).

    ``loss_fn(model, x)`` defaults to the flow's ``training_loss``. The lr follows ``epoch_lr``
    (``first``: the model's first task, no warm-up); gradients are clipped to ``grad_clip``. Every
    epoch runs to the end: no epoch is chosen by any score. A non-finite loss skips its step and is
    counted, as is a loss above ``skip_loss_above``.
    Returns {"loss": [mean loss per epoch], "nonfinite": count, "skipped": count}.
    """
    loss_fn = loss_fn or (lambda m, x: training_loss(m, x, config))
    from timm.optim import AdamP
    device = next(model.parameters()).device
    optimizer = AdamP(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    drop_last = config.drop_last and len(patches) >= DROP_LAST_FROM
    model.train()
    history, nonfinite, skipped = [], 0, 0
    for epoch in tqdm(range(config.epochs), desc=desc, unit="epoch", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config, epoch, first=first)
        losses = []
        for idx in torch.randperm(len(patches), generator=generator).split(config.batch_size):
            if drop_last and len(idx) < config.batch_size:
                continue
            x = patches[idx]
            if replay is not None and len(replay):
                pick = torch.randint(len(replay), (max(1, len(idx) // 2),), generator=generator)
                x = torch.cat([x, replay[pick]])
            loss = loss_fn(model, x.to(device))
            if penalty is not None:
                loss = loss + penalty()
            if not torch.isfinite(loss):
                nonfinite += 1
                continue
            if config.skip_loss_above is not None and loss.item() > config.skip_loss_above:
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
        history.append(sum(losses) / max(1, len(losses)))
    model.eval()
    return {"loss": history, "nonfinite": nonfinite, "skipped": skipped}


class Learner:
    """Common interface. ``learn`` one task's training features; ``patch_nll`` scores with a task."""

    uses_router = False
    breaks_no_replay = False
    continual = True

    def __init__(self, config: Config, dim: int, device: str):
        self.config, self.dim, self.device = config, dim, device
        self.router = PrototypeRouter(metric=config.router_metric, reg=config.router_reg,
                                      shrinkage=config.router_shrinkage) if self.uses_router else None

    def learn(self, task: str, features: dict, *, seed: int) -> dict:
        raise NotImplementedError

    def model_for(self, task: str) -> DeCoFlow:
        raise NotImplementedError

    @torch.no_grad()
    def patch_nll(self, task: str, patches: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(N, D, H, W) features scored with ``task``'s parameters -> (N, H, W) patch NLL (Eq. 22)."""
        model = self.model_for(task)
        out = [-model.log_prob(patches[i:i + batch_size].to(self.device)).cpu()
               for i in range(0, len(patches), batch_size)]
        return torch.cat(out)

    def route(self, pooled: torch.Tensor) -> list[str]:
        """The task chosen for each image by the router (only tasks learned so far are known)."""
        return self.router.route(pooled)

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def params(self) -> dict:
        raise NotImplementedError


class DeCoFlowLearner(Learner):
    uses_router = True

    def __init__(self, config, dim, device):
        super().__init__(config, dim, device)
        self.model = build_flow(config, dim).to(device)

    def learn(self, task, features, *, seed):
        first = not self.model.tasks
        self.model.add_task(task)
        self.model.set_task(task)
        log = fit(self.model, self.model.trainable_parameters(), features["patch"],
                  task_config(self.config, first), seed=seed, desc=task, first=first)
        if first and self.config.freeze_base:
            self.model.freeze_base()
        self.router.add_task(task, features["pooled"])
        return log

    def model_for(self, task):
        self.model.set_task(task)
        return self.model

    def state_dict(self):
        return {"base": self.model.base_state_dict(), "router": self.router.state_dict(),
                "tasks": {t: self.model.task_state_dict(t) for t in self.model.tasks}}

    def load_state_dict(self, state):
        for task, task_state in state["tasks"].items():
            self.model.load_task_state_dict(task, task_state)
        self.model.load_base_state_dict(state["base"])
        if state["tasks"] and self.config.freeze_base:
            self.model.freeze_base()
        self.router.load_state_dict(state["router"])

    def params(self):
        return self.model.count_parameters()


class SharedFlowLearner(Learner):
    """finetune / ewc / replay / joint: one flow whose every weight is trained on each task."""

    def __init__(self, config, dim, device, *, method: str):
        super().__init__(config, dim, device)
        self.method = method
        self.breaks_no_replay = method == "replay"
        self.continual = method != "joint"
        self.model = build_flow(config, dim).to(device)
        self.model.add_task(SHARED)
        self.model.set_task(SHARED)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.buffer = torch.empty(0)
        self.trained = False  # a task was learned: later tasks warm up (warmup_epochs)

    def _named(self):
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}

    def ewc_penalty(self) -> torch.Tensor:
        """(lambda / 2) * sum F (theta - theta*)^2 over the parameters of earlier tasks."""
        named = self._named()
        total = sum((self.fisher[k] * (named[k] - self.anchor[k]).pow(2)).sum() for k in self.fisher)
        return 0.5 * self.config.ewc_lambda * total

    def _update_fisher(self, patches: torch.Tensor) -> None:
        """Accumulate the diagonal empirical Fisher (squared batch gradients of the loss)."""
        named = self._named()
        fisher = {k: torch.zeros_like(p) for k, p in named.items()}
        batches = patches.split(self.config.batch_size)
        for x in batches:
            self.model.zero_grad(set_to_none=True)
            training_loss(self.model, x.to(self.device), self.config).backward()
            for k, p in named.items():
                if p.grad is not None:
                    fisher[k] += p.grad.detach().pow(2) / len(batches)
        self.model.zero_grad(set_to_none=True)
        for k in fisher:
            self.fisher[k] = self.fisher.get(k, 0) + fisher[k]
            self.anchor[k] = named[k].detach().clone()

    def learn(self, task, features, *, seed):
        penalty = self.ewc_penalty if (self.method == "ewc" and self.fisher) else None
        replay = self.buffer if self.method == "replay" else None
        log = fit(self.model, list(self.model.parameters()), features["patch"], self.config,
                  seed=seed, penalty=penalty, replay=replay, desc=task, first=not self.trained)
        self.trained = True
        if self.method == "ewc":
            self._update_fisher(features["patch"])
        if self.method == "replay":
            keep = torch.randperm(len(features["patch"]), generator=torch.Generator().manual_seed(seed))
            self.buffer = torch.cat([self.buffer, features["patch"][keep[:self.config.replay_per_task]]])
        return log

    def model_for(self, task):
        return self.model

    def state_dict(self):
        return {"model": self.model.state_dict(), "fisher": self.fisher, "anchor": self.anchor,
                "buffer": self.buffer}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.fisher, self.anchor, self.buffer = state["fisher"], state["anchor"], state["buffer"]
        self.trained = True

    def params(self):
        total = sum(p.numel() for p in self.model.parameters())
        return {"base": total, "per_task": 0, "per_task_ratio": 0.0}


class IndependentLearner(Learner):
    """A whole flow per task (no sharing) and the prototype router."""

    uses_router = True

    def __init__(self, config, dim, device):
        super().__init__(config, dim, device)
        self.models: dict[str, DeCoFlow] = {}

    def _new(self, task):
        model = build_flow(self.config, self.dim).to(self.device)
        model.add_task(task)
        model.set_task(task)
        self.models[task] = model
        return model

    def learn(self, task, features, *, seed):
        model = self._new(task)
        log = fit(model, list(model.parameters()), features["patch"], with_lr(self.config, self.config.independent_lr),
                  seed=seed, desc=task)
        self.router.add_task(task, features["pooled"])
        return log

    def model_for(self, task):
        return self.models[task]

    def state_dict(self):
        return {"models": {t: m.state_dict() for t, m in self.models.items()},
                "router": self.router.state_dict()}

    def load_state_dict(self, state):
        for task, model_state in state["models"].items():
            self._new(task).load_state_dict(model_state)
        self.router.load_state_dict(state["router"])

    def params(self):
        per_task = sum(p.numel() for p in next(iter(self.models.values())).parameters()) if self.models else 0
        return {"base": 0, "per_task": per_task, "per_task_ratio": math.nan}


class PaDiMReference(Learner):
    """Per task and per grid position a Gaussian of the patch features; score = squared Mahalanobis."""

    continual = False

    def __init__(self, config, dim, device, *, reg: float = 0.01):
        super().__init__(config, dim, device)
        self.reg = reg
        self.gaussians: dict[str, dict] = {}

    def learn(self, task, features, *, seed):
        x = features["patch"].double().flatten(2).permute(2, 0, 1)  # (H*W, N, D)
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        cov = centred.transpose(1, 2) @ centred / (x.shape[1] - 1)  # (H*W, D, D)
        precision = torch.linalg.inv(cov + self.reg * torch.eye(self.dim, dtype=cov.dtype))
        self.gaussians[task] = {"mean": mean.float(), "precision": precision.float()}
        return {"loss": [], "nonfinite": 0}

    @torch.no_grad()
    def patch_nll(self, task, patches, batch_size=32):
        g = self.gaussians[task]
        n, d, h, w = patches.shape
        diff = patches.flatten(2).permute(2, 0, 1) - g["mean"]  # (H*W, N, D)
        squared = torch.einsum("pnd,pde,pne->pn", diff, g["precision"], diff)
        return squared.T.reshape(n, h, w)

    def state_dict(self):
        return {"gaussians": self.gaussians}

    def load_state_dict(self, state):
        self.gaussians = state["gaussians"]

    def params(self):
        per_task = sum(t.numel() for t in next(iter(self.gaussians.values())).values()) if self.gaussians else 0
        return {"base": 0, "per_task": per_task, "per_task_ratio": math.nan}


def make_learner(method: str, config: Config, dim: int, device: str) -> Learner:
    if method == "decoflow":
        return DeCoFlowLearner(config, dim, device)
    if method == "independent":
        return IndependentLearner(config, dim, device)
    if method in ("finetune", "ewc", "replay", "joint"):
        return SharedFlowLearner(config, dim, device, method=method)
    if method == "padim":
        return PaDiMReference(config, dim, device)
    if method in ALTERNATIVE_METHODS:
        from .alternatives import ALTERNATIVES  # imports this module: loaded on first use
        return ALTERNATIVES[method](config, dim, device)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
