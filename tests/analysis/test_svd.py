"""The spectrum of a full fine-tune's weight change (analysis/svd.py), on cases whose answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decoflow_core.analysis import svd
from decoflow_core.config import make_config
from decoflow_core.model import DeCoFlow


def tiny_flow(**options) -> DeCoFlow:
    torch.manual_seed(0)
    return DeCoFlow(dim=8, n_dcs=2, n_acl=1, rank=2, hidden_ratio=1.0, **options)


def test_a_rank_two_delta_has_all_its_energy_in_the_top_two():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((40, 2)) @ rng.standard_normal((2, 30))
    curve = svd.cumulative_energy(delta)
    assert len(curve) == 30
    assert curve[0] < 1.0
    assert math.isclose(curve[1], 1.0, rel_tol=1e-12) and math.isclose(svd.energy_at_rank(delta, 2), 1.0)


def test_energy_of_known_singular_values():
    delta = np.diag([3.0, 2.0, 1.0])  # energies 9, 4, 1 out of 14
    np.testing.assert_allclose(svd.cumulative_energy(delta), [9 / 14, 13 / 14, 1.0])
    assert svd.energy_at_rank(delta, 1) == pytest.approx(9 / 14)
    assert svd.energy_at_rank(delta, 64) == 1.0  # past the full rank nothing is left


def test_a_zero_delta_counts_as_fully_captured():
    assert np.all(svd.cumulative_energy(np.zeros((3, 4))) == 1.0)


def test_mean_energy_curve_pads_shorter_curves_with_one():
    mean = svd.mean_energy_curve([np.array([0.5, 1.0]), np.array([0.2, 0.6, 0.9, 1.0])])
    np.testing.assert_allclose(mean, [0.35, 0.8, 0.95, 1.0])


def test_noise_has_no_low_rank_structure():
    assert svd.random_energy((64, 64), 8) < 0.5  # 8 of 64 directions hold well under half of white noise


def test_delta_w_table_flags_layers_whose_full_rank_is_at_most_64():
    deltas = {"dcs.0.subnet.s_in": np.diag(np.arange(8, 0, -1.0)), "dcs.0.subnet.t_in": np.eye(100)}
    table = svd.delta_w_table(deltas, profile_rank=4, paper_ranks={"dcs.0.subnet.s_in": 768, "dcs.0.subnet.t_in": 384})
    small, large = table.to_dict("records")
    assert small["full rank"] == 8 and small["top 64 is full rank"] and small["energy@64"] == 1.0
    assert small["matched rank"] == 1  # ceil(8 * 64 / 768)
    assert not large["top 64 is full rank"]
    assert large["energy@64"] == pytest.approx(0.64)  # identity: every direction holds 1 / 100
    assert large["matched rank"] == math.ceil(100 * 64 / 384) and large["energy@4 (profile rank)"] == pytest.approx(0.04)


def test_paper_layer_ranks_are_those_of_the_768_dim_flow():
    ranks = svd.paper_layer_ranks(["dcs.0.subnet.s_in", "dcs.0.subnet.t_out", "dcs.1.subnet.t_in"])
    # D = 768, d1 = d2 = 384, hidden = 768; s_in sees [x1; context] = 768 inputs
    assert ranks == {"dcs.0.subnet.s_in": 768, "dcs.0.subnet.t_out": 384, "dcs.1.subnet.t_in": 384}


def test_full_finetune_delta_changes_only_a_copy_and_covers_every_base_linear():
    model = tiny_flow()
    model.add_task("first")
    model.set_task("first")
    model.freeze_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = make_config("smoke").replace(epochs=2, batch_size=4, lr=1e-2)
    patches = torch.randn(8, 8, 4, 4)
    deltas = svd.full_finetune_delta(model, "second", patches, config, seed=0)
    assert set(deltas) == set(svd.base_linears(model)) and len(deltas) == 2 * 4
    assert all(np.abs(d).max() > 0 for d in deltas.values()), "every base Linear must move"
    assert model.tasks == ["first"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.rand(7)  # another global RNG state: the same seed gives the same deltas
    again = svd.full_finetune_delta(model, "second", patches, config, seed=0)
    assert all(np.array_equal(deltas[k], again[k]) for k in deltas)
