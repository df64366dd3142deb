"""decoflow_core.analysis on hand-made cases whose answers are known without running it."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from decoflow_core import analysis, probes
from decoflow_core.config import make_config
from decoflow_core.model import DeCoFlow


# ----------------------------------------------------------------------------- SVD energy (Sec. 4.4.3)


def test_a_rank_two_delta_has_all_its_energy_in_the_top_two():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((40, 2)) @ rng.standard_normal((2, 30))
    curve = probes.cumulative_energy(delta)
    assert len(curve) == 30
    assert curve[0] < 1.0
    assert math.isclose(curve[1], 1.0, rel_tol=1e-12) and math.isclose(probes.energy_at_rank(delta, 2), 1.0)


def test_energy_of_known_singular_values():
    delta = np.diag([3.0, 2.0, 1.0])  # energies 9, 4, 1 out of 14
    np.testing.assert_allclose(probes.cumulative_energy(delta), [9 / 14, 13 / 14, 1.0])
    assert probes.energy_at_rank(delta, 1) == pytest.approx(9 / 14)
    assert probes.energy_at_rank(delta, 64) == 1.0  # past the full rank nothing is left


def test_a_zero_delta_counts_as_fully_captured():
    assert np.all(probes.cumulative_energy(np.zeros((3, 4))) == 1.0)


def test_mean_energy_curve_pads_shorter_curves_with_one():
    mean = probes.mean_energy_curve([np.array([0.5, 1.0]), np.array([0.2, 0.6, 0.9, 1.0])])
    np.testing.assert_allclose(mean, [0.35, 0.8, 0.95, 1.0])


def test_noise_has_no_low_rank_structure():
    assert probes.random_energy((64, 64), 8) < 0.5  # 8 of 64 directions hold well under half of white noise


def test_delta_w_table_flags_layers_whose_full_rank_is_at_most_64():
    deltas = {"dcs.0.subnet.s_in": np.diag(np.arange(8, 0, -1.0)), "dcs.0.subnet.t_in": np.eye(100)}
    table = probes.delta_w_table(deltas, profile_rank=4, paper_ranks={"dcs.0.subnet.s_in": 768, "dcs.0.subnet.t_in": 384})
    small, large = table.to_dict("records")
    assert small["full rank"] == 8 and small["top 64 is full rank"] and small["energy@64"] == 1.0
    assert small["matched rank"] == 1  # ceil(8 * 64 / 768)
    assert not large["top 64 is full rank"]
    assert large["energy@64"] == pytest.approx(0.64)  # identity: every direction holds 1 / 100
    assert large["matched rank"] == math.ceil(100 * 64 / 384) and large["energy@4 (profile rank)"] == pytest.approx(0.04)


def test_paper_layer_ranks_are_those_of_the_768_dim_flow():
    ranks = probes.paper_layer_ranks(["dcs.0.subnet.s_in", "dcs.0.subnet.t_out", "dcs.1.subnet.t_in"])
    # D = 768, d1 = d2 = 384, hidden = 768; s_in sees [x1; context] = 768 inputs
    assert ranks == {"dcs.0.subnet.s_in": 768, "dcs.0.subnet.t_out": 384, "dcs.1.subnet.t_in": 384}


def tiny_flow(**options) -> DeCoFlow:
    torch.manual_seed(0)
    return DeCoFlow(dim=8, n_dcs=2, n_acl=1, rank=2, hidden_ratio=1.0, **options)


def test_full_finetune_delta_changes_only_a_copy_and_covers_every_base_linear():
    model = tiny_flow()
    model.add_task("first")
    model.set_task("first")
    model.freeze_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = make_config("smoke").replace(epochs=2, batch_size=4, lr=1e-2)
    patches = torch.randn(8, 8, 4, 4)
    deltas = probes.full_finetune_delta(model, "second", patches, config, seed=0)
    assert set(deltas) == set(probes.base_linears(model)) and len(deltas) == 2 * 4
    assert all(np.abs(d).max() > 0 for d in deltas.values()), "every base Linear must move"
    assert model.tasks == ["first"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.rand(7)  # another global RNG state: the same seed gives the same deltas
    again = probes.full_finetune_delta(model, "second", patches, config, seed=0)
    assert all(np.array_equal(deltas[k], again[k]) for k in deltas)


# ----------------------------------------------------------------------------- TAL gradients (Sec. 4.4.4)


def test_tail_share_on_a_hand_made_batch():
    nll = [5.0, 1.0, 2.0, 1.0]
    grads = [3.0, 1.0, 1.0, 1.0]
    assert probes.tail_share(grads, nll, top_k=0.25) == pytest.approx(0.5)  # patch 0 carries 3 of 6
    assert probes.tail_share(grads, nll, top_k=0.5) == pytest.approx(4 / 6)  # patches 0 and 2


def test_expected_tail_weight_of_eq_21():
    assert probes.expected_tail_weight(0.0, 0.02) == pytest.approx(0.02)
    assert probes.expected_tail_weight(1.0, 0.02) == pytest.approx(1.0)
    assert probes.expected_tail_weight(0.7, 0.02) == pytest.approx(0.706)


def test_pure_tail_loss_on_a_patchwise_flow_has_gradient_only_on_the_worst_patch():
    # without SCM and the DCS context every patch is modelled alone, so a loss on one patch's NLL
    # has a gradient on that patch's features only
    model = tiny_flow(use_scm=False, use_context=False)
    model.add_task("a")
    model.set_task("a")
    x = torch.randn(2, 8, 4, 4)
    config = make_config("smoke").replace(lambda_tail=1.0, top_k=1 / 32)
    nll, grad = probes.patch_feature_gradients(model, x, config)
    assert nll.shape == grad.shape == (32,)
    assert np.count_nonzero(grad) == 1 and np.argmax(grad) == np.argmax(nll)
    nll_plain, grad_plain = probes.patch_feature_gradients(model, x, config.replace(lambda_tail=0.0))
    np.testing.assert_allclose(nll_plain, nll)
    assert np.count_nonzero(grad_plain) == 32
    assert probes.tail_share(grad, nll, 1 / 32) == 1.0 > probes.tail_share(grad_plain, nll, 1 / 32)


# ----------------------------------------------------------------------------- routing (Sec. 3.8, 4.4.6)


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
    confusion, accuracy = probes.routing_confusion(train, test, metric="euclidean")
    assert accuracy == 0.5 and confusion.tolist() == [[0, 5], [0, 5]]
    confusion, accuracy = probes.routing_confusion(train, test, metric="mahalanobis", reg=1e-5)
    assert accuracy == 1.0 and confusion.tolist() == [[5, 0], [0, 5]]
    errors = probes.routing_errors([[0, 5], [0, 5]], ["wide", "tight"])
    assert errors.to_dict("records") == [{"true task": "wide", "routed to": "tight", "images": 5}]
    assert probes.routing_errors(np.eye(2, dtype=int), ["a", "b"]).empty


def test_row_normalise():
    np.testing.assert_allclose(probes.row_normalise([[3, 1], [0, 0]]), [[0.75, 0.25], [0.0, 0.0]])


def test_task_separation_orders_pairs_from_closest():
    rng = np.random.default_rng(0)
    pooled = {"a": rng.standard_normal((50, 3)), "b": rng.standard_normal((50, 3)) + 0.1,
              "c": rng.standard_normal((50, 3)) + 20}
    table = probes.task_separation(pooled)
    assert list(zip(table["task a"], table["task b"]))[0] == ("a", "b")
    assert table["separation"].iloc[0] < 1 < table["separation"].iloc[-1]


# ----------------------------------------------------------------------------- tables and bookkeeping


def test_task_stream():
    available = ["b", "a", "d", "c"]
    assert analysis.task_stream(available, None, quick=False) == ["a", "b", "c", "d"]
    assert analysis.task_stream(available, None, quick=True) == ["a", "b", "c"]
    assert analysis.task_stream(available, ["d", "a"], quick=True) == ["d", "a"]
    with pytest.raises(ValueError, match="zebra"):
        analysis.task_stream(available, ["a", "zebra"], quick=False)


def test_profile_sets_drop_what_the_profile_already_has():
    assert analysis.profile_sets("cpu", {"rank": 16, "epochs": 1, "lambda_tail": 0.7}) == {"epochs": 1}
    assert analysis.profile_sets("cpu", {"rank": 64}) == {"rank": 64}


def test_seed_table_means_and_stds():
    rows = pd.DataFrame({"method": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "x": [1.0, 3.0, 2.0, 2.0]})
    table = analysis.seed_table(rows)
    assert list(table.columns) == ["method", "x", "x std"]
    assert table["x"].tolist() == [2.0, 2.0] and table["x std"].tolist() == [pytest.approx(math.sqrt(2)), 0.0]
    one_seed = analysis.seed_table(rows[rows.seed == 0])
    assert list(one_seed.columns) == ["method", "x"]


def test_save_table_writes_csv_and_markdown(tmp_path):
    df = pd.DataFrame({"method": ["decoflow", "finetune"], "I-AUROC": [0.91234, float("nan")]})
    csv, md = analysis.save_table(df, "main", tmp_path)
    assert pd.read_csv(csv)["method"].tolist() == ["decoflow", "finetune"]
    lines = md.read_text().splitlines()
    assert lines == ["| method | I-AUROC |", "|---|---|", "| decoflow | 0.9123 |", "| finetune | n/a |"]


def test_summary_and_forgetting_rows_read_a_metrics_dict():
    metrics = {"mean": {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_ap": 0.3},
               "forgetting": {"image_auroc": 0.1, "pixel_auroc": 0.2, "pixel_ap": None},
               "bwt": {"image_auroc": -0.1, "pixel_auroc": -0.2, "pixel_ap": None},
               "routing_accuracy": 1.0, "params": {"per_task": 123}}
    assert analysis.summary_row(metrics) == {"I-AUROC": 0.9, "P-AUROC": 0.8, "P-AP": 0.3, "FM (I-AUROC)": 0.1,
                                             "BWT (I-AUROC)": -0.1, "routing": 1.0, "params/task": 123}
    row = analysis.forgetting_row(metrics)
    assert row["FM (P-AUROC)"] == 0.2 and row["BWT (P-AP)"] is None and len(row) == 6


def test_first_task_curve_is_the_first_column():
    R = np.array([[0.9, np.nan], [0.5, 0.8]])
    np.testing.assert_array_equal(analysis.first_task_curve(R), [0.9, 0.5])


def test_pick_test_samples_prefers_distinct_defect_types():
    from decoflow_core.data import Category, Sample
    from pathlib import Path
    test = [Sample(Path(f"{t}{i}.png"), int(t != "good"), t, None) for t in ("good", "crack", "hole") for i in range(3)]
    picked = probes.pick_test_samples(Category("x", Path("."), [], test), n_good=1, n_defect=2)
    assert [s.defect_type for s in picked] == ["good", "crack", "hole"]
    picked = probes.pick_test_samples(Category("x", Path("."), [], test[:5]), n_good=0, n_defect=3)
    assert [s.defect_type for s in picked] == ["crack", "crack"]  # only two defects exist


def test_markdown_table_writes_counts_as_whole_numbers():
    df = pd.DataFrame({"method": ["a", "b"], "params/task": [39749.0, 0.0], "routing": [1.0, float("nan")]})
    lines = analysis.markdown_table(df).splitlines()
    assert lines[2:] == ["| a | 39,749 | 1.0000 |", "| b | 0 | n/a |"]
