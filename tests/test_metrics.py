import math

import numpy as np
import pytest

from decoflow_core.metrics import (
    backward_transfer,
    forgetting,
    image_auroc,
    image_auroc_by_type,
    pixel_auroc_ap,
)

NAN = float("nan")


def test_forgetting_and_bwt_by_hand():
    # after task 0: 0.9 ; after task 1: 0.7 on t0 ; after task 2: 0.5 on t0, 0.6 on t1
    R = [[0.9, NAN, NAN],
         [0.7, 0.8, NAN],
         [0.5, 0.6, 0.95]]
    # FM: task0 best in rows 0..1 = 0.9 -> 0.9-0.5 = 0.4 ; task1 best in row 1 = 0.8 -> 0.8-0.6 = 0.2
    assert math.isclose(forgetting(R), 0.3)
    # BWT: (0.5-0.9 + 0.6-0.8)/2 = -0.3
    assert math.isclose(backward_transfer(R), -0.3)


def test_forgetting_uses_best_earlier_score_not_diagonal():
    R = [[0.6, NAN], [0.9, 0.7]]  # task 0 improved after task 1: negative forgetting, positive transfer
    assert math.isclose(forgetting(R), -0.3)
    assert math.isclose(backward_transfer(R), 0.3)
    R3 = [[0.6, NAN, NAN], [0.9, 0.7, NAN], [0.8, 0.7, 0.5]]
    assert math.isclose(forgetting(R3), (0.1 + 0.0) / 2)


def test_constant_rows_give_zero_forgetting_and_single_task_nan():
    R = np.tril(np.tile([0.8, 0.9, 0.7], (3, 1)))
    assert forgetting(R) == 0.0 and backward_transfer(R) == 0.0
    assert math.isnan(forgetting([[0.9]]))


def test_auroc_and_pixel_metrics():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert math.isnan(image_auroc([0, 0], [0.1, 0.2]))
    masks = np.zeros((2, 4, 4), bool)
    masks[1, :2, :2] = True
    maps = masks.astype(float) + 0.01
    auroc, ap = pixel_auroc_ap(masks, maps)
    assert auroc == 1.0 and ap == 1.0
    assert all(math.isnan(v) for v in pixel_auroc_ap(np.zeros((2, 4, 4), bool), maps))


def test_pixel_metrics_equal_sklearn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(0)
    masks = rng.random((5, 16, 16)) < 0.1
    maps = np.round(rng.normal(size=(5, 16, 16)) + masks, 1)  # rounding makes many ties
    auroc, ap = pixel_auroc_ap(masks, maps)
    assert math.isclose(auroc, roc_auc_score(masks.ravel(), maps.ravel()), rel_tol=1e-12)
    assert math.isclose(ap, average_precision_score(masks.ravel(), maps.ravel()), rel_tol=1e-12)


def test_image_auroc_by_type_scores_each_defect_type_against_the_good_images_alone():
    types = ["good", "good", "crack", "crack", "hole", "good"]
    scores = [0.1, 0.5, 0.9, 0.3, 0.6, 0.2]
    by_type = image_auroc_by_type(types, scores)
    assert list(by_type) == ["crack", "hole"]
    # crack 0.9 beats all three good scores, 0.3 beats 0.1 and 0.2: 5 of 6 pairs
    assert by_type["crack"] == pytest.approx(5 / 6)
    assert by_type["hole"] == pytest.approx(1.0)  # 0.6 above 0.1, 0.5, 0.2
    assert image_auroc_by_type(["good", "good"], [0.1, 0.2]) == {}
