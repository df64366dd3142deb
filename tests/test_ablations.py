"""decoflow_core.ablations and the run-loading helpers of decoflow_core.analysis, on hand-made
cases whose answers are known without running the code."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from decoflow_core import ablations, analysis, files
from decoflow_core.model import DeCoFlow

torch.set_num_threads(1)  # two cores are shared with other work

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- paired_effects
def _rows(values: dict) -> pd.DataFrame:
    """{variant: [value per seed]} -> long rows (seed, variant, I-AUROC); None = missing run."""
    return pd.DataFrame([{"seed": seed, "variant": variant, "I-AUROC": v}
                         for variant, per_seed in values.items() for seed, v in enumerate(per_seed)
                         if v is not None])


def _by_variant(effects: pd.DataFrame, by: str = "variant") -> dict:
    return {row[by]: row for row in effects.to_dict("records")}


def test_paired_effects_mean_and_std_of_the_per_seed_differences():
    rows = _rows({"full": [90.0, 92.0, 94.0],
                  "no TSA": [85.0, 88.0, 88.0],      # differences -5, -4, -6
                  "no ACL": [90.1, 91.8, 94.2]})     # differences 0.1, -0.2, 0.2
    effects = ablations.paired_effects(rows, "full")
    assert list(effects.columns) == ["variant", "Δ I-AUROC", "std over seeds", "seeds", "within seed noise"]
    got = _by_variant(effects)
    assert set(got) == {"no TSA", "no ACL"}  # the reference has no row of its own
    # no TSA: mean -5, sample std sqrt(((0)^2 + 1^2 + 1^2) / 2) = 1; |-5| > 2 * 1 / sqrt(3)
    assert got["no TSA"]["Δ I-AUROC"] == pytest.approx(-5.0)
    assert got["no TSA"]["std over seeds"] == pytest.approx(1.0)
    assert got["no TSA"]["seeds"] == 3
    assert got["no TSA"]["within seed noise"] is False
    # no ACL: mean 0.1/3, deviations (0.2, -0.7, 0.5)/3 -> variance (0.04 + 0.49 + 0.25) / 9 / 2
    assert got["no ACL"]["Δ I-AUROC"] == pytest.approx(0.1 / 3)
    assert got["no ACL"]["std over seeds"] == pytest.approx(math.sqrt(0.78 / 18))
    assert got["no ACL"]["within seed noise"] is True  # 0.033 <= 2 * 0.208 / sqrt(3) = 0.24


def test_paired_effects_pairs_by_seed_not_by_row_order():
    # the same values, rows shuffled: the pairing must follow the seed column
    rows = _rows({"ref": [1.0, 2.0, 3.0], "v": [1.5, 2.5, 3.5]}).sample(frac=1.0, random_state=3)
    got = _by_variant(ablations.paired_effects(rows, "ref"))
    assert got["v"]["Δ I-AUROC"] == pytest.approx(0.5)
    assert got["v"]["std over seeds"] == pytest.approx(0.0, abs=1e-12)
    assert got["v"]["within seed noise"] is False  # a consistent shift with no spread is a real effect


def test_paired_effects_drops_seeds_missing_from_either_side():
    rows = _rows({"ref": [10.0, 20.0, 30.0], "v": [11.0, None, 33.0]})  # seed 1 of v missing
    got = _by_variant(ablations.paired_effects(rows, "ref"))["v"]
    assert got["seeds"] == 2
    assert got["Δ I-AUROC"] == pytest.approx(2.0)  # differences 1 and 3
    assert got["std over seeds"] == pytest.approx(math.sqrt(2.0))


def test_paired_effects_with_one_seed_is_undecidable():
    rows = _rows({"ref": [80.0], "a": [70.0], "b": [80.001]})
    got = _by_variant(ablations.paired_effects(rows, "ref"))
    for variant, delta in (("a", -10.0), ("b", 0.001)):
        assert got[variant]["seeds"] == 1
        assert got[variant]["Δ I-AUROC"] == pytest.approx(delta)
        assert math.isnan(got[variant]["std over seeds"])
        assert got[variant]["within seed noise"] is None


def test_paired_effects_other_value_and_grouping_columns():
    rows = pd.DataFrame({"seed": [0, 0, 1, 1], "method": ["x", "y", "x", "y"], "P-AP": [0.2, 0.5, 0.4, 0.5]})
    effects = ablations.paired_effects(rows, "y", value="P-AP", by="method")
    assert list(effects["method"]) == ["x"]
    assert effects["Δ P-AP"].iloc[0] == pytest.approx(-0.2)  # differences -0.3 and -0.1
    assert effects["std over seeds"].iloc[0] == pytest.approx(math.sqrt(0.02))


# ----------------------------------------------------------------------------- interaction_effect
def test_interaction_effect_of_a_hand_made_two_by_two():
    cells = {("frozen", "absent"): 80.0, ("frozen", "present"): 90.0,
             ("trainable", "absent"): 85.0, ("trainable", "present"): 87.0}
    out = ablations.interaction_effect(cells)
    assert out == pytest.approx({"effect_frozen": 10.0, "effect_trainable": 2.0, "interaction": 8.0})


def test_interaction_effect_is_zero_for_additive_effects():
    cells = {("frozen", "absent"): 0.5, ("frozen", "present"): 0.75,
             ("trainable", "absent"): 0.25, ("trainable", "present"): 0.5}
    out = ablations.interaction_effect(cells)
    assert out["effect_frozen"] == pytest.approx(0.25) and out["effect_trainable"] == pytest.approx(0.25)
    assert out["interaction"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- first_task_plan
AVAILABLE = ["a", "b", "c", "d", "e", "f"]


def test_first_task_plan_replaces_wanted_names_the_data_lacks():
    candidates, followers = ablations.first_task_plan(AVAILABLE, AVAILABLE, ["c", "missing", "e"], 3)
    # c and e are kept; the stream's first two non-candidates follow; d fills the missing slot
    assert candidates == ["c", "e", "d"]
    assert followers == ["a", "b"]


def test_first_task_plan_followers_are_never_candidates():
    for wanted in ([], ["a"], ["b", "zz"], ["zz", "yy"], ["c", "d", "e"], ["f", "e", "d", "c", "b", "a"]):
        for n_candidates in (1, 2, 3, 4):
            candidates, followers = ablations.first_task_plan(AVAILABLE, AVAILABLE, wanted, n_candidates)
            assert not set(candidates) & set(followers), (wanted, n_candidates)
            assert len(candidates) == n_candidates
            assert set(candidates) <= set(AVAILABLE)
            assert len(set(candidates)) == len(candidates)
            assert len(followers) == 2


def test_first_task_plan_dropped_wanted_names_can_still_follow():
    candidates, followers = ablations.first_task_plan(AVAILABLE, AVAILABLE, ["f", "e", "d", "c", "b", "a"], 1)
    assert candidates == ["f"]
    assert len(followers) == 2  # the dropped wanted names are free to follow


def test_first_task_plan_repeated_wanted_name_is_one_candidate():
    candidates, _ = ablations.first_task_plan(AVAILABLE, AVAILABLE, ["c", "c"], 3)
    assert len(set(candidates)) == 3


def test_first_task_plan_followers_follow_the_stream_order():
    stream = ["f", "e", "d", "c", "b", "a"]
    candidates, followers = ablations.first_task_plan(AVAILABLE, stream, ["zz"], 2, n_followers=3)
    assert followers == ["f", "e", "d"]
    assert candidates == ["a", "b"]  # filled in the order of ``available``, skipping followers


def test_first_task_plan_keeps_only_n_candidates_and_n_followers():
    candidates, followers = ablations.first_task_plan(AVAILABLE, AVAILABLE, ["f", "e", "d"], 2, n_followers=1)
    assert candidates == ["f", "e"]
    assert followers == ["a"]


def test_first_task_plan_with_too_few_categories_returns_what_there_is():
    candidates, followers = ablations.first_task_plan(["a", "b", "c"], ["a", "b", "c"], ["zz"], 5)
    assert followers == ["a", "b"]
    assert candidates == ["c"]


# ----------------------------------------------------------------------------- acl_latents
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
    before, after = ablations.acl_latents(model, "t0", x)
    assert before.shape == after.shape == (2 * 3 * 3, 8)
    assert before.dtype == after.dtype == np.float64
    np.testing.assert_array_equal(before, after)  # a new task's ACL block is exactly the identity


def test_acl_latents_differ_once_the_acl_is_trained_and_match_the_model():
    model = _model()
    _perturb_dcs(model)
    _perturb_acl_out(model, "t0")
    x = _patches()
    before, after = ablations.acl_latents(model, "t0", x)
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
    before, after = ablations.acl_latents(model, "t1", x)
    assert model.active_task == "t0"  # the caller's task is restored
    model.set_task("t1")
    np.testing.assert_allclose(after, _z_rows(model, x), rtol=1e-5, atol=1e-5)
    model.set_task("t0")
    _, after_t0 = ablations.acl_latents(model, "t0", x)
    assert np.abs(after - after_t0).max() > 1e-2


def test_acl_latents_without_acl_are_the_dcs_output():
    model = _model(use_acl=False)
    _perturb_dcs(model)
    x = _patches()
    before, after = ablations.acl_latents(model, "t0", x)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(after, _z_rows(model, x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- moments
def test_moments_of_gaussian_samples_are_near_zero():
    z = np.random.default_rng(0).standard_normal((100_000, 4)) * [1.0, 3.0, 0.1, 10.0] + [0.0, 5.0, -2.0, 1.0]
    out = ablations.moments(z)
    assert out["abs_skewness"] < 0.03
    assert out["abs_excess_kurtosis"] < 0.06


def test_moments_of_exponential_samples():
    z = np.random.default_rng(1).exponential(scale=2.0, size=(200_000, 2))
    out = ablations.moments(z)
    assert out["abs_skewness"] == pytest.approx(2.0, abs=0.1)
    assert out["abs_excess_kurtosis"] == pytest.approx(6.0, abs=0.6)


def test_moments_hand_computed_and_absolute_per_channel():
    # channel 0: (0, 0, 0, 4): centred (-1, -1, -1, 3), population variance 3,
    # third moment 24/4 = 6 -> skew 6 / 3^1.5 = 2/sqrt(3); fourth 84/4 = 21 -> kurtosis 21/9, excess -2/3.
    # channel 1 is its mirror image: skew -2/sqrt(3), which must not cancel channel 0's.
    z = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, -4.0]])
    out = ablations.moments(z)
    assert out["abs_skewness"] == pytest.approx(2 / math.sqrt(3), rel=1e-9)
    assert out["abs_excess_kurtosis"] == pytest.approx(2 / 3, rel=1e-9)


# ----------------------------------------------------------------------------- linear_fit_r2
def test_linear_fit_r2_of_an_exact_affine_map_is_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 3))
    y = x @ rng.standard_normal((3, 2)) + np.array([4.0, -1.0])
    assert ablations.linear_fit_r2(x, y) == pytest.approx(1.0, abs=1e-10)


def test_linear_fit_r2_of_independent_noise_is_near_zero():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2000, 3)), rng.standard_normal((2000, 3))
    r2 = ablations.linear_fit_r2(x, y)
    assert -1e-9 <= r2 < 0.01  # least squares with an intercept never does worse than the mean


def test_linear_fit_r2_hand_computed_and_pooled_over_channels():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    zigzag = np.array([0.0, 1.0, 0.0, 1.0])
    # y = zigzag alone: Sxy = 1, Sxx = 5, Syy = 1 -> R^2 = 1 / 5
    assert ablations.linear_fit_r2(x, zigzag[:, None]) == pytest.approx(0.2)
    # with a second, exactly linear channel (SST 5, residual 0): 1 - 0.8 / (1 + 5)
    y = np.stack([zigzag, x[:, 0]], axis=1)
    assert ablations.linear_fit_r2(x, y) == pytest.approx(1 - 0.8 / 6)


# ----------------------------------------------------------------------------- model_size_curve
PARAMS = {"base": 100, "per_task": 10}


def test_model_size_curve_decoflow_is_base_plus_tasks_and_router():
    curve = ablations.model_size_curve("decoflow", PARAMS, 3, router_floats_per_task=4)
    np.testing.assert_array_equal(curve, [114, 128, 142])  # 100 + t * 10 + t * 4


def test_model_size_curve_independent_has_no_shared_base():
    curve = ablations.model_size_curve("independent", PARAMS, 4, router_floats_per_task=4)
    np.testing.assert_array_equal(curve, [14, 28, 42, 56])


def test_model_size_curve_of_one_shared_flow():
    replay = ablations.model_size_curve("replay", PARAMS, 3, replay_floats_per_task=50)
    np.testing.assert_array_equal(replay, [150, 200, 250])  # constant network + a growing buffer
    for method in ("finetune", "ewc"):
        np.testing.assert_array_equal(ablations.model_size_curve(method, PARAMS, 2), [100, 100])


# ----------------------------------------------------------------------------- latency
class _Extractor(nn.Module):
    """(patch features (1, 4, 2, 2), pooled (1, 4)) of one image (1, 3, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, image):
        self.calls += 1
        assert image.shape == (1, 3, 8, 8)
        patch = nn.functional.adaptive_avg_pool2d(image.repeat(1, 2, 1, 1)[:, :4], 2)
        return patch, patch.mean(dim=(2, 3))


class _Learner:
    def __init__(self, uses_router: bool, sleep_route: float = 0.0, sleep_flow: float = 0.0):
        self.uses_router = uses_router
        self.sleep_route, self.sleep_flow = sleep_route, sleep_flow
        self.routed, self.scored = [], []

    def route(self, pooled):
        assert pooled.shape == (1, 4)
        self.routed.append(pooled)
        time.sleep(self.sleep_route)
        return ["task_b"]

    def patch_nll(self, task, patch):
        assert patch.shape == (1, 4, 2, 2)
        self.scored.append(task)
        time.sleep(self.sleep_flow)
        return torch.zeros(1, 2, 2)


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_latency_routes_every_image_and_scores_it_with_the_routed_task():
    extractor, learner = _Extractor(), _Learner(uses_router=True)
    out = ablations.latency(extractor, learner, _images(3), repeats=2)
    assert set(out) == {"backbone ms", "router ms", "flow ms"}
    assert all(isinstance(v, float) and v >= 0 for v in out.values())
    assert extractor.calls == 6 and len(learner.routed) == 6
    assert learner.scored == ["task_b"] * 6


def test_latency_without_a_router_never_routes():
    extractor, learner = _Extractor(), _Learner(uses_router=False)
    out = ablations.latency(extractor, learner, _images(2))
    assert set(out) == {"backbone ms", "router ms", "flow ms"}
    assert all(v >= 0 for v in out.values())
    assert learner.routed == [] and learner.scored == [None, None]


def test_latency_charges_each_part_its_own_time():
    out = ablations.latency(_Extractor(), _Learner(uses_router=True, sleep_route=0.004), _images(2))
    assert out["router ms"] >= 4.0
    out = ablations.latency(_Extractor(), _Learner(uses_router=True, sleep_flow=0.004), _images(2))
    assert out["flow ms"] >= 4.0


# ----------------------------------------------------------------------------- oracle_view
def _scores(offset: float) -> dict:
    per = {"image_auroc": 0.9 + offset, "pixel_auroc": 0.8 + offset, "pixel_ap": 0.3 + offset}
    return {"final": {"t0": dict(per), "t1": dict(per)}, "mean": dict(per),
            "forgetting": {k: 0.05 + offset for k in per}, "bwt": {k: -0.05 - offset for k in per}}


def _metrics(method: str, routed: bool) -> dict:
    return {"method": method, "tasks": ["t0", "t1"], **_scores(0.0),
            "oracle": _scores(0.05) if routed else None, "routing_accuracy": 0.75 if routed else None,
            "params": {"base": 100, "per_task": 10, "per_task_ratio": 0.1}}


def test_oracle_view_swaps_in_the_oracle_scores():
    metrics = _metrics("decoflow", routed=True)
    view = analysis.oracle_view(metrics)
    for key in ("final", "mean", "forgetting", "bwt"):
        assert view[key] == metrics["oracle"][key]
    assert view["mean"]["image_auroc"] == pytest.approx(0.95)
    assert view["routing_accuracy"] is None
    assert view["method"] == "decoflow" and view["params"] == metrics["params"] and view["tasks"] == ["t0", "t1"]
    # the routed metrics themselves are left alone
    assert metrics["mean"]["image_auroc"] == pytest.approx(0.9) and metrics["routing_accuracy"] == 0.75


@pytest.mark.parametrize("oracle", [None, {}, "absent"])
def test_oracle_view_without_oracle_scores_names_the_method(oracle):
    metrics = _metrics("ewc", routed=False)
    if oracle == "absent":
        del metrics["oracle"]
    else:
        metrics["oracle"] = oracle
    with pytest.raises(ValueError, match="ewc"):
        analysis.oracle_view(metrics)


# ----------------------------------------------------------------------------- method_metrics
def test_method_metrics_adds_an_oracle_label_only_for_routed_runs(tmp_path):
    routed = [files.write_json(tmp_path / f"decoflow-s{s}" / "metrics.json", _metrics("decoflow", True)).parent
              for s in (0, 1)]
    plain = files.write_json(tmp_path / "ewc-s0" / "metrics.json", _metrics("ewc", False)).parent
    out = analysis.method_metrics({"decoflow": routed, "ewc": [plain]})
    assert list(out) == ["decoflow", "decoflow (oracle task id)", "ewc"]
    assert len(out["decoflow"]) == 2 and len(out["decoflow (oracle task id)"]) == 2 and len(out["ewc"]) == 1
    assert out["decoflow"][0]["routing_accuracy"] == 0.75
    assert out["decoflow"][0]["mean"]["image_auroc"] == pytest.approx(0.9)
    oracle = out["decoflow (oracle task id)"][1]
    assert oracle["routing_accuracy"] is None
    assert oracle["mean"]["image_auroc"] == pytest.approx(0.95)
    assert oracle["final"]["t1"]["pixel_ap"] == pytest.approx(0.35)
    assert out["ewc"][0]["oracle"] is None and out["ewc"][0]["method"] == "ewc"


def test_method_metrics_needs_oracle_scores_in_every_seed(tmp_path):
    with_oracle = files.write_json(tmp_path / "a" / "metrics.json", _metrics("decoflow", True)).parent
    without = files.write_json(tmp_path / "b" / "metrics.json", _metrics("decoflow", False)).parent
    out = analysis.method_metrics({"decoflow": [with_oracle, without]})
    assert list(out) == ["decoflow"]


# ----------------------------------------------------------------------------- kit_path
def test_kit_path_keeps_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere" / "data"
    assert analysis.kit_path(target) == target
    assert analysis.kit_path(str(target)) == target
    assert isinstance(analysis.kit_path(str(target)), Path)


def test_kit_path_resolves_relative_paths_against_the_kit_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert analysis.kit_path("runs/x") == REPO_ROOT / "runs" / "x"
    assert analysis.kit_path(Path("data")) == REPO_ROOT / "data"
    assert analysis.kit_path("../sibling") == REPO_ROOT.parent / "sibling"
    assert analysis.kit_path("runs/x").is_absolute()
