"""The baseline families of the paper, on the same features and the same flow as DeCoFlow.

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

from ..losses import training_loss
from ..model import DeCoFlow, build_flow
from .base import SHARED, Learner, TrainingPlan, with_lr


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

    def prepare_task(self, task, features, *, seed):
        penalty = self.ewc_penalty if (self.method == "ewc" and self.fisher) else None
        replay = self.buffer if self.method == "replay" else None
        return TrainingPlan(self.model, list(self.model.parameters()), self.config, penalty=penalty,
                            replay=replay, first=not self.trained)

    def finish_task(self, task, features, *, seed):
        self.trained = True
        if self.method == "ewc":
            self._update_fisher(features["patch"])
        if self.method == "replay":
            keep = torch.randperm(len(features["patch"]), generator=torch.Generator().manual_seed(seed))
            self.buffer = torch.cat([self.buffer, features["patch"][keep[:self.config.replay_per_task]]])

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
    isolated = True

    def __init__(self, config, dim, device):
        super().__init__(config, dim, device)
        self.models: dict[str, DeCoFlow] = {}

    def _new(self, task):
        model = build_flow(self.config, self.dim).to(self.device)
        model.add_task(task)
        model.set_task(task)
        self.models[task] = model
        return model

    def prepare_task(self, task, features, *, seed):
        model = self._new(task)
        return TrainingPlan(model, list(model.parameters()), with_lr(self.config, self.config.independent_lr))

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
    isolated = True

    def __init__(self, config, dim, device, *, reg: float = 0.01):
        super().__init__(config, dim, device)
        self.reg = reg
        self.gaussians: dict[str, dict] = {}

    def prepare_task(self, task, features, *, seed):
        return None  # nothing to optimise: the Gaussians are estimated in finish_task

    def finish_task(self, task, features, *, seed):
        x = features["patch"].double().flatten(2).permute(2, 0, 1)  # (H*W, N, D)
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        cov = centred.transpose(1, 2) @ centred / (x.shape[1] - 1)  # (H*W, D, D)
        precision = torch.linalg.inv(cov + self.reg * torch.eye(self.dim, dtype=cov.dtype))
        self.gaussians[task] = {"mean": mean.float(), "precision": precision.float()}

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
