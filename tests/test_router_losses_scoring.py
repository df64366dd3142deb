"""Router, losses and scoring on hand-computed and constructed cases."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.covariance import LedoitWolf

from decoflow_core.losses import patch_nll, tail_aware_loss
from decoflow_core.router import PrototypeRouter, ledoit_wolf, residual_sums
from decoflow_core.scoring import anomaly_map, gaussian_blur, image_score


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: extra threads only add contention (50x slower on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- losses -----------------------------------------------------------------------------------
def test_tail_aware_loss_hand_computed():
    nll = torch.arange(1.0, 11.0).view(1, 2, 5)  # 10 patches, mean 5.5
    assert tail_aware_loss(nll, lambda_tail=0.0, top_k=0.2) == pytest.approx(5.5)
    assert tail_aware_loss(nll, lambda_tail=1.0, top_k=0.2) == pytest.approx(9.5)  # (10 + 9) / 2
    assert tail_aware_loss(nll, lambda_tail=0.7, top_k=0.2) == pytest.approx(0.3 * 5.5 + 0.7 * 9.5)
    assert tail_aware_loss(nll, lambda_tail=1.0, top_k=1e-6) == pytest.approx(10.0)  # >= 1 patch


def test_patch_nll_per_dimension():
    logp = torch.tensor([[[-8.0, 4.0]]])
    assert torch.equal(patch_nll(logp), torch.tensor([[[8.0, -4.0]]]))
    assert torch.equal(patch_nll(logp, dim=4), torch.tensor([[[2.0, -1.0]]]))


# ---- router -----------------------------------------------------------------------------------
def gaussian_tasks(n_tasks, dim, n, *, gen, spread=10.0):
    means = spread * torch.eye(n_tasks, dim)
    return {f"t{i}": means[i] + torch.randn(n, dim, generator=gen) for i in range(n_tasks)}


@pytest.mark.parametrize("metric", ["mahalanobis", "euclidean"])
def test_router_separates_well_separated_tasks(metric):
    gen = torch.Generator().manual_seed(0)
    train, test = gaussian_tasks(3, 16, 200, gen=gen), gaussian_tasks(3, 16, 50, gen=gen)
    router = PrototypeRouter(metric=metric)
    for name, feats in train.items():
        router.add_task(name, feats)
    for name, feats in test.items():
        assert router.route(feats) == [name] * len(feats)


def test_mahalanobis_beats_euclidean_on_anisotropic_tasks():
    # Both tasks: std 10 along axis 0, std 0.1 along axis 1. Their means are 1 apart along the
    # narrow axis but 15 apart along the wide one. Points of task A far out along the wide axis
    # (x in [10, 20]) sit Euclidean-near B's mean, yet are 10 narrow-axis stds away from B.
    gen = torch.Generator().manual_seed(0)
    std = torch.tensor([10.0, 0.1])
    mean_a, mean_b = torch.tensor([0.0, 0.0]), torch.tensor([15.0, 1.0])
    train_a = mean_a + std * torch.randn(2000, 2, generator=gen)
    train_b = mean_b + std * torch.randn(2000, 2, generator=gen)
    test_a = torch.stack([torch.linspace(10, 20, 50), 0.1 * torch.randn(50, generator=gen)], 1)
    test_b = mean_b + std * torch.randn(50, 2, generator=gen)
    feats, labels = torch.cat([test_a, test_b]), ["a"] * 50 + ["b"] * 50
    accuracy = {}
    for metric in ("mahalanobis", "euclidean"):
        router = PrototypeRouter(metric=metric)
        router.add_task("a", train_a)
        router.add_task("b", train_b)
        accuracy[metric] = sum(p == t for p, t in zip(router.route(feats), labels)) / len(labels)
    print(f"\nrouting accuracy: {accuracy}")
    assert accuracy["mahalanobis"] == 1.0 and accuracy["euclidean"] <= 0.6


def test_router_distances_are_batched_mahalanobis():
    gen = torch.Generator().manual_seed(1)
    router = PrototypeRouter()
    for name, feats in gaussian_tasks(3, 6, 40, gen=gen, spread=2.0).items():
        router.add_task(name, feats)
    query = torch.randn(5, 6, generator=gen)
    expected = torch.tensor([[math.sqrt((q - m).double() @ p.double() @ (q - m).double())
                              for m, p in zip(router.means, router.precisions)] for q in query])
    assert torch.allclose(router.distances(query), expected.double(), atol=1e-6)
    restored = PrototypeRouter(metric="euclidean")
    restored.load_state_dict(router.state_dict())
    assert restored.metric == "mahalanobis" and torch.equal(restored.distances(query), router.distances(query))


def test_ledoit_wolf_handles_fewer_samples_than_dims():
    gen = torch.Generator().manual_seed(2)
    train, test = gaussian_tasks(3, 64, 20, gen=gen), gaussian_tasks(3, 64, 20, gen=gen)
    router = PrototypeRouter(shrinkage="ledoit_wolf")
    for name, feats in train.items():
        router.add_task(name, feats)
    for name, feats in test.items():
        assert router.route(feats) == [name] * len(feats)


def test_router_memory_matches_paper_setting():
    router = PrototypeRouter()
    gen = torch.Generator().manual_seed(3)
    for t in range(15):
        router.add_task(f"t{t}", torch.randn(800, 768, generator=gen))
    expected = 15 * (768 + 768 * 768) * 4  # float32 mean + precision per task
    print(f"\nrouter memory, T=15, G=768: {router.memory_bytes() / 2**20:.1f} MiB")
    assert router.memory_bytes() == expected


@pytest.mark.parametrize("n, dims", [(10, 24), (200, 16), (3, 5)])
def test_ledoit_wolf_from_sums_is_sklearns(n, dims):
    """The router's Ledoit-Wolf from the sums of its residuals equals sklearn's estimate, with few images
    (strong shrinkage) and many; the sums of two sets add up to the sums of both."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, dims, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, dims, dtype=torch.float64)
    expected = LedoitWolf().fit(x.numpy()).covariance_
    np.testing.assert_allclose(ledoit_wolf(*residual_sums(x - x.mean(0))).numpy(), expected, rtol=1e-10, atol=1e-12)
    a, b = x[: n // 2 + 1], x[n // 2 + 1:]
    both = [u + v for u, v in zip(residual_sums(a), residual_sums(b))]
    np.testing.assert_allclose(ledoit_wolf(*both).numpy(), LedoitWolf(assume_centered=True).fit(x.numpy()).covariance_,
                               rtol=1e-10, atol=1e-12)
    for flat in (torch.ones(4, 3, dtype=torch.float64), torch.tensor([[1.0], [-1.0], [1.0]], dtype=torch.float64)):
        assert torch.isfinite(ledoit_wolf(*residual_sums(flat))).all()  # S = mu I: no shrinkage to compute


# ---- scoring ----------------------------------------------------------------------------------
def test_image_score_modes():
    scores = torch.tensor([[[1.0, 5.0], [3.0, 2.0]]])
    assert image_score(scores, "max").item() == 5.0
    assert image_score(scores, "mean").item() == 2.75
    assert image_score(scores, "topk", k=2).item() == 4.0
    assert image_score(scores, "topk", k=3).item() == pytest.approx(10 / 3)
    with pytest.raises(ValueError, match="topk"):
        image_score(scores, "median")


def test_blur_of_a_delta_is_the_gaussian():
    sigma, size = 2.0, 41
    delta = torch.zeros(1, size, size, dtype=torch.float64)
    delta[0, 20, 20] = 1.0
    blurred = gaussian_blur(delta, sigma)[0]
    x = torch.arange(size, dtype=torch.float64) - 20
    g = torch.exp(-0.5 * (x / sigma) ** 2) * (x.abs() <= 4 * sigma)  # kernel truncated at 4 sigma
    g = g / g.sum()
    assert torch.allclose(blurred, torch.outer(g, g), atol=1e-12)
    assert blurred.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(2, 33, 40), (1, 5, 7)])  # the second smaller than the kernel
def test_reflect_blur_equals_scipy(shape):
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gaussian_blur(images, 2.5, padding="reflect").numpy()
    for image, blurred in zip(images.numpy(), ours):
        expected = ndimage.gaussian_filter(image, 2.5, mode="reflect", truncate=4.0)
        assert np.allclose(blurred, expected, atol=1e-12)


def test_anomaly_map_keeps_the_peak():
    patch = torch.zeros(1, 8, 8)
    patch[0, 2, 5] = 1.0
    amap = anomaly_map(patch, size=64, sigma=2.0)[0]
    assert amap.shape == (64, 64)
    row, col = divmod(amap.argmax().item(), 64)
    assert row in (19, 20) and col in (43, 44)  # centre of patch (2, 5): pixels 16-23, 40-47
    assert torch.all(amap[row, col:].diff() <= 1e-7) and torch.all(amap[row:, col].diff() <= 1e-7)
    window = amap[12:28, 36:52]  # symmetric about the patch centre (19.5, 43.5)
    assert torch.allclose(window, window.flip(0), atol=1e-6) and torch.allclose(window, window.flip(1), atol=1e-6)
    assert torch.equal(anomaly_map(patch, size=8, sigma=0), patch)


def test_the_router_calls_far_images_unknown_and_accepts_its_own():
    gen = torch.Generator().manual_seed(0)
    tasks = {"a": torch.randn(200, 6, generator=gen), "b": torch.randn(200, 6, generator=gen) + 8}
    for shrinkage in (None, "ledoit_wolf"):
        router = PrototypeRouter(metric="mahalanobis", shrinkage=shrinkage, accept_quantile=0.99)
        for name, feats in tasks.items():
            router.add_task(name, feats)
        own = router.route_or_unknown(torch.randn(500, 6, generator=gen))  # unseen images of task a
        assert np.mean([d["task"] == "unknown" for d in own]) < 0.05
        assert all(d["nearest"] == "a" for d in own)
        stranger = router.route_or_unknown(torch.randn(100, 6, generator=gen) - 8)  # a category never learned
        assert np.mean([d["task"] == "unknown" for d in stranger]) > 0.95
        assert stranger[0]["nearest"] in tasks and stranger[0]["distance"] > router.thresholds[0]


def test_the_acceptance_threshold_is_a_quantile_of_out_of_fold_distances():
    feats = torch.arange(20, dtype=torch.float64)[:, None]  # one feature: distances are |x - mean of the rest|
    router = PrototypeRouter(metric="euclidean", accept_quantile=1.0, folds=2)
    router.add_task("line", feats)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    by_hand = []
    for k in range(2):
        held, rest = order[k::2], order[1 - k::2]
        by_hand += (feats[held, 0] - feats[rest, 0].mean()).abs().tolist()
    assert router.thresholds == [pytest.approx(max(by_hand))]
    state = router.state_dict()
    del state["thresholds"]  # a router saved before thresholds existed: nothing is unknown
    old = PrototypeRouter(metric="euclidean")
    old.load_state_dict(state)
    assert old.route_or_unknown(torch.tensor([[1e6]], dtype=torch.float64))[0]["task"] == "line"


def test_a_shared_covariance_router_refits_one_precision_and_every_threshold_as_tasks_arrive():
    """covariance="shared": one Ledoit-Wolf precision of all tasks' residuals (each image minus its own
    task's mean), refitted with every task, and the thresholds with it; equal to the router comparison's
    shared candidate; saved and loaded unchanged; a category never learned is unknown."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.ones(8)
    scale[0] = 10.0
    tasks = {name: torch.randn(40, 8, generator=gen, dtype=torch.float64) * scale + shift
             for name, shift in (("a", 0.0), ("b", 3.0), ("c", -3.0))}
    router = PrototypeRouter(metric="mahalanobis", shrinkage="ledoit_wolf", covariance="shared", accept_quantile=0.99)
    router.add_task("a", tasks["a"])
    router.add_task("b", tasks["b"])
    before = list(router.thresholds)
    router.add_task("c", tasks["c"])
    assert len(router.thresholds) == 3 and router.thresholds[:2] != before  # refitted with the new residuals
    query = torch.randn(30, 8, generator=gen, dtype=torch.float64) * scale + 3.0
    means = [feats.mean(0) for feats in tasks.values()]
    residuals = torch.cat([feats - mean for feats, mean in zip(tasks.values(), means)]).numpy()
    precision = torch.from_numpy(np.linalg.inv(LedoitWolf(assume_centered=True).fit(residuals).covariance_
                                               + 1e-5 * np.eye(8)))
    expected = torch.stack([((query - m) @ precision * (query - m)).sum(1).sqrt() for m in means], 1)
    torch.testing.assert_close(router.distances(query), expected, rtol=1e-5, atol=1e-6)  # float32 prototypes

    loaded = PrototypeRouter()
    loaded.load_state_dict(router.state_dict())
    assert loaded.route_or_unknown(query) == router.route_or_unknown(query)
    own = router.route_or_unknown(torch.randn(400, 8, generator=gen, dtype=torch.float64) * scale)  # unseen images of a
    assert np.mean([d["task"] == "unknown" for d in own]) < 0.05
    stranger = router.route_or_unknown(torch.randn(100, 8, generator=gen, dtype=torch.float64) * scale + 40)
    assert np.mean([d["task"] == "unknown" for d in stranger]) > 0.95
    assert router.memory_bytes() == (3 * 8 + 120 * 8 + 8 * 8) * 4  # means, the features kept, one precision
    with pytest.raises(ValueError, match="shared covariance needs"):
        PrototypeRouter(metric="euclidean", covariance="shared")
