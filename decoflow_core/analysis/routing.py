"""The prototype router on its own (Sec. 3.8, 4.4.6; notebook 06): confusion, errors, and how often an
image of a category the run never learned is called unknown."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..router import UNKNOWN, PrototypeRouter


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


def unknown_category_rates(train: dict, test: dict, *, held_out: float = 0.1, seed: int = 0,
                           **router_options) -> pd.DataFrame:
    """Per task (``train``/``test``: {task: (N, G) pooled features}): the share of its test images called
    unknown by a router that never learned it (fit on every other task), and the false-rejection rate:
    the share of its own held-out train/good images (``held_out``, drawn with ``seed``) that a router
    fit on the rest of every task's training images calls unknown."""
    generator = torch.Generator().manual_seed(seed)
    keep, spare = {}, {}
    for task, feats in train.items():
        order = torch.randperm(len(feats), generator=generator)
        n = max(1, round(held_out * len(feats)))
        spare[task], keep[task] = feats[order[:n]], feats[order[n:]]
    router = PrototypeRouter(**router_options)  # a task's prototype and threshold do not depend on the others
    for task, feats in keep.items():
        router.add_task(task, feats)
    limits = torch.tensor([np.inf if t is None else t for t in router.thresholds], dtype=torch.float64)
    rows = []
    for k, task in enumerate(train):
        distances = router.distances(test[task])
        distances[:, k] = np.inf  # the router that never learned this task
        nearest, index = distances.min(dim=1)
        never_learned = (nearest > limits[index]).double().mean()
        rejected = np.mean([d["task"] == UNKNOWN for d in router.route_or_unknown(spare[task])])
        rows.append({"task": task, "unknown when never learned": float(never_learned),
                     "false rejection (held-out good)": float(rejected)})
    return pd.DataFrame(rows)


def grouped_routing_accuracy(train: dict, test: dict, groups: list[list[str]], prototypes: str,
                             **router_options) -> dict:
    """Routing accuracy of a stream whose tasks are ``groups`` of classes: ``train`` and ``test`` are
    {class: (N, G) pooled features}. ``prototypes="task"``: one prototype per task from all its classes'
    images; ``"class"``: one per class, mapped to its task. Returns {"task": share of images routed to
    their own task, "class": share sent to their own class's prototype (None for task prototypes)}."""
    router = PrototypeRouter(**router_options)
    for group in groups:
        name = "+".join(group)
        if prototypes == "class":
            for c in group:
                router.add_task(c, train[c], task=name)
        else:
            router.add_task(name, torch.cat([torch.as_tensor(train[c]) for c in group]))
    owner = {c: "+".join(g) for g in groups for c in g}
    task_hits, class_hits = [], []
    for c, feats in test.items():
        task_hits += [r == owner[c] for r in router.route(feats)]
        if prototypes == "class":
            class_hits += [n == c for n in router.nearest_prototypes(feats)]
    return {"task": float(np.mean(task_hits)), "class": float(np.mean(class_hits)) if class_hits else None}
