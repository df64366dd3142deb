"""scripts/real_ad_analysis.py: its Gaussians and its border ring."""
import sys
from pathlib import Path

import torch

from decoflow_core.config import make_config
from decoflow_core.learners.baselines import PaDiMReference
from decoflow_core.train import learn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import real_ad_analysis  # noqa: E402


def test_the_per_position_gaussian_is_the_padim_reference_and_the_shared_one_ignores_position():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(30, 3, 4, 4, generator=gen).double(), torch.randn(5, 3, 4, 4, generator=gen).double()
    padim = PaDiMReference(make_config("smoke"), 3, "cpu")
    learn(padim, "t", {"patch": train}, seed=0)
    ours = real_ad_analysis.gaussian_scores(train, test, per_position=True)
    assert torch.allclose(ours.float(), padim.patch_nll("t", test.float()), rtol=1e-4, atol=1e-4)
    shifted = train + torch.arange(16.0, dtype=torch.double).view(1, 1, 4, 4)  # a mean that depends on position
    shared = real_ad_analysis.gaussian_scores(shifted, test, per_position=False)
    flat = shifted.permute(0, 2, 3, 1).reshape(-1, 3)
    cov = torch.cov(flat.T) + 0.01 * torch.eye(3, dtype=torch.double)
    diff = test[1, :, 2, 3] - flat.mean(0)
    assert torch.isclose(shared[1, 2, 3], diff @ torch.linalg.inv(cov) @ diff)


def test_the_ring_is_the_outer_patches():
    ring = real_ad_analysis.ring_mask(14)
    assert ring.sum() == 14 * 4 - 4 and ring[0, 5] and ring[13, 13] and not ring[1, 1]
