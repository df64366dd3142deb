"""Detection metrics and the continual-learning summaries of the R[i][j] matrices.

Detection metrics (the defect class is the positive one; NaN when a class is missing):

* image_auroc, image_ap: AUROC and average precision of the image scores (sklearn's roc_auc_score
  and average_precision_score).
* pixel_auroc_ap: AUROC and AP over every pixel of every test image (``pixel_metrics``: both and
  AUPRO from one sort of the pixels).
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


class PixelScores:
    """The pixels of a test set split by their truth and sorted once, for every pixel metric below.

    Defect-free scores are sorted on their own (a plain sort of millions of values), defect pixels by an
    argsort of their far smaller number; every count of scores above a threshold is then a binary search,
    and tied scores form one threshold. float32 maps are kept exact (any other dtype becomes float64).
    """

    def __init__(self, masks, maps):
        truth = np.asarray(masks, dtype=bool)
        scores = np.asarray(maps)
        scores = scores if scores.dtype == np.float32 else scores.astype(np.float64)
        if truth.shape != scores.shape:
            raise ValueError(f"masks and maps must have one shape, got {truth.shape} and {scores.shape}")
        self.truth = truth
        self.normal = np.sort(scores[~truth])  # ascending
        defect = scores[truth]
        self.defect_order = np.argsort(defect, kind="stable")
        self.defect = defect[self.defect_order]  # ascending
        self.defined = 0 < len(self.defect) and 0 < len(self.normal)

    def normal_at_least(self, t):
        """Defect-free pixels with a score >= t (t may be an array)."""
        return len(self.normal) - np.searchsorted(self.normal, t, side="left")

    def normal_above(self, t):
        return len(self.normal) - np.searchsorted(self.normal, t, side="right")


def pixel_auroc_ap(masks, maps, pixels: PixelScores | None = None) -> tuple[float, float]:
    """Pixel AUROC and pixel AP over every pixel of every test image; masks (N, S, S) bool.

    AUROC: the share of (defect, defect-free) pixel pairs in which the defect pixel scores higher, ties
    counting one half; AP: the sum over the distinct defect scores t (descending) of the share of defect
    pixels at t times the precision of {score >= t}. Both equal sklearn's roc_auc_score and
    average_precision_score (tied scores one threshold) up to float rounding.
    """
    pixels = pixels or PixelScores(masks, maps)
    if not pixels.defined:
        return float("nan"), float("nan")
    defect, n_defect, n_normal = pixels.defect, len(pixels.defect), len(pixels.normal)
    below = np.searchsorted(pixels.normal, defect, side="left")
    tied = np.searchsorted(pixels.normal, defect, side="right") - below
    auroc = float((below.sum(dtype=np.int64) + 0.5 * tied.sum(dtype=np.int64)) / (n_defect * n_normal))
    values, first = np.unique(defect, return_index=True)  # ascending distinct defect scores
    count = np.diff(np.r_[first, n_defect])
    true_pos = n_defect - first  # defect pixels >= each value
    precision = true_pos / (true_pos + pixels.normal_at_least(values))
    ap = float(np.sum(count / n_defect * precision))
    return auroc, ap


def aupro(masks, maps, fpr_limit: float = 0.3, pixels: PixelScores | None = None) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to FPR = fpr_limit.

    masks (N, H, W) bool (True = defect), maps (N, H, W) anomaly scores. For a threshold t:

    * PRO(t) = mean over all connected defect regions (8-connectivity within an image; regions of
      all N images pooled) of |region & {map >= t}| / |region|;
    * FPR(t) = |defect-free pixels with map >= t| / |defect-free pixels| (all N images pooled).

    Every distinct score is a threshold (ties form one threshold), so the curve is the exact step
    sequence from (0, 0) to (1, 1). It is integrated over FPR in [0, fpr_limit] with the
    trapezoidal rule, PRO being interpolated linearly at FPR = fpr_limit, and divided by fpr_limit
    so that the result lies in [0, 1] (1 for a map that ranks every defect pixel above every
    defect-free one). NaN when there is no defect region or no defect-free pixel.

    PRO(t) is a sum over the defect pixels >= t of 1 / (n_regions * |their region|). FPR moves only at
    the distinct defect-free scores u: each adds the segment from (FPR, PRO) just above u to (FPR, PRO)
    at u; between them PRO rises at constant FPR, which adds no area.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if np.ndim(masks) != 3 or np.shape(masks) != np.shape(maps):
        raise ValueError(f"masks and maps must both be (N, H, W), got {np.shape(masks)} and {np.shape(maps)}")
    pixels = pixels or PixelScores(masks, maps)
    if not pixels.defined:
        return float("nan")
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = True  # 8-neighbours in the same image, never across images
    regions, n_regions = ndimage.label(pixels.truth, structure=within_image)
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    weight = (1.0 / (n_regions * sizes[1:]))[regions[pixels.truth] - 1][pixels.defect_order]  # ascending score
    weight_below = np.r_[0.0, np.cumsum(weight)]  # weight of the defect pixels under each index
    n_normal = len(pixels.normal)
    # the distinct defect-free scores, descending, as far as the first that reaches the FPR limit
    reach = pixels.normal[::-1][: min(n_normal, int(np.ceil(fpr_limit * n_normal)) + 1)]
    u = reach[np.r_[True, reach[1:] != reach[:-1]]]
    fpr_at, fpr_above = pixels.normal_at_least(u) / n_normal, pixels.normal_above(u) / n_normal
    pro_at = weight_below[-1] - weight_below[np.searchsorted(pixels.defect, u, side="left")]
    pro_above = weight_below[-1] - weight_below[np.searchsorted(pixels.defect, u, side="right")]
    k = int(np.searchsorted(fpr_at, fpr_limit, side="left"))  # the segment that reaches the limit
    area = np.sum((fpr_at[:k] - fpr_above[:k]) * (pro_at[:k] + pro_above[:k]) / 2)
    pro_limit = pro_above[k] + (pro_at[k] - pro_above[k]) * (fpr_limit - fpr_above[k]) / (fpr_at[k] - fpr_above[k])
    area += (fpr_limit - fpr_above[k]) * (pro_above[k] + pro_limit) / 2
    return float(area / fpr_limit)


def pixel_metrics(masks, maps) -> dict:
    """pixel_auroc, pixel_ap and aupro of one test set, its pixels sorted once."""
    pixels = PixelScores(masks, maps)
    auroc, ap = pixel_auroc_ap(masks, maps, pixels)
    return {"pixel_auroc": auroc, "pixel_ap": ap, "aupro": aupro(masks, maps, pixels=pixels)}


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
