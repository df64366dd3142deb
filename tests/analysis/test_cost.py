"""Model size as tasks accumulate (analysis/cost.py)."""
from __future__ import annotations

import numpy as np

from decoflow_core.analysis import cost

PARAMS = {"base": 100, "per_task": 10}


def test_model_size_curve_decoflow_is_base_plus_tasks_and_router():
    curve = cost.model_size_curve("decoflow", PARAMS, 3, router_floats_per_task=4)
    np.testing.assert_array_equal(curve, [114, 128, 142])  # 100 + t * 10 + t * 4


def test_model_size_curve_independent_has_no_shared_base():
    curve = cost.model_size_curve("independent", PARAMS, 4, router_floats_per_task=4)
    np.testing.assert_array_equal(curve, [14, 28, 42, 56])


def test_model_size_curve_of_one_shared_flow():
    replay = cost.model_size_curve("replay", PARAMS, 3, replay_floats_per_task=50)
    np.testing.assert_array_equal(replay, [150, 200, 250])  # constant network + a growing buffer
    for method in ("finetune", "ewc"):
        np.testing.assert_array_equal(cost.model_size_curve(method, PARAMS, 2), [100, 100])
