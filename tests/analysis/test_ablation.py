"""Seed statistics and plans of the ablation studies (analysis/ablation.py)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from decoflow_core.analysis import ablation


def _rows(values: dict) -> pd.DataFrame:
    """{variant: [value per seed]} -> long rows (seed, variant, I-AUROC); None = missing run."""
    return pd.DataFrame([{"seed": seed, "variant": variant, "I-AUROC": v}
                         for variant, per_seed in values.items() for seed, v in enumerate(per_seed)
                         if v is not None])


def _by_variant(effects: pd.DataFrame, by: str = "variant") -> dict:
    return {row[by]: row for row in effects.to_dict("records")}


AVAILABLE = ["a", "b", "c", "d", "e", "f"]


def test_paired_effects_mean_and_std_of_the_per_seed_differences():
    rows = _rows({"full": [90.0, 92.0, 94.0],
                  "no TSA": [85.0, 88.0, 88.0],      # differences -5, -4, -6
                  "no ACL": [90.1, 91.8, 94.2]})     # differences 0.1, -0.2, 0.2
    effects = ablation.paired_effects(rows, "full")
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
    got = _by_variant(ablation.paired_effects(rows, "ref"))
    assert got["v"]["Δ I-AUROC"] == pytest.approx(0.5)
    assert got["v"]["std over seeds"] == pytest.approx(0.0, abs=1e-12)
    assert got["v"]["within seed noise"] is False  # a consistent shift with no spread is a real effect


def test_paired_effects_drops_seeds_missing_from_either_side():
    rows = _rows({"ref": [10.0, 20.0, 30.0], "v": [11.0, None, 33.0]})  # seed 1 of v missing
    got = _by_variant(ablation.paired_effects(rows, "ref"))["v"]
    assert got["seeds"] == 2
    assert got["Δ I-AUROC"] == pytest.approx(2.0)  # differences 1 and 3
    assert got["std over seeds"] == pytest.approx(math.sqrt(2.0))


def test_paired_effects_with_one_seed_is_undecidable():
    rows = _rows({"ref": [80.0], "a": [70.0], "b": [80.001]})
    got = _by_variant(ablation.paired_effects(rows, "ref"))
    for variant, delta in (("a", -10.0), ("b", 0.001)):
        assert got[variant]["seeds"] == 1
        assert got[variant]["Δ I-AUROC"] == pytest.approx(delta)
        assert math.isnan(got[variant]["std over seeds"])
        assert got[variant]["within seed noise"] is None


def test_paired_effects_other_value_and_grouping_columns():
    rows = pd.DataFrame({"seed": [0, 0, 1, 1], "method": ["x", "y", "x", "y"], "P-AP": [0.2, 0.5, 0.4, 0.5]})
    effects = ablation.paired_effects(rows, "y", value="P-AP", by="method")
    assert list(effects["method"]) == ["x"]
    assert effects["Δ P-AP"].iloc[0] == pytest.approx(-0.2)  # differences -0.3 and -0.1
    assert effects["std over seeds"].iloc[0] == pytest.approx(math.sqrt(0.02))


def test_interaction_effect_of_a_hand_made_two_by_two():
    cells = {("frozen", "absent"): 80.0, ("frozen", "present"): 90.0,
             ("trainable", "absent"): 85.0, ("trainable", "present"): 87.0}
    out = ablation.interaction_effect(cells)
    assert out == pytest.approx({"effect_frozen": 10.0, "effect_trainable": 2.0, "interaction": 8.0})


def test_interaction_effect_is_zero_for_additive_effects():
    cells = {("frozen", "absent"): 0.5, ("frozen", "present"): 0.75,
             ("trainable", "absent"): 0.25, ("trainable", "present"): 0.5}
    out = ablation.interaction_effect(cells)
    assert out["effect_frozen"] == pytest.approx(0.25) and out["effect_trainable"] == pytest.approx(0.25)
    assert out["interaction"] == pytest.approx(0.0)


def test_first_task_plan_replaces_wanted_names_the_data_lacks():
    candidates, followers = ablation.first_task_plan(AVAILABLE, AVAILABLE, ["c", "missing", "e"], 3)
    # c and e are kept; the stream's first two non-candidates follow; d fills the missing slot
    assert candidates == ["c", "e", "d"]
    assert followers == ["a", "b"]


def test_first_task_plan_followers_are_never_candidates():
    for wanted in ([], ["a"], ["b", "zz"], ["zz", "yy"], ["c", "d", "e"], ["f", "e", "d", "c", "b", "a"]):
        for n_candidates in (1, 2, 3, 4):
            candidates, followers = ablation.first_task_plan(AVAILABLE, AVAILABLE, wanted, n_candidates)
            assert not set(candidates) & set(followers), (wanted, n_candidates)
            assert len(candidates) == n_candidates
            assert set(candidates) <= set(AVAILABLE)
            assert len(set(candidates)) == len(candidates)
            assert len(followers) == 2


def test_first_task_plan_dropped_wanted_names_can_still_follow():
    candidates, followers = ablation.first_task_plan(AVAILABLE, AVAILABLE, ["f", "e", "d", "c", "b", "a"], 1)
    assert candidates == ["f"]
    assert len(followers) == 2  # the dropped wanted names are free to follow


def test_first_task_plan_repeated_wanted_name_is_one_candidate():
    candidates, _ = ablation.first_task_plan(AVAILABLE, AVAILABLE, ["c", "c"], 3)
    assert len(set(candidates)) == 3


def test_first_task_plan_followers_follow_the_stream_order():
    stream = ["f", "e", "d", "c", "b", "a"]
    candidates, followers = ablation.first_task_plan(AVAILABLE, stream, ["zz"], 2, n_followers=3)
    assert followers == ["f", "e", "d"]
    assert candidates == ["a", "b"]  # filled in the order of ``available``, skipping followers


def test_first_task_plan_keeps_only_n_candidates_and_n_followers():
    candidates, followers = ablation.first_task_plan(AVAILABLE, AVAILABLE, ["f", "e", "d"], 2, n_followers=1)
    assert candidates == ["f", "e"]
    assert followers == ["a"]


def test_first_task_plan_with_too_few_categories_returns_what_there_is():
    candidates, followers = ablation.first_task_plan(["a", "b", "c"], ["a", "b", "c"], ["zz"], 5)
    assert followers == ["a", "b"]
    assert candidates == ["c"]
