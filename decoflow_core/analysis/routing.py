"""The prototype router on its own (Sec. 3.8, 4.4.6; notebook 06): confusion, errors, how often an
image of a category the run never learned is called unknown, and other routers on the same features."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import files
from ..datasets import resolve_data
from ..features import pooled_key
from ..report import load_run
from ..router import UNKNOWN, PrototypeRouter, ledoit_wolf, residual_sums
from ..scenarios import task_name
from ..train import load_task, with_router_feature


def router_options(config) -> dict:
    """The settings of a config's router (``PrototypeRouter`` keywords), for analyses of the kit's router."""
    return dict(metric=config.router_metric, shrinkage=config.router_shrinkage, reg=config.router_reg,
                covariance=config.router_covariance)


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
    def fit(tasks):
        router = PrototypeRouter(**router_options)
        for task in tasks:
            router.add_task(task, keep[task])
        return router

    router = fit(keep)
    shared = router.covariance == "shared"  # then every prototype's precision and threshold depend on the others
    rows = []
    for k, task in enumerate(train):
        if shared:  # the router that never learned this task, fitted without it
            without = fit([t for t in keep if t != task])
            distances, limits = without.distances(test[task]), without.thresholds
        else:  # per-task prototypes: the full router with this task's column left out is that router
            distances, limits = router.distances(test[task]), router.thresholds
            distances[:, k] = np.inf
        limits = torch.tensor([np.inf if t is None else t for t in limits], dtype=torch.float64)
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


def _lw_precision(x: torch.Tensor, reg: float) -> torch.Tensor:
    cov = ledoit_wolf(*residual_sums(x - x.mean(dim=0)))
    return torch.linalg.inv(cov + reg * torch.eye(x.shape[1], dtype=torch.float64))


def _pooled(feats):
    return feats["pooled"].double()


def _mean_and_std(feats):
    """Mean and standard deviation of every channel over the patch grid: (N, 2D) -- the extractor's own
    (``router_feature="patch_mean_std"``, float32 from unrounded patches) when the features carry it."""
    if pooled_key("patch_mean_std") in feats:
        return feats[pooled_key("patch_mean_std")].double()
    patch = feats["patch"].double()
    return torch.cat([patch.mean(dim=(2, 3)), patch.std(dim=(2, 3))], 1)


def _regions(feats, cells: int = 3):
    """The patch features averaged over a ``cells`` x ``cells`` grid of image regions: (N, D * cells^2)."""
    return F.adaptive_avg_pool2d(feats["patch"].double(), cells).flatten(1)


def _position_router(reg: float, sample: int = 20000):
    """Per-position prototypes: a task's mean feature at every grid position and one Ledoit-Wolf precision
    of the residuals (a seeded draw of ``sample`` of them); distance = mean over positions."""
    def fit(train: dict):
        prototypes, generator = [], torch.Generator().manual_seed(0)
        for feats in train.values():
            patch = feats["patch"].double()
            mean = patch.mean(0)  # (D, g, g)
            residuals = (patch - mean).permute(0, 2, 3, 1).reshape(-1, patch.shape[1])
            residuals = residuals[torch.randperm(len(residuals), generator=generator)[:sample]]
            prototypes.append((mean, _lw_precision(residuals, reg)))

        def distances(feats):
            patch = feats["patch"].double()
            out = []
            for mean, precision in prototypes:
                diff = (patch - mean).permute(0, 2, 3, 1).reshape(len(patch), -1, patch.shape[1])
                out.append(torch.einsum("bpg,gh,bph->bp", diff, precision, diff).clamp_min(0).sqrt().mean(1))
            return torch.stack(out, 1)
        return distances, sum(m.numel() + p.numel() for m, p in prototypes) * 4 / len(prototypes)
    return fit


def _flow_router(learner, k: int = 3):
    """Each task's own flow: the image score (mean of its ``k`` highest patch NLLs) under the task's
    parameters, as |score - mean| / std of the scores of that task's training images (how typical the image
    is for the task). Costs one flow pass per task and image. The training images' statistics are
    computed once and shared by routers built on this one."""
    def score(task, patch):
        return learner.patch_nll(task, patch).flatten(1).topk(k, dim=1).values.mean(1).double()

    fitted = {}

    def fit(train: dict):
        key = tuple((t, id(f["patch"])) for t, f in train.items())
        if key not in fitted:
            own = {t: score(t, f["patch"]) for t, f in train.items()}
            fitted[key] = (train, {t: (s.mean(), s.std()) for t, s in own.items()})
        stats = fitted[key][1]

        def distances(feats):
            return torch.stack([(score(t, feats["patch"]) - m).abs() / s for t, (m, s) in stats.items()], 1)
        return distances, 2 * 4
    return fit


def _standardised(fit_router, folds: int = 5):
    """A router whose distances are standardised per task by out-of-fold distances of its own training
    images (``folds``-fold), so that distances of different routers can be added."""
    def fit(train: dict):
        stats = []
        for task, feats in train.items():
            n = len(feats["pooled"])
            order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
            held = []
            for k in range(folds):
                rest = torch.cat([order[j::folds] for j in range(folds) if j != k])
                own, _ = fit_router({task: _take(feats, rest)})
                held.append(own(_take(feats, order[k::folds]))[:, 0])
            held = torch.cat(held)
            stats.append((held.mean(), held.std()))
        distances, memory = fit_router(train)
        mean, std = (torch.stack(v) for v in zip(*stats))
        return (lambda feats: (distances(feats) - mean) / std), memory
    return fit


def _sum_of(*fits):
    def fit(train: dict):
        routers = [f(train) for f in fits]
        return (lambda feats: sum(d(feats) for d, _ in routers)), sum(m for _, m in routers)
    return fit


def _take(feats: dict, index) -> dict:
    return {key: value[index] for key, value in feats.items() if torch.is_tensor(value)}


def _prototype(reg: float, statistic=_pooled, **options):
    """The kit's ``PrototypeRouter`` with ``options`` on ``statistic(features) -> (N, G)``."""
    def fit(train: dict):
        router = PrototypeRouter(reg=reg, **options)
        for task, feats in train.items():
            router.add_task(task, statistic(feats))
        return (lambda feats: router.distances(statistic(feats))), router.memory_bytes() / len(train)
    return fit


def _pooled_nn(train: dict):
    """1-NN on pooled features: the distance to a task is to its nearest training image."""
    banks = [torch.as_tensor(f["pooled"]).double() for f in train.values()]
    memory = max(b.numel() for b in banks) * 4  # float32, per task
    return (lambda feats: torch.stack([torch.cdist(feats["pooled"].double(), b).min(dim=1).values for b in banks], 1)), memory


def _patch_nn(bank_size: int, seed: int = 0):
    """Patch-level nearest neighbour: a bank of ``bank_size`` training patch features per task (a seeded
    draw); an image's distance to a task is the mean over its patches of the distance to the nearest one."""
    def fit(train: dict):
        generator = torch.Generator().manual_seed(seed)
        banks = []
        for feats in train.values():
            patches = feats["patch"]
            flat = patches.float().permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
            banks.append(flat[torch.randperm(len(flat), generator=generator)[:bank_size]])

        def distances(feats):
            x = feats["patch"]
            q = x.float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            return torch.stack([torch.cdist(q, b).min(dim=1).values.reshape(len(x), -1).mean(1) for b in banks], 1)
        return distances, bank_size * banks[0].shape[1] * 4
    return fit


PAPER = "Mahalanobis, sample covariance (paper)"
PER_TASK = "Mahalanobis, Ledoit-Wolf per task"
SHARED = "Mahalanobis, one Ledoit-Wolf covariance shared by the tasks"
KIT = "shared Ledoit-Wolf covariance, mean and std over the grid (kit)"
FLOW = "each task's flow, standardised"


def routers(reg: float, learner=None, bank_size: int = 2000) -> dict:
    """The candidate routers, {name: fit(train {task: {"patch", "pooled", ...}}) -> (distances(feats) -> (B, T),
    bytes per task)}; those that need the trained flows only with ``learner``. "pooled" is the backbone's
    pooled output (the paper's router feature); ``KIT`` is the ``cpu`` profile's router."""
    lw = dict(metric="mahalanobis", shrinkage="ledoit_wolf")
    per_task, shared = _prototype(reg, **lw), dict(lw, covariance="shared")
    out = {PAPER: _prototype(reg, metric="mahalanobis", shrinkage=None), PER_TASK: per_task,
           "Euclidean": _prototype(reg, metric="euclidean"),
           "Ledoit-Wolf, mean and std over the grid": _prototype(reg, _mean_and_std, **lw),
           "Ledoit-Wolf, 3x3 region means": _prototype(reg, _regions, **lw),
           SHARED: _prototype(reg, **shared),
           KIT: _prototype(reg, _mean_and_std, **shared),
           "per-position prototypes": _position_router(reg),
           "1-NN, pooled": _pooled_nn,
           f"patch nearest neighbour ({bank_size} patches)": _patch_nn(bank_size)}
    if learner is not None:
        flow = _flow_router(learner)
        out[FLOW] = flow
        out[FLOW + " + Ledoit-Wolf"] = _sum_of(flow, _standardised(per_task))
    return out


def compare_routers(features: dict, *, reg: float, learner=None, split: str = "test",
                    bank_size: int = 2000) -> tuple[pd.DataFrame, dict]:
    """Every router of ``routers`` fit on the training images of ``features`` ({task: train.TaskData})
    and tested on its ``split``: ``test``, or ``val`` (train/good images held out of the run and of the
    prototypes, for choosing a router). Returns (a table: accuracy, memory per task, ms per image with all
    tasks learned -- every router's time grows linearly with their number --; {router: confusion})."""
    tasks = list(features)
    rows, confusions = [], {}
    for name, fit in routers(reg, learner, bank_size).items():
        distances, memory = fit({t: d.train for t, d in features.items()})
        confusion, start, count = np.zeros((len(tasks), len(tasks)), dtype=int), time.perf_counter(), 0
        for i, task in enumerate(tasks):
            feats = getattr(features[task], split)
            if feats is None:
                raise ValueError(f"task {task} has no {split!r} images (split='val' needs a run with val_fraction > 0)")
            for j in distances(feats).argmin(dim=1).tolist():
                confusion[i, j] += 1
            count += len(feats["pooled"])
        ms = 1000 * (time.perf_counter() - start) / count
        rows.append({"router": name, "accuracy": float(np.trace(confusion) / confusion.sum()),
                     "memory per task (KiB)": memory / 1024, "ms per image": ms,
                     "ms per image per task": ms / len(tasks)})
        confusions[name] = confusion
    return pd.DataFrame(rows), confusions


def heldout_comparison(run_dir, data) -> pd.DataFrame:
    """``compare_routers`` on the held-out train/good images of a ``decoflow`` run trained with
    ``val_fraction`` > 0 on ``data`` (its flows and the prototypes never saw them): the numbers the
    default router is chosen by (docs/selection.md)."""
    config, extractor, learner, device = load_run(run_dir)
    if not config.val_fraction:
        raise ValueError(f"{run_dir} holds no images out (val_fraction 0); train it with --set val_fraction=0.2")
    root = resolve_data(str(data))
    tasks = files.read_json(Path(run_dir) / "config.json")["tasks"]  # "pooled": the backbone's output
    features = {t: with_router_feature(load_task(root, t, extractor, config, device), "backbone") for t in tasks}
    table, _ = compare_routers(features, reg=config.router_reg, learner=learner, split="val")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="held-out routing accuracy of every candidate router (make select-router)")
    parser.add_argument("run", help="a decoflow run trained with --set val_fraction=0.2")
    parser.add_argument("--data", required=True, help="the data the run was trained on (embedded, boards or a path)")
    parser.add_argument("--out", required=True, help="CSV file to write (an existing file is replaced)")
    args = parser.parse_args(argv)
    table = heldout_comparison(args.run, args.data)
    files.write_text(Path(args.out), table.to_csv(index=False))
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
