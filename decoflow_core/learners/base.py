"""What every continual learner offers the protocol (``train.run``), and what it asks of ``train.fit``.

A learner never trains itself: for each task ``prepare_task`` says what to optimise (a ``TrainingPlan``,
or None when nothing is optimised), ``train.fit`` runs the loop, and ``finish_task`` does what follows
(freezing the base, adding the router's prototype, ...). ``patch_nll`` scores with one task's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import Config
from ..model import DeCoFlow
from ..router import PrototypeRouter

SHARED = "shared"  # the single task name of one-flow baselines


@dataclass
class TrainingPlan:
    """What ``train.fit`` optimises for one task."""
    model: torch.nn.Module
    params: list
    config: Config  # epochs, batch size, lr, schedule, clipping, loss settings of this task
    loss_fn: Callable | None = None  # (model, x) -> loss; None: the flow's training loss
    penalty: Callable | None = None  # () -> a term added to every batch's loss (EWC)
    replay: torch.Tensor | None = None  # stored features mixed into every batch (replay)
    first: bool = True  # the model's first task: no warm-up


def with_lr(config: Config, lr: float | None) -> Config:
    """``config`` with its lr replaced by ``lr``; unchanged when ``lr`` is None."""
    return config if lr is None else config.replace(lr=lr)


def task_config(config: Config, first: bool) -> Config:
    """The config a task trains with: after the first task (adapters only, starting from zero)
    the lr is ``config.task_lr`` when set."""
    return config if first else with_lr(config, config.task_lr)


class Learner:
    """Common interface. ``prepare_task`` / ``finish_task`` around ``train.fit``; ``patch_nll`` scores."""

    uses_router = False
    breaks_no_replay = False
    continual = True
    isolated = False  # True: a learned task's parameters never change afterwards (its scores can be reused)

    def __init__(self, config: Config, dim: int, device: str):
        self.config, self.dim, self.device = config, dim, device
        self.router = PrototypeRouter(metric=config.router_metric, reg=config.router_reg,
                                      shrinkage=config.router_shrinkage, covariance=config.router_covariance,
                                      accept_quantile=config.router_accept_quantile) if self.uses_router else None

    def prepare_task(self, task: str, features: dict, *, seed: int) -> TrainingPlan | None:
        raise NotImplementedError

    def finish_task(self, task: str, features: dict, *, seed: int) -> None:
        """After training: by default the router learns the task's prototype -- or, with
        ``router_prototypes=class``, one per class (``features["by_class"]``: {class: pooled})."""
        if self.router is None:
            return
        by_class = features.get("by_class") or {task: features["pooled"]}
        if self.config.router_prototypes == "class":
            for name, pooled in by_class.items():
                self.router.add_task(name, pooled, task=task)
        else:
            self.router.add_task(task, features["pooled"])

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
