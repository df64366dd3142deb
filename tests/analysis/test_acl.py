"""What the ACL blocks do to the latent (analysis/acl.py), on hand-made models and samples."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decoflow_core.analysis import acl
from decoflow_core.model import DeCoFlow


def _model(**kwargs) -> DeCoFlow:
    torch.manual_seed(0)
    model = DeCoFlow(dim=8, n_dcs=2, n_acl=1, rank=2, **kwargs)
    model.add_task("t0")
    model.set_task("t0")
    return model


def _patches(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(seed))


def _perturb_acl_out(model: DeCoFlow, task: str, scale: float = 0.5, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.acl[task]:
            block.subnet.out.weight.copy_(scale * torch.randn(block.subnet.out.weight.shape, generator=g))
            block.subnet.out.bias.copy_(scale * torch.randn(block.subnet.out.bias.shape, generator=g))


def _perturb_dcs(model: DeCoFlow, seed: int = 3) -> None:
    """Make the DCS blocks non-trivial too (their last base layers start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.dcs.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _z_rows(model: DeCoFlow, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        z, _ = model(x)  # (B, D, H, W)
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double().numpy()


def test_acl_latents_of_a_fresh_task_are_equal():
    model = _model()
    x = _patches()
    before, after = acl.acl_latents(model, "t0", x)
    assert before.shape == after.shape == (2 * 3 * 3, 8)
    assert before.dtype == after.dtype == np.float64
    np.testing.assert_array_equal(before, after)  # a new task's ACL block is exactly the identity


def test_acl_latents_differ_once_the_acl_is_trained_and_match_the_model():
    model = _model()
    _perturb_dcs(model)
    _perturb_acl_out(model, "t0")
    x = _patches()
    before, after = acl.acl_latents(model, "t0", x)
    assert np.abs(after - before).max() > 1e-2
    # the DCS blocks and then the ACL blocks are the whole flow
    np.testing.assert_allclose(after, _z_rows(model, x), rtol=1e-5, atol=1e-5)
    # "before" is what the ACL blocks map to "after": undoing them recovers it
    h = torch.from_numpy(after).float().reshape(2, 3, 3, 8)
    with torch.no_grad():
        for block in reversed(model.acl["t0"]):
            h = block.inverse(h)
    np.testing.assert_allclose(h.reshape(-1, 8).double().numpy(), before, rtol=1e-4, atol=1e-4)
    # and "before" is not the flow input: the DCS blocks did something
    with torch.no_grad():
        u = model.embed(x).permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    assert np.abs(before - u).max() > 1e-2


def test_acl_latents_use_the_named_task_not_the_active_one():
    model = _model()
    model.add_task("t1")
    _perturb_dcs(model)
    _perturb_acl_out(model, "t0", seed=4)
    _perturb_acl_out(model, "t1", seed=5)
    x = _patches()
    model.set_task("t0")
    before, after = acl.acl_latents(model, "t1", x)
    assert model.active_task == "t0"  # the caller's task is restored
    model.set_task("t1")
    np.testing.assert_allclose(after, _z_rows(model, x), rtol=1e-5, atol=1e-5)
    model.set_task("t0")
    _, after_t0 = acl.acl_latents(model, "t0", x)
    assert np.abs(after - after_t0).max() > 1e-2


def test_acl_latents_without_acl_are_the_dcs_output():
    model = _model(use_acl=False)
    _perturb_dcs(model)
    x = _patches()
    before, after = acl.acl_latents(model, "t0", x)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(after, _z_rows(model, x), rtol=1e-5, atol=1e-5)


def test_moments_of_gaussian_samples_are_near_zero():
    z = np.random.default_rng(0).standard_normal((100_000, 4)) * [1.0, 3.0, 0.1, 10.0] + [0.0, 5.0, -2.0, 1.0]
    out = acl.moments(z)
    assert out["abs_skewness"] < 0.03
    assert out["abs_excess_kurtosis"] < 0.06


def test_moments_of_exponential_samples():
    z = np.random.default_rng(1).exponential(scale=2.0, size=(200_000, 2))
    out = acl.moments(z)
    assert out["abs_skewness"] == pytest.approx(2.0, abs=0.1)
    assert out["abs_excess_kurtosis"] == pytest.approx(6.0, abs=0.6)


def test_moments_hand_computed_and_absolute_per_channel():
    # channel 0: (0, 0, 0, 4): centred (-1, -1, -1, 3), population variance 3,
    # third moment 24/4 = 6 -> skew 6 / 3^1.5 = 2/sqrt(3); fourth 84/4 = 21 -> kurtosis 21/9, excess -2/3.
    # channel 1 is its mirror image: skew -2/sqrt(3), which must not cancel channel 0's.
    z = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, -4.0]])
    out = acl.moments(z)
    assert out["abs_skewness"] == pytest.approx(2 / math.sqrt(3), rel=1e-9)
    assert out["abs_excess_kurtosis"] == pytest.approx(2 / 3, rel=1e-9)


def test_linear_fit_r2_of_an_exact_affine_map_is_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 3))
    y = x @ rng.standard_normal((3, 2)) + np.array([4.0, -1.0])
    assert acl.linear_fit_r2(x, y) == pytest.approx(1.0, abs=1e-10)


def test_linear_fit_r2_of_independent_noise_is_near_zero():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2000, 3)), rng.standard_normal((2000, 3))
    r2 = acl.linear_fit_r2(x, y)
    assert -1e-9 <= r2 < 0.01  # least squares with an intercept never does worse than the mean


def test_linear_fit_r2_hand_computed_and_pooled_over_channels():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    zigzag = np.array([0.0, 1.0, 0.0, 1.0])
    # y = zigzag alone: Sxy = 1, Sxx = 5, Syy = 1 -> R^2 = 1 / 5
    assert acl.linear_fit_r2(x, zigzag[:, None]) == pytest.approx(0.2)
    # with a second, exactly linear channel (SST 5, residual 0): 1 - 0.8 / (1 + 5)
    y = np.stack([zigzag, x[:, 0]], axis=1)
    assert acl.linear_fit_r2(x, y) == pytest.approx(1 - 0.8 / 6)
