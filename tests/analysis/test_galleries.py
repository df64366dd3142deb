"""Sample galleries (analysis/galleries.py)."""
from __future__ import annotations

from pathlib import Path

from decoflow_core.analysis import galleries


def test_pick_test_samples_prefers_distinct_defect_types():
    from decoflow_core.data import Category, Sample
    test = [Sample(Path(f"{t}{i}.png"), int(t != "good"), t, None) for t in ("good", "crack", "hole") for i in range(3)]
    picked = galleries.pick_test_samples(Category("x", Path("."), [], test), n_good=1, n_defect=2)
    assert [s.defect_type for s in picked] == ["good", "crack", "hole"]
    picked = galleries.pick_test_samples(Category("x", Path("."), [], test[:5]), n_good=0, n_defect=3)
    assert [s.defect_type for s in picked] == ["crack", "crack"]  # only two defects exist
