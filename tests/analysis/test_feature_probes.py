"""Probes of the features (analysis/feature_probes.py)."""
from __future__ import annotations

import numpy as np

from decoflow_core.analysis import feature_probes


def test_task_separation_orders_pairs_from_closest():
    rng = np.random.default_rng(0)
    pooled = {"a": rng.standard_normal((50, 3)), "b": rng.standard_normal((50, 3)) + 0.1,
              "c": rng.standard_normal((50, 3)) + 20}
    table = feature_probes.task_separation(pooled)
    assert list(zip(table["task a"], table["task b"]))[0] == ("a", "b")
    assert table["separation"].iloc[0] < 1 < table["separation"].iloc[-1]
