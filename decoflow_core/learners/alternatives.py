"""Alternative continual learners for the paper's analyses "why a normalizing flow?" (Sec. 4.4.1) and
"coupling-level vs. feature-level adaptation" (Sec. 4.4.2).

The paper names these comparisons but gives no architecture, size or objective for them; everything
below is our reading. What all four share with DeCoFlow: the same patch features, the same training
loop (``train.fit``: AdamP, the profile's epochs, batch size, lr and task_lr, no epoch selection), the
prototype router for task-agnostic inference, and the isolation scheme. Task 0 trains the shared
base together with its own adapter; the base is then frozen for good and every later task trains
only its own parameters, so earlier tasks' scores never change.

* ``ae_lora``  -- a per-patch feature autoencoder on the channels of each patch: encoder D -> hidden
  -> bottleneck, decoder bottleneck -> hidden -> D, ReLU between layers, every Linear a ``LoRALinear``.
  hidden = round(hidden_ratio * D) as in the flow's subnets; bottleneck = hidden // 2 (ours).
  The patch features are used as they come (no standardisation; the flow's TSA has no analogue here).
  Score = squared reconstruction error summed over the channels.
* ``vae_lora`` -- the same with a Gaussian latent: the encoder outputs mean and log-variance,
  reparameterised sampling in training, the mean at test. Score = 0.5 * squared error + KL(q || N(0, I)),
  the negative ELBO of a unit-variance Gaussian decoder up to a constant.
* ``ts_lora``  -- teacher-student. The paper does not define its variant; ours is random-network
  distillation: the teacher is a random MLP D -> hidden -> hidden (ReLU), initialised from a fixed
  seed (``TEACHER_SEED``, independent of the run seed and the task) and never trained; the student,
  LoRA layers D -> hidden -> hidden -> hidden, learns to reproduce it on normal patches.
  Score = squared student-teacher error summed over the outputs. ``base`` counts the teacher too.
* ``feature_prompt`` -- adaptation at the input instead of inside the coupling subnets. Task 0 trains
  a DeCoFlow flow (``build_flow``) exactly as DeCoFlow's first task; then the whole flow, base and
  task 0's LoRA/TSA/SCM/ACL, is frozen, and each later task t learns only an additive prompt P_t of
  shape (D, H, W), initialised at zero: score = -log p(x + P_t) under task 0's flow. ``base`` counts
  the whole flow (base plus task 0's parameters), ``per_task`` the prompt.

The three non-flow learners train with the flow's Tail-Aware Loss on their patch score divided by
its width (D, or hidden for ``ts_lora``), so all objectives have the same shape. These learners always
freeze the base; ``freeze_base=False`` is refused rather than silently ignored.
"""
from __future__ import annotations

import torch
from torch import nn

from ..flow import LoRALinear
from ..losses import tail_aware_loss, training_loss
from ..model import build_flow
from .base import Learner, TrainingPlan, task_config

TEACHER_SEED = 1234  # the ts_lora teacher's weights; fixed, so every run and task has the same teacher


class LoRAMLP(nn.Sequential):
    """LoRALinear layers of the given widths acting on the last axis, ReLU between them (not after)."""

    def __init__(self, sizes, *, rank):
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(LoRALinear(n_in, n_out, rank=rank))
        super().__init__(*layers)


class LoRANet(nn.ModuleDict):
    """Named parts whose LoRALinear layers hold one adapter per task; every other weight is the base."""

    def lora_layers(self) -> dict[str, LoRALinear]:
        return {path: m for path, m in self.named_modules() if isinstance(m, LoRALinear)}

    def add_task(self, name):
        for layer in self.lora_layers().values():
            layer.add_task(name)

    def set_task(self, name):
        for layer in self.lora_layers().values():
            layer.active_task = name

    def task_named(self, name) -> dict:
        """One task's adapters under task-independent keys, e.g. 'encoder.0.lora_A'."""
        return {f"{path}.{key}": p for path, layer in self.lora_layers().items()
                for key, p in layer.task_parameters(name).items()}

    def base_named(self) -> dict:
        adapters = {id(p) for layer in self.lora_layers().values()
                    for p in [*layer.lora_A.values(), *layer.lora_B.values()]}
        return {k: p for k, p in self.named_parameters() if id(p) not in adapters}

    def adapter_size(self) -> int:
        """Parameters one task adds: r * (in + out) per LoRA layer."""
        return sum(m.rank * (m.base.in_features + m.base.out_features) for m in self.lora_layers().values())


def _copy_(params: dict, state: dict) -> None:
    if set(params) != set(state):
        raise KeyError(f"state does not match the model: expected {sorted(params)}, got {sorted(state)}")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])


class _RoutedLearner(Learner):
    """Routed learners scored by ``score(task, x)``: (B, D, H, W) on the device -> (B, H, W)."""

    uses_router = True
    isolated = True  # the base is frozen after task 0 and every later task trains only its own parameters

    def __init__(self, config, dim, device):
        if not config.freeze_base:
            raise ValueError("the alternative learners always freeze the base after task 0; "
                             "freeze_base=False is only supported by decoflow")
        super().__init__(config, dim, device)
        self.hidden = max(1, round(config.hidden_ratio * dim))

    @torch.no_grad()
    def patch_nll(self, task, patches, batch_size=32):
        return torch.cat([self.score(task, patches[i:i + batch_size].to(self.device)).cpu()
                          for i in range(0, len(patches), batch_size)])


class _LoRALearner(_RoutedLearner):
    """A LoRANet whose base learns with task 0; subclasses define ``build`` and ``patch_score``."""

    def __init__(self, config, dim, device):
        super().__init__(config, dim, device)
        self.net = self.build().to(device)
        self.tasks: list[str] = []

    def build(self) -> LoRANet:
        raise NotImplementedError

    def patch_score(self, x, *, train: bool) -> tuple[torch.Tensor, int]:
        """Channels-last x (B, H, W, D) -> (per-patch score (B, H, W), its width for the loss)."""
        raise NotImplementedError

    def _freeze_base(self):
        for p in self.net.base_named().values():
            p.requires_grad_(False)

    def score(self, task, x):
        self.net.set_task(task)
        return self.patch_score(x.permute(0, 2, 3, 1), train=False)[0]

    def _loss(self, x):
        score, width = self.patch_score(x.permute(0, 2, 3, 1), train=True)
        return tail_aware_loss(score / width, lambda_tail=self.config.lambda_tail, top_k=self.config.top_k)

    def prepare_task(self, task, features, *, seed):
        first = not self.tasks
        self.net.add_task(task)
        self.net.set_task(task)
        self.tasks.append(task)
        params = list(self.net.task_named(task).values())
        if first:
            params += [p for p in self.net.base_named().values() if p.requires_grad]
        return TrainingPlan(self.net, params, task_config(self.config, first), first=first,
                            loss_fn=lambda net, x: self._loss(x))

    def finish_task(self, task, features, *, seed):
        self._freeze_base()
        super().finish_task(task, features, seed=seed)

    def state_dict(self):
        clone = lambda named: {k: p.detach().clone() for k, p in named.items()}
        return {"base": clone(self.net.base_named()), "router": self.router.state_dict(),
                "tasks": {t: clone(self.net.task_named(t)) for t in self.tasks}}

    def load_state_dict(self, state):
        for task, task_state in state["tasks"].items():
            if task not in self.tasks:
                self.net.add_task(task)
                self.tasks.append(task)
            _copy_(self.net.task_named(task), task_state)
        _copy_(self.net.base_named(), state["base"])
        if self.tasks:
            self._freeze_base()
        self.router.load_state_dict(state["router"])

    def params(self):
        base = sum(p.numel() for p in self.net.base_named().values())
        per_task = self.net.adapter_size()
        return {"base": base, "per_task": per_task, "per_task_ratio": per_task / base}


class AELoRALearner(_LoRALearner):
    def build(self):
        h, b, r = self.hidden, max(1, self.hidden // 2), self.config.rank
        return LoRANet({"encoder": LoRAMLP([self.dim, h, b], rank=r), "decoder": LoRAMLP([b, h, self.dim], rank=r)})

    def patch_score(self, x, *, train):
        return (self.net["decoder"](self.net["encoder"](x)) - x).pow(2).sum(-1), self.dim


class VAELoRALearner(_LoRALearner):
    def build(self):
        h, b, r = self.hidden, max(1, self.hidden // 2), self.config.rank
        return LoRANet({"encoder": LoRAMLP([self.dim, h, 2 * b], rank=r), "decoder": LoRAMLP([b, h, self.dim], rank=r)})

    def patch_score(self, x, *, train):
        mu, logvar = self.net["encoder"](x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if train else mu
        reconstruction = 0.5 * (self.net["decoder"](z) - x).pow(2).sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        return reconstruction + kl, self.dim


class TSLoRALearner(_LoRALearner):
    def build(self):
        h = self.hidden
        with torch.random.fork_rng(devices=[]):  # the teacher does not depend on (or move) the run's RNG
            torch.manual_seed(TEACHER_SEED)
            teacher = nn.Sequential(nn.Linear(self.dim, h), nn.ReLU(), nn.Linear(h, h)).requires_grad_(False)
        return LoRANet({"teacher": teacher, "student": LoRAMLP([self.dim, h, h, h], rank=self.config.rank)})

    def patch_score(self, x, *, train):
        return (self.net["student"](x) - self.net["teacher"](x)).pow(2).sum(-1), self.hidden


class FeaturePromptLearner(_RoutedLearner):
    """Task 0: a DeCoFlow flow trained as usual; later tasks: an input prompt under the frozen flow."""

    def __init__(self, config, dim, device):
        super().__init__(config, dim, device)
        self.flow = build_flow(config, dim).to(device)
        self.prompts = nn.ParameterDict()  # every task but the first
        self.grid = (config.grid, config.grid)  # replaced by the features' (H, W) at task 0

    def _input(self, task, x):
        return x + self.prompts[task] if task in self.prompts else x

    def score(self, task, x):
        self.flow.set_task(self.flow.tasks[0])  # every task is scored with task 0's flow
        return -self.flow.log_prob(self._input(task, x))

    def prepare_task(self, task, features, *, seed):
        patches = features["patch"]
        if not self.flow.tasks:
            self.grid = tuple(patches.shape[2:])
            self.flow.add_task(task)
            self.flow.set_task(task)
            return TrainingPlan(self.flow, self.flow.trainable_parameters(), self.config)
        self.prompts[task] = nn.Parameter(torch.zeros(patches.shape[1:], device=self.device))
        return TrainingPlan(self.flow, [self.prompts[task]], task_config(self.config, False), first=False,
                            loss_fn=lambda flow, x: training_loss(flow, self._input(task, x), self.config))

    def finish_task(self, task, features, *, seed):
        self.flow.requires_grad_(False)
        super().finish_task(task, features, seed=seed)

    def state_dict(self):
        first = self.flow.tasks[:1]
        tasks = {t: self.flow.task_state_dict(t) for t in first}
        tasks.update({t: {"prompt": p.detach().clone()} for t, p in self.prompts.items()})
        return {"base": self.flow.base_state_dict(), "tasks": tasks, "grid": self.grid,
                "router": self.router.state_dict()}

    def load_state_dict(self, state):
        for task, task_state in state["tasks"].items():
            if "prompt" in task_state:
                self.prompts[task] = nn.Parameter(task_state["prompt"].clone().to(self.device))
            else:
                self.flow.load_task_state_dict(task, task_state)
        self.flow.load_base_state_dict(state["base"])
        if self.flow.tasks:
            self.flow.set_task(self.flow.tasks[0])
            self.flow.requires_grad_(False)
        self.grid = tuple(state["grid"])
        self.router.load_state_dict(state["router"])

    def params(self):
        base = sum(p.numel() for p in self.flow.parameters())  # the whole flow: base and task 0
        per_task = self.dim * self.grid[0] * self.grid[1]
        return {"base": base, "per_task": per_task, "per_task_ratio": per_task / base}
