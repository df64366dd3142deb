"""The component ablations, depth and first-task studies (Sec. 4.3; notebooks 07-08).

In the ``cpu`` profile the ablations use a short stream (``ABLATION_TASKS`` tasks) and
``ABLATION_EPOCHS`` epochs; with ``PROFILE=paper`` or ``official`` the whole stream and the profile's epochs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .context import FULL_PROFILES

ABLATION_TASKS = 3


ABLATION_EPOCHS = 3


# leave-one-out of the paper's components (Sec. 4.3.1): the config change that removes each one
COMPONENTS = {"TSA": {"use_tsa": False}, "SCM": {"use_scm": False}, "TAL": {"lambda_tail": 0.0},
              "ACL": {"use_acl": False}}


ALL_COMPONENTS_OFF = {k: v for change in COMPONENTS.values() for k, v in change.items()}


def ablation_plan(ctx) -> tuple[list[str], dict]:
    """(stream, config changes) of the ablation runs of a notebook context."""
    if ctx.profile in FULL_PROFILES:
        return ctx.tasks, {}
    return ctx.tasks[:ABLATION_TASKS], ({} if ctx.quick else {"epochs": ABLATION_EPOCHS})


def paired_effects(rows: pd.DataFrame, reference: str, value: str = "I-AUROC", by: str = "variant") -> pd.DataFrame:
    """Per variant: mean and std over seeds of (variant - reference) paired by seed, and whether the
    effect is within seed noise (|mean| <= 2 standard errors; undecidable with one seed)."""
    wide = rows.pivot(index="seed", columns=by, values=value)
    out = []
    for variant in wide.columns:
        if variant == reference:
            continue
        diff = (wide[variant] - wide[reference]).dropna()
        n = len(diff)
        std = float(diff.std(ddof=1)) if n > 1 else float("nan")
        noise = bool(abs(diff.mean()) <= 2 * std / np.sqrt(n)) if n > 1 else None
        out.append({by: variant, f"Δ {value}": float(diff.mean()), "std over seeds": std, "seeds": n,
                    "within seed noise": noise})
    return pd.DataFrame(out)


def interaction_effect(cells: dict) -> dict:
    """2x2 design {(base, components): value}, base in {"frozen", "trainable"}, components in
    {"absent", "present"}: the components' effect under each base and their difference."""
    frozen = cells[("frozen", "present")] - cells[("frozen", "absent")]
    trainable = cells[("trainable", "present")] - cells[("trainable", "absent")]
    return {"effect_frozen": frozen, "effect_trainable": trainable, "interaction": frozen - trainable}


def first_task_plan(available: list[str], stream: list[str], wanted: list[str], n_candidates: int,
                    n_followers: int = 2) -> tuple[list[str], list[str]]:
    """(candidates for task 0, fixed tasks that follow every candidate). ``wanted`` names that the
    data lacks are replaced by other categories of the stream."""
    candidates = list(dict.fromkeys(t for t in wanted if t in available))[:n_candidates]
    followers = [t for t in stream if t not in candidates][:n_followers]
    for t in available:
        if len(candidates) >= n_candidates:
            break
        if t not in candidates and t not in followers:
            candidates.append(t)
    return candidates, followers
