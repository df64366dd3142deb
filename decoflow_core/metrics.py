"""Detection metrics and the continual-learning summaries of the R[i][j] matrices.

Detection metrics (the defect class is the positive one; NaN when a class is missing):

* image_auroc, image_ap: AUROC and average precision of the image scores (sklearn's roc_auc_score
  and average_precision_score).
* pixel_auroc_ap: AUROC and AP over every pixel of every test image.
* aupro: area under the per-region-overlap curve up to a false-positive rate of 0.3, divided by 0.3
  (the MVTec-AD definition). For a threshold t, PRO(t) is the mean over every connected defect
  region (8-connectivity, each image labelled on its own, all images pooled) of the share of the
  region's pixels with a score above t, and FPR(t) the share of all defect-free pixels above t.
  Every distinct score is a threshold; the curve runs from (0, 0) and is integrated with the
  trapezoidal rule, PRO being interpolated linearly at FPR = 0.3 exactly.

R[i][j] is a metric measured after training task i, tested on task j (defined for j <= i; NaN above
the diagonal). T is the number of tasks.

* Forgetting measure  FM  = mean over j < T-1 of ( max over i in [j, T-2] of R[i][j] ) - R[T-1][j]
* Backward transfer   BWT = mean over j < T-1 of R[T-1][j] - R[j][j]

FM measures how far each old task fell from its best earlier score (negative when it improved);
BWT < 0 means forgetting.
Both are NaN for a single task or when a task's metric is missing (e.g. no pixel masks).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score


def image_auroc(labels, scores) -> float:
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")  # AUROC needs both classes
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def image_ap(labels, scores) -> float:
    """Average precision of the image scores, defect (label 1) positive; NaN with a single class.

    Equal to sklearn's average_precision_score: sum over thresholds of (R_n - R_{n-1}) * P_n,
    tied scores forming one threshold.
    """
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")  # AP needs both classes (no positive: undefined; no negative: always 1)
    return float(average_precision_score(labels, np.asarray(scores, dtype=np.float64)))


def image_auroc_by_type(types, scores, good: str = "good") -> dict[str, float]:
    """{defect type: image AUROC of the good images against that type's images alone}."""
    types, scores = np.asarray(types), np.asarray(scores, dtype=np.float64)
    pairs = {t: (types == good) | (types == t) for t in sorted(set(types.tolist()) - {good})}
    return {t: image_auroc(types[keep] == t, scores[keep]) for t, keep in pairs.items()}


def pixel_auroc_ap(masks, maps) -> tuple[float, float]:
    """Pixel AUROC and pixel AP over every pixel of every test image; masks (N, S, S) bool.

    Both come from one sort of the scores (millions of pixels); tied scores form one threshold,
    so the values equal sklearn's roc_auc_score and average_precision_score exactly.
    """
    truth = np.asarray(masks, dtype=bool).ravel()
    if truth.all() or not truth.any():
        return float("nan"), float("nan")
    scores = np.asarray(maps, dtype=np.float32).ravel()
    order = np.argsort(-scores)  # any order within a tie: each threshold ends after the whole tie
    ends = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]  # last index of each threshold
    tp = np.cumsum(truth[order], dtype=np.int64)[ends]
    fp = ends + 1 - tp
    tpr, fpr = np.r_[0, tp] / tp[-1], np.r_[0, fp] / fp[-1]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids
    ap = float(np.sum(np.diff(np.r_[0, tp]) / tp[-1] * tp / (tp + fp)))
    return auroc, ap


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to FPR = fpr_limit.

    masks (N, H, W) bool (True = defect), maps (N, H, W) anomaly scores. For a threshold t:

    * PRO(t) = mean over all connected defect regions (8-connectivity within an image; regions of
      all N images pooled) of |region & {map > t}| / |region|;
    * FPR(t) = |defect-free pixels with map > t| / |defect-free pixels| (all N images pooled).

    Every distinct score is a threshold (ties form one threshold), so the curve is the exact step
    sequence from (0, 0) to (1, 1). It is integrated over FPR in [0, fpr_limit] with the
    trapezoidal rule, PRO being interpolated linearly at FPR = fpr_limit, and divided by fpr_limit
    so that the result lies in [0, 1] (1 for a map that ranks every defect pixel above every
    defect-free one). NaN when there is no defect region or no defect-free pixel.

    One sort of all pixels: PRO(t) = sum over the pixels above t of 1 / (n_regions * |their region|),
    i.e. the per-region cumulative overlaps weighted and summed, read at the end of each tie.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    truth = np.asarray(masks, dtype=bool)
    scores = np.asarray(maps, dtype=np.float64)
    if truth.ndim != 3 or truth.shape != scores.shape:
        raise ValueError(f"masks and maps must both be (N, H, W), got {truth.shape} and {scores.shape}")
    n_normal = truth.size - np.count_nonzero(truth)
    if n_normal == 0 or n_normal == truth.size:
        return float("nan")
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = True  # 8-neighbours in the same image, never across images
    regions, n_regions = ndimage.label(truth, structure=within_image)
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    pixel_weight = np.r_[0.0, 1.0 / (n_regions * sizes[1:])]  # label 0 (defect-free) weighs nothing
    scores = scores.ravel()
    order = np.argsort(-scores)  # any order within a tie: each threshold ends after the whole tie
    ends = np.r_[np.flatnonzero(np.diff(scores[order])), scores.size - 1]  # last index of each threshold
    pro = np.r_[0.0, np.cumsum(pixel_weight[regions.ravel()[order]])[ends]]
    fpr = np.r_[0, np.cumsum(~truth.ravel()[order], dtype=np.int64)[ends]] / n_normal
    k = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first point with FPR >= fpr_limit (k >= 1)
    pro_at_limit = pro[k - 1] + (pro[k] - pro[k - 1]) * (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
    x, y = np.r_[fpr[:k], fpr_limit], np.r_[pro[:k], pro_at_limit]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def forgetting(R) -> float:
    """FM of a T x T matrix R (see module docstring)."""
    R = np.asarray(R, dtype=np.float64)
    T = R.shape[0]
    if T < 2:
        return float("nan")
    drops = [np.max(R[j:T - 1, j]) - R[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def backward_transfer(R) -> float:
    """BWT of a T x T matrix R (see module docstring)."""
    R = np.asarray(R, dtype=np.float64)
    T = R.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))
