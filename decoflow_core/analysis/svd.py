"""The spectrum of the weight change a new task needs (Sec. 4.3.3, 4.4.3; notebook 04): how much of a
full fine-tune's Delta W a rank-r update can hold."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import files
from ..config import Config, make_config
from ..flow import LoRALinear
from ..model import build_flow
from ..train import fit


def cumulative_energy(delta) -> np.ndarray:
    """Share of ||Delta W||_F^2 in the top r singular values, for r = 1..min(m, n) (ends at 1)."""
    s = np.linalg.svd(np.asarray(delta, dtype=np.float64), compute_uv=False)
    cumulative = np.cumsum(s ** 2)
    # dividing by the last partial sum (not a separate total) makes the curve end at exactly 1.0
    return cumulative / cumulative[-1] if cumulative[-1] > 0 else np.ones_like(cumulative)


def energy_at_rank(delta, rank: int) -> float:
    """Share of the energy of Delta W captured by its best rank-``rank`` approximation (Eckart-Young)."""
    curve = cumulative_energy(delta)
    return float(curve[min(rank, len(curve)) - 1])


def mean_energy_curve(curves: list) -> np.ndarray:
    """Mean of cumulative-energy curves of different lengths: past its full rank a curve stays at 1."""
    length = max(len(c) for c in curves)
    mean = np.mean([np.concatenate([c, np.ones(length - len(c))]) for c in curves], axis=0)
    return np.minimum(mean, 1.0)  # float rounding of the average must not exceed a share of 1


def random_energy(shape, rank: int, seed: int = 0) -> float:
    """energy_at_rank of a Gaussian matrix of ``shape``: what a ΔW without low-rank structure gives."""
    return energy_at_rank(np.random.default_rng(seed).standard_normal(shape), rank)


def base_linears(model) -> dict:
    """The shared (base) nn.Linear of every LoRA layer in the DCS blocks, by name."""
    return {name: module.base for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def first_task_model(run_dir):
    """(config, model) of a decoflow run right after its first task: base + that task's parameters."""
    run_dir = Path(run_dir)
    meta = files.read_json(run_dir / "config.json")
    config = Config(**meta["config"])
    model = build_flow(config, meta["feature_dim"])
    task_file = sorted((run_dir / "checkpoints").glob("task_00_*.pt"))[0]
    model.load_task_state_dict(meta["tasks"][0], torch.load(task_file, map_location="cpu", weights_only=False))
    model.load_base_state_dict(torch.load(run_dir / "checkpoints" / "base.pt", map_location="cpu", weights_only=False))
    return config, model


def full_finetune_delta(model, task: str, patches: torch.Tensor, config: Config, *, seed: int) -> dict:
    """Delta W = W_after - W_before of every base Linear when a new task fine-tunes ALL base weights.

    The new task gets its own TSA, SCM gate and ACL as in DeCoFlow, but no LoRA: its adapters stay at
    B = 0 and out of the optimizer, so the base alone absorbs the change LoRA would carry (Sec. 4.4.3).
    ``model`` is left untouched; the result depends on ``seed`` only.
    """
    model = copy.deepcopy(model)
    before = {k: lin.weight.detach().clone() for k, lin in base_linears(model).items()}
    torch.manual_seed(seed)  # the new task's initial weights must not depend on what ran before
    model.add_task(task)
    model.set_task(task)
    lora = [p for m in model.modules() if isinstance(m, LoRALinear) for p in m.task_parameters(task).values()]
    for p in lora:
        p.requires_grad_(False)
    params = model.base_parameters() + [p for p in model.task_parameters(task) if all(p is not q for q in lora)]
    for p in params:
        p.requires_grad_(True)
    fit(model, params, patches, config, seed=seed, desc=f"{task} full fine-tune")
    return {k: (lin.weight.detach() - before[k]).numpy() for k, lin in base_linears(model).items()}


def delta_w_table(deltas: dict, profile_rank: int, paper_ranks: dict, paper_rank: int = 64) -> pd.DataFrame:
    """Per layer: shape, full rank, energy in the top 64, at the profile's rank, and at the rank that is
    the same fraction of the layer's full rank as 64 is of the paper-sized layer's."""
    rows = []
    for name, delta in deltas.items():
        full = min(delta.shape)
        matched = max(1, math.ceil(full * paper_rank / paper_ranks[name]))
        rows.append({"layer": name, "shape": f"{delta.shape[0]}x{delta.shape[1]}", "full rank": full,
                     f"energy@{paper_rank}": energy_at_rank(delta, paper_rank),
                     f"top {paper_rank} is full rank": full <= paper_rank,
                     f"energy@{profile_rank} (profile rank)": energy_at_rank(delta, profile_rank),
                     "matched rank": matched, "energy@matched rank": energy_at_rank(delta, matched)})
    return pd.DataFrame(rows)


def paper_layer_ranks(names) -> dict:
    """Full rank of the same base Linear layers in the paper-sized flow (D = 768, Sec. 4.1)."""
    paper = make_config("paper")
    layers = base_linears(build_flow(paper.replace(n_dcs=max(int(n.split(".")[1]) for n in names) + 1), 768))
    return {n: min(layers[n].weight.shape) for n in names}
