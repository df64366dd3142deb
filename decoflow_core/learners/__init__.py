"""The continual learners compared in the kit, by name: DeCoFlow, the baselines, and the alternatives
of the "why a flow?" and placement analyses. This registry imports them all; none imports it."""
from __future__ import annotations

from ..config import Config
from .alternatives import AELoRALearner, FeaturePromptLearner, TSLoRALearner, VAELoRALearner
from .base import SHARED, Learner, TrainingPlan
from .baselines import IndependentLearner, PaDiMReference, SharedFlowLearner
from .decoflow import DeCoFlowLearner

# the same frozen-base + per-task-LoRA decomposition on other density models (alternatives.py)
ALTERNATIVES = {"ae_lora": AELoRALearner, "vae_lora": VAELoRALearner, "ts_lora": TSLoRALearner,
                "feature_prompt": FeaturePromptLearner}
SHARED_FLOW_METHODS = ("finetune", "ewc", "replay", "joint")
METHODS = ("decoflow", *SHARED_FLOW_METHODS, "independent", "padim", *ALTERNATIVES)

__all__ = ["ALTERNATIVES", "METHODS", "SHARED", "Learner", "TrainingPlan", "make_learner"]


def make_learner(method: str, config: Config, dim: int, device: str) -> Learner:
    if method == "decoflow":
        return DeCoFlowLearner(config, dim, device)
    if method == "independent":
        return IndependentLearner(config, dim, device)
    if method in SHARED_FLOW_METHODS:
        return SharedFlowLearner(config, dim, device, method=method)
    if method == "padim":
        return PaDiMReference(config, dim, device)
    if method in ALTERNATIVES:
        return ALTERNATIVES[method](config, dim, device)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
