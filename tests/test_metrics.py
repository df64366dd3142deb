import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from decoflow_core.metrics import (
    aupro,
    backward_transfer,
    forgetting,
    image_ap,
    image_auroc,
    image_auroc_by_type,
    pixel_auroc_ap,
    pixel_metrics,
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


def test_image_ap_by_hand_and_one_class_nan():
    # descending: 0.9 (defect) R=1/2 P=1 ; 0.5 (good) R unchanged ; 0.4 (defect) R=1 P=2/3
    assert image_ap([0, 1, 1, 0], [0.1, 0.9, 0.4, 0.5]) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3)
    # a tie is one threshold: 0.5 takes a defect and a good at once (R=1/2 P=1/2), then 0.2 (R=1 P=2/3)
    assert image_ap([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(1 / 2 * 1 / 2 + 1 / 2 * 2 / 3)
    assert image_ap([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert math.isnan(image_ap([0, 0], [0.1, 0.2]))
    assert math.isnan(image_ap([1, 1], [0.1, 0.2]))


def test_image_ap_equals_sklearn_with_ties():
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(1)
    for _ in range(5):
        labels = rng.random(40) < 0.4
        scores = np.round(rng.normal(size=40) + labels, 1)  # rounding makes ties
        assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), rel=1e-12)


def slow_aupro(masks, maps, fpr_limit=0.3):
    """Reference: every distinct score as a threshold, PRO and FPR counted directly."""
    regions = []  # one (N, H, W) bool array per connected region
    for image, mask in enumerate(masks):  # each image labelled on its own, 8-connectivity
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for i in range(1, n + 1):
            region = np.zeros_like(masks)
            region[image] = labelled == i
            regions.append(region)
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        found = maps >= t  # = {map > t'} for t' just below t
        pro = np.mean([(found & r).sum() / r.sum() for r in regions])
        points.append(((found & normal).sum() / normal.sum(), pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # clip the last segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def two_regions_case():
    """1 x 2 x 7 image: region A = 1 pixel, region B = 3 pixels, 10 defect-free pixels."""
    masks = np.zeros((1, 2, 7), bool)
    masks[0, 0, 0] = True      # A
    masks[0, 0, 3:6] = True    # B, two columns away from A: a separate region
    maps = np.full((1, 2, 7), 0.1)   # 7 defect-free pixels at 0.1
    maps[0, 0, 3:5] = 0.9            # 2 of B's 3 pixels
    maps[0, 0, 5] = 0.5              # B's third pixel
    maps[0, 0, 0] = 0.4              # A, tied with two defect-free pixels
    maps[0, 0, 1:3] = 0.4
    maps[0, 0, 6] = 0.7              # one defect-free pixel
    return masks, maps


def test_aupro_by_hand_two_regions_of_different_sizes():
    masks, maps = two_regions_case()
    # threshold:  0.9 -> FPR 0, PRO (0 + 2/3)/2 = 1/3 ; 0.7 -> FPR 1/10, PRO 1/3 ;
    # 0.5 -> FPR 1/10, PRO (0 + 1)/2 = 1/2 ; 0.4 (A and two defect-free pixels) -> FPR 3/10, PRO 1 ;
    # 0.1 -> FPR 1, PRO 1
    # up to 0.3: 0.1 * 1/3 + 0.2 * (1/2 + 1)/2 = 11/60, / 0.3 = 11/18
    assert aupro(masks, maps) == pytest.approx(11 / 18, rel=1e-12)
    # up to 0.2: PRO(0.2) interpolated = 1/2 + 1/2 * (0.1/0.2) = 3/4 ;
    # 0.1 * 1/3 + 0.1 * (1/2 + 3/4)/2 = 23/240, / 0.2 = 23/48
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(23 / 48, rel=1e-12)
    # up to 1: 11/60 + 0.7 * 1
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(11 / 60 + 0.7, rel=1e-12)


def test_aupro_perfect_map_and_regions_counted_per_image_with_8_connectivity():
    masks = np.zeros((3, 5, 5), bool)
    masks[0, :2, :2] = True
    masks[2, 3:, 1:4] = True
    assert aupro(masks, masks + 0.01) == pytest.approx(1.0, rel=1e-12)
    # (0,0) touches (1,1) diagonally, which touches (1,2): one region of 3 pixels (PRO 1/3 once
    # (0,0) is found), not two (4-connectivity would give (1 + 0)/2 = 1/2)
    masks = np.zeros((2, 3, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((2, 3, 4))
    maps[0, 0, 0] = 1.0
    maps[1, 0, 0] = 0.5  # one defect-free pixel of the 21: FPR 1/21, then the rest of the region
    maps[0, 1, 1] = maps[0, 1, 2] = 0.2
    # FPR 0 -> PRO 1/3 until 1/21, then PRO 1: (1/21 * 1/3 + (0.3 - 1/21) * 1) / 0.3
    assert aupro(masks, maps) == pytest.approx((1 / 63 + 0.3 - 1 / 21) / 0.3, rel=1e-12)
    # the same pixel in two images: two regions, not one 3-D region of two pixels
    masks = np.zeros((2, 3, 3), bool)
    masks[:, 1, 1] = True
    masks[1, 1, 2] = True  # region sizes 1 and 2; a 3-D region would be one of 3 pixels
    maps = np.zeros((2, 3, 3))
    maps[0, 1, 1] = 1.0  # region 1 found first: PRO (1 + 0)/2 = 1/2 (merged: 1/3)
    maps[0, 0, 0] = 0.5  # one defect-free pixel of 15
    maps[1, 1, 1] = maps[1, 1, 2] = 0.3
    assert aupro(masks, maps) == pytest.approx((1 / 15 * 1 / 2 + (0.3 - 1 / 15)) / 0.3, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_equals_a_slow_threshold_loop_with_ties(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 9, 8)) < 0.25  # many small regions, some touching only diagonally
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1)  # rounding makes many ties
    assert abs(aupro(masks, maps, fpr_limit) - slow_aupro(masks, maps, fpr_limit)) < 1e-9


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_metrics_sort_once_and_equal_the_separate_metrics_and_sklearn(dtype):
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(3)
    masks = rng.random((4, 16, 16)) < 0.1
    maps = np.round(rng.normal(size=masks.shape) + masks, 2).astype(dtype)  # ties between the two classes
    got = pixel_metrics(masks, maps)
    assert (got["pixel_auroc"], got["pixel_ap"]) == pixel_auroc_ap(masks, maps)
    assert got["aupro"] == aupro(masks, maps) == pytest.approx(slow_aupro(masks, maps), abs=1e-9)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_aupro_ignores_the_curve_beyond_the_fpr_limit():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2:5, 2:5] = masks[1, 6:9, 1:3] = True
    maps = np.where(masks, 0.5, 0.0)
    maps[:, :, 5:] = np.where(masks[:, :, 5:], 0.5, 1.0)  # half of all defect-free pixels above every defect
    fpr_of_defects = (maps[~masks] == 1.0).mean()
    assert fpr_of_defects > 0.3
    assert aupro(masks, maps) == 0.0  # the regions appear only at FPR > 0.3
    # up to 1: PRO 0 until FPR f, then 1: (1 - f) * 1
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1 - fpr_of_defects, rel=1e-12)


def test_aupro_nan_without_defect_or_defect_free_pixels_and_bad_limit():
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert math.isnan(aupro(np.zeros((2, 4, 4), bool), maps))
    assert math.isnan(aupro(np.ones((2, 4, 4), bool), maps))
    with pytest.raises(ValueError):
        aupro(np.eye(4, dtype=bool)[None], maps[:1], fpr_limit=0.0)
