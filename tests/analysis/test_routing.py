"""The router's confusion and errors (analysis/routing.py)."""
from __future__ import annotations

import numpy as np
import torch

from decoflow_core.analysis import routing


def two_tasks(seed=0):
    """Task "wide": isotropic around 0. Task "tight": very narrow around (0, 3)."""
    rng = np.random.default_rng(seed)
    wide = rng.standard_normal((400, 2))
    tight = np.array([0.0, 3.0]) + 0.05 * rng.standard_normal((400, 2))
    return {"wide": torch.tensor(wide), "tight": torch.tensor(tight)}


def test_mahalanobis_routes_what_euclidean_gets_wrong():
    train = two_tasks()
    # a normal point of "wide" 1.8 from its mean is 1.2 from "tight"'s mean, but 24 of its standard deviations
    test = {"wide": torch.tensor([[0.0, 1.8]] * 5), "tight": train["tight"][:5] + 0.01}
    confusion, accuracy = routing.routing_confusion(train, test, metric="euclidean")
    assert accuracy == 0.5 and confusion.tolist() == [[0, 5], [0, 5]]
    confusion, accuracy = routing.routing_confusion(train, test, metric="mahalanobis", reg=1e-5)
    assert accuracy == 1.0 and confusion.tolist() == [[5, 0], [0, 5]]
    errors = routing.routing_errors([[0, 5], [0, 5]], ["wide", "tight"])
    assert errors.to_dict("records") == [{"true task": "wide", "routed to": "tight", "images": 5}]
    assert routing.routing_errors(np.eye(2, dtype=int), ["a", "b"]).empty


def test_row_normalise():
    np.testing.assert_allclose(routing.row_normalise([[3, 1], [0, 0]]), [[0.75, 0.25], [0.0, 0.0]])


def test_unknown_category_rates_of_separated_and_of_overlapping_tasks():
    gen = torch.Generator().manual_seed(0)
    centres = {"a": 0.0, "b": 10.0, "c": 20.0, "twin_of_c": 20.0}
    train = {t: torch.randn(100, 4, generator=gen) + c for t, c in centres.items()}
    test = {t: torch.randn(50, 4, generator=gen) + c for t, c in centres.items()}
    rates = routing.unknown_category_rates(train, test, metric="mahalanobis", shrinkage="ledoit_wolf").set_index("task")
    assert rates.loc["a", "unknown when never learned"] > 0.95 and rates.loc["b", "unknown when never learned"] > 0.95
    assert rates.loc["c", "unknown when never learned"] < 0.2  # its twin accepts it: a look-alike is not unknown
    assert (rates["false rejection (held-out good)"] < 0.2).all()


def test_compare_routers_on_tasks_told_apart_by_their_patches_and_not_their_means():
    """Two tasks whose images have the same pooled mean and spread but different patches: task "a" is a
    checkerboard of +1/-1 patches, task "b" every patch 0 with noise. Pooled routers see two clouds around
    the same mean; patch-level nearest neighbour tells them apart."""
    from types import SimpleNamespace
    gen = torch.Generator().manual_seed(0)

    def images(kind, n):
        if kind == "a":
            sign = torch.ones(1, 1, 4, 4)
            sign[..., ::2, ::2] = sign[..., 1::2, 1::2] = -1
            patch = sign.expand(n, 3, 4, 4) + 0.05 * torch.randn(n, 3, 4, 4, generator=gen)
        else:
            patch = 0.05 * torch.randn(n, 3, 4, 4, generator=gen)
        return {"patch": patch, "pooled": patch.mean(dim=(2, 3)) + 0.05 * torch.randn(n, 3, generator=gen)}

    features = {k: SimpleNamespace(train=images(k, 40), test=images(k, 10)) for k in ("a", "b")}
    table, confusions = routing.compare_routers(features, reg=1e-5, bank_size=64)
    accuracy = dict(zip(table["router"], table["accuracy"]))
    assert accuracy["patch nearest neighbour (64 patches)"] == 1.0
    assert confusions["patch nearest neighbour (64 patches)"].tolist() == [[10, 0], [0, 10]]
    assert accuracy["Euclidean"] < 0.9  # the pooled means coincide
    memory = dict(zip(table["router"], table["memory per task (KiB)"]))
    assert memory["patch nearest neighbour (64 patches)"] == 64 * 3 * 4 / 1024
    assert memory["1-NN, pooled"] == 40 * 3 * 4 / 1024
    assert (table["ms per image"] > 0).all()
