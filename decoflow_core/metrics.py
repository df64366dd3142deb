"""Detection metrics and the continual-learning summaries of the R[i][j] matrices.

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
from sklearn.metrics import roc_auc_score


def image_auroc(labels, scores) -> float:
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")  # AUROC needs both classes
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


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
