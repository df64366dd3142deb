"""The feature extractor seen from outside (Sec. 3.4, notebook 01): its stages, its cost with and
without the cache, and how far apart the tasks' pooled features lie."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ..features import extract_features


def backbone_table(extractor, image_size: int) -> pd.DataFrame:
    """The backbone stages the patch features come from: channels, stride, map size, pooled grid."""
    info = extractor.body.feature_info
    return pd.DataFrame({"stage": info.module_name(), "channels": info.channels(), "stride": info.reduction(),
                         "map size": [f"{image_size // r}x{image_size // r}" for r in info.reduction()],
                         "pooled to": f"{extractor.grid}x{extractor.grid}"})


def time_feature_extraction(extractor, paths, image_size: int, cache_dir) -> dict:
    """Seconds to get features of ``paths``: without a cache, on the run that writes it, and cached."""
    seconds = {}
    for label, cache in (("no cache", None), ("first run, writes cache", cache_dir), ("cached", cache_dir)):
        start = time.perf_counter()
        extract_features(extractor, paths, image_size=image_size, cache_dir=cache, desc=label)
        seconds[label] = time.perf_counter() - start
    return seconds


def task_separation(pooled: dict) -> pd.DataFrame:
    """Pairs of tasks by how far apart their pooled features are (the router's view, Sec. 3.8):
    centroid distance divided by the mean RMS spread of the two tasks; below ~1 they overlap."""
    names = list(pooled)
    feats = {t: np.asarray(x, dtype=float) for t, x in pooled.items()}
    centre = {t: x.mean(axis=0) for t, x in feats.items()}
    spread = {t: np.sqrt(((x - centre[t]) ** 2).sum(axis=1).mean()) for t, x in feats.items()}
    rows = [{"task a": a, "task b": b,
             "separation": float(np.linalg.norm(centre[a] - centre[b]) / ((spread[a] + spread[b]) / 2))}
            for i, a in enumerate(names) for b in names[i + 1:]]
    return pd.DataFrame(rows).sort_values("separation").reset_index(drop=True)
