"""The prototype router on its own (Sec. 3.8, 4.4.6; notebook 06): confusion, errors, how often an
image of a category the run never learned is called unknown, and other routers on the same features."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from ..router import UNKNOWN, PrototypeRouter
from ..scenarios import task_name


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
        name = task_name(group)
        if prototypes == "class":
            for c in group:
                router.add_task(c, train[c], task=name)
        else:
            router.add_task(name, torch.cat([torch.as_tensor(train[c]) for c in group]))
    owner = {c: task_name(g) for g in groups for c in g}
    task_hits, class_hits = [], []
    for c, feats in test.items():
        task_hits += [r == owner[c] for r in router.route(feats)]
        if prototypes == "class":
            class_hits += [n == c for n in router.nearest_prototypes(feats)]
    return {"task": float(np.mean(task_hits)), "class": float(np.mean(class_hits)) if class_hits else None}


def _pooled_nn(train: dict):
    """1-NN on pooled features: the distance to a task is to its nearest training image."""
    banks = [torch.as_tensor(f).double() for f in train.values()]
    memory = max(b.numel() for b in banks) * 4  # float32, per task
    return (lambda x: torch.stack([torch.cdist(x.double(), b).min(dim=1).values for b in banks], 1)), memory


def _patch_nn(train_patches: dict, bank_size: int = 2000, seed: int = 0):
    """Patch-level nearest neighbour: a bank of ``bank_size`` training patch features per task (a seeded
    draw); an image's distance to a task is the mean over its patches of the distance to the nearest one."""
    generator = torch.Generator().manual_seed(seed)
    banks = []
    for patches in train_patches.values():
        flat = patches.float().permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
        banks.append(flat[torch.randperm(len(flat), generator=generator)[:bank_size]])

    def distances(x):
        q = x.float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return torch.stack([torch.cdist(q, b).min(dim=1).values.reshape(len(x), -1).mean(1) for b in banks], 1)
    return distances, bank_size * banks[0].shape[1] * 4


def compare_routers(features: dict, *, reg: float, bank_size: int = 2000) -> tuple[pd.DataFrame, dict]:
    """Routers fit on the training images of ``features`` ({task: train.TaskData}) and tested on every
    test image: the prototype router (Mahalanobis with the sample covariance -- the paper's -- or
    Ledoit-Wolf, Euclidean), 1-NN on pooled features and patch-level nearest neighbour. Returns (a table:
    accuracy, memory per task, ms per image with all tasks learned, growing linearly with their number;
    {router: confusion})."""
    tasks = list(features)
    train = {t: d.train["pooled"] for t, d in features.items()}
    candidates = {}
    for name, options in (("Mahalanobis, sample covariance (paper)", dict(metric="mahalanobis", shrinkage=None)),
                          ("Mahalanobis, Ledoit-Wolf (kit)", dict(metric="mahalanobis", shrinkage="ledoit_wolf")),
                          ("Euclidean", dict(metric="euclidean"))):
        router = PrototypeRouter(reg=reg, **options)
        for task, feats in train.items():
            router.add_task(task, feats)
        candidates[name] = (router.distances, router.memory_bytes() / len(tasks), "pooled")
    candidates["1-NN, pooled"] = (*_pooled_nn(train), "pooled")
    candidates[f"patch nearest neighbour ({bank_size} patches)"] = (
        *_patch_nn({t: d.train["patch"] for t, d in features.items()}, bank_size), "patch")
    rows, confusions = [], {}
    for name, (distance, memory, kind) in candidates.items():
        confusion, start, count = np.zeros((len(tasks), len(tasks)), dtype=int), time.perf_counter(), 0
        for i, task in enumerate(tasks):
            x = features[task].test[kind]
            for j in distance(x).argmin(dim=1).tolist():
                confusion[i, j] += 1
            count += len(x)
        rows.append({"router": name, "accuracy": float(np.trace(confusion) / confusion.sum()),
                     "memory per task (KiB)": memory / 1024,
                     "ms per image": 1000 * (time.perf_counter() - start) / count})
        confusions[name] = confusion
    return pd.DataFrame(rows), confusions
