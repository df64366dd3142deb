"""The prototype router on its own (Sec. 3.8, 4.4.6; notebook 06): confusion and errors."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..router import PrototypeRouter


def routing_confusion(train: dict, test: dict, **router_options) -> tuple[np.ndarray, float]:
    """(confusion counts true x routed, accuracy) of a PrototypeRouter fit on ``train`` pooled features
    and tested on ``test`` ({task: (N, G)}, same task order)."""
    router = PrototypeRouter(**router_options)
    for task, feats in train.items():
        router.add_task(task, feats)
    tasks = list(train)
    confusion = np.zeros((len(tasks), len(tasks)), dtype=int)
    for i, task in enumerate(tasks):
        for routed in router.route(test[task]):
            confusion[i, tasks.index(routed)] += 1
    return confusion, float(np.trace(confusion) / confusion.sum())


def routing_errors(confusion, tasks: list[str]) -> pd.DataFrame:
    """Every off-diagonal cell of a routing confusion matrix: (true task, routed to, images)."""
    confusion = np.asarray(confusion)
    rows = [{"true task": tasks[i], "routed to": tasks[j], "images": int(confusion[i, j])}
            for i, j in zip(*np.nonzero(confusion)) if i != j]
    return pd.DataFrame(rows, columns=["true task", "routed to", "images"])


def row_normalise(confusion) -> np.ndarray:
    confusion = np.asarray(confusion, dtype=float)
    return confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
