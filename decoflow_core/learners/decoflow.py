"""DeCoFlow as a continual learner: the base trains with the first task and is then frozen; every
task owns its LoRA adapters, TSA, SCM gate and ACL blocks; the prototype router picks the task."""
from __future__ import annotations

from ..model import build_flow
from .base import Learner, TrainingPlan, task_config


class DeCoFlowLearner(Learner):
    uses_router = True

    @property
    def isolated(self):
        return self.config.freeze_base  # with a trainable base every task moves the shared weights

    def __init__(self, config, dim, device):
        super().__init__(config, dim, device)
        self.model = build_flow(config, dim).to(device)

    def prepare_task(self, task, features, *, seed):
        first = not self.model.tasks
        self.model.add_task(task)
        self.model.set_task(task)
        return TrainingPlan(self.model, self.model.trainable_parameters(), task_config(self.config, first),
                            first=first)

    def finish_task(self, task, features, *, seed):
        if len(self.model.tasks) == 1 and self.config.freeze_base:
            self.model.freeze_base()
        super().finish_task(task, features, seed=seed)

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
