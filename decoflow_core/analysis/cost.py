"""Model size as tasks accumulate (Sec. 4.4.7; notebook 11); the latency per image is ``bench.latency``."""
from __future__ import annotations

import numpy as np


def model_size_curve(method: str, params: dict, n_tasks: int, *, router_floats_per_task: int = 0,
                     replay_floats_per_task: int = 0) -> np.ndarray:
    """Stored floats after 1..n_tasks tasks: network parameters, router statistics, replay buffer."""
    t = np.arange(1, n_tasks + 1)
    if method == "decoflow":
        network = params["base"] + t * params["per_task"]
    elif method == "independent":
        network = t * params["per_task"]
    else:  # one shared flow (finetune, ewc, replay)
        network = np.full(n_tasks, params["base"])
    return network + t * (router_floats_per_task + replay_floats_per_task)
