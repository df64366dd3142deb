"""The router's confusion and errors (analysis/routing.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from decoflow_core.analysis import routing
from decoflow_core.config import make_config


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


@pytest.mark.parametrize("covariance", ["task", "shared"])
def test_unknown_category_rates_of_separated_and_of_overlapping_tasks(covariance):
    gen = torch.Generator().manual_seed(0)
    centres = {"a": 0.0, "b": 10.0, "c": 20.0, "twin_of_c": 20.0}
    train = {t: torch.randn(100, 4, generator=gen) + c for t, c in centres.items()}
    test = {t: torch.randn(50, 4, generator=gen) + c for t, c in centres.items()}
    rates = routing.unknown_category_rates(train, test, metric="mahalanobis", shrinkage="ledoit_wolf",
                                           covariance=covariance).set_index("task")
    assert rates.loc["a", "unknown when never learned"] > 0.95 and rates.loc["b", "unknown when never learned"] > 0.95
    assert rates.loc["c", "unknown when never learned"] < 0.2  # its twin accepts it: a look-alike is not unknown
    assert (rates["false rejection (held-out good)"] < 0.2).all()


def test_router_options_are_the_configs_router():
    config = make_config("cpu", {"router_covariance": "shared", "router_reg": "1e-4"})
    assert routing.router_options(config) == dict(metric="mahalanobis", shrinkage="ledoit_wolf", reg=1e-4,
                                                  covariance="shared")


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


def test_flow_router_standardises_each_task_by_its_own_training_scores():
    """Task "a"'s flow gives every patch a high NLL (100 + distance to 1), task "b"'s a low one (distance
    to 0): raw scores would send everything to "b"; standardised by each task's own training images, an
    image goes to the flow it is typical for."""
    from types import SimpleNamespace
    gen = torch.Generator().manual_seed(0)

    def images(centre, n):
        patch = centre + 0.05 * torch.randn(n, 3, 4, 4, generator=gen)
        return {"patch": patch, "pooled": patch.mean(dim=(2, 3))}

    nll = {"a": lambda p: 100 + (p - 1).abs().mean(1), "b": lambda p: p.abs().mean(1)}
    learner = SimpleNamespace(patch_nll=lambda task, patch: nll[task](patch))
    features = {"a": SimpleNamespace(train=images(1.0, 30), val=images(1.0, 10)),
                "b": SimpleNamespace(train=images(0.0, 30), val=images(0.0, 10))}
    table, confusions = routing.compare_routers(features, reg=1e-5, learner=learner, split="val", bank_size=64)
    assert confusions[routing.FLOW].tolist() == [[10, 0], [0, 10]]
    distances, _ = routing.routers(1e-5, learner)[routing.FLOW]({t: d.train for t, d in features.items()})
    raw = torch.stack([nll[t](features["a"].val["patch"]).flatten(1).topk(3, dim=1).values.mean(1) for t in "ab"], 1)
    assert (raw.argmin(1) == 1).all() and (distances(features["a"].val).argmin(1) == 0).all()
    with pytest.raises(ValueError, match="no 'test' images"):
        routing.compare_routers({t: SimpleNamespace(train=d.train, test=None) for t, d in features.items()}, reg=1e-5)


def test_shared_covariance_router_pools_the_tasks_residuals():
    """Four tasks of ten images in 24 dimensions, all with one direction of large variation, told apart
    along a direction of small variation: each task's own covariance is poorly estimated from ten images,
    the one shared by the tasks (every image minus its task's mean) from forty. The shared router's
    distances are the Mahalanobis distances under Ledoit-Wolf on the pooled residuals, computed by hand."""
    from types import SimpleNamespace

    from sklearn.covariance import LedoitWolf
    gen = torch.Generator().manual_seed(0)
    dims, scale = 24, torch.ones(24)
    scale[0] = 20.0

    def images(centre, n):
        x = torch.randn(n, dims, generator=gen, dtype=torch.float64) * scale
        x[:, 1] += centre
        return {"pooled": x, "patch": x[:, :, None, None] + 0.01 * torch.randn(n, dims, 2, 2, generator=gen, dtype=torch.float64)}

    features = {f"t{c}": SimpleNamespace(train=images(2.5 * c, 10), test=images(2.5 * c, 50)) for c in range(4)}
    table, _ = routing.compare_routers(features, reg=1e-5, bank_size=8)
    accuracy = dict(zip(table["router"], table["accuracy"]))
    assert accuracy[routing.SHARED] > accuracy[routing.PER_TASK] + 0.1
    assert accuracy[routing.KIT] > accuracy[routing.PER_TASK] + 0.1

    train = {t: d.train for t, d in features.items()}
    distances, memory = routing.routers(1e-5)[routing.SHARED](train)
    means = [f["pooled"].mean(0).numpy() for f in train.values()]
    residuals = np.concatenate([f["pooled"].numpy() - m for f, m in zip(train.values(), means)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(residuals).covariance_ + 1e-5 * np.eye(dims))
    query = features["t2"].test["pooled"].numpy()
    expected = np.stack([np.sqrt(np.einsum("bg,gh,bh->b", query - m, precision, query - m)) for m in means], 1)
    np.testing.assert_allclose(distances(features["t2"].test).numpy(), expected, rtol=1e-5)  # float32 prototypes
    assert memory == (4 * dims + 40 * dims + dims * dims) * 4 / 4  # means, the statistics kept, one precision
