"""Patch features of image files, cached on disk so a second run skips the backbone.

The cache key covers everything the features depend on: backbone, weight source, image size and
resampling, grid, aggregation, feature dimension, router feature, positional encoding and its order, and the bytes of
every image file (so a rebuilt data tree
with identical files still hits, and a changed file misses).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import FeatureExtractor
from .data import load_image
from .files import write_torch


def cache_key(extractor: FeatureExtractor, paths: list[Path], image_size: int, resize: str = "bilinear") -> str:
    digest = hashlib.sha256()
    settings = (extractor.backbone_name, extractor.weight_source, image_size, extractor.grid, extractor.dim,
                float(extractor.pos.abs().sum()))
    extra = (resize, extractor.aggregation, extractor.router_feature, extractor.pe_order)
    if extra != ("bilinear", "pool", "backbone", "rows_first"):
        settings += extra  # the defaults keep the keys of caches written before these settings existed
    digest.update(repr(settings).encode())
    for path in paths:
        digest.update(str(Path(path).name).encode())
        digest.update(hashlib.sha1(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:24]


def load_batch(paths: list[Path], image_size: int, resize: str = "bilinear") -> torch.Tensor:
    """(B, 3, S, S) float on the 0..255 scale."""
    images = np.stack([load_image(p, image_size, resize) for p in paths])  # (B, S, S, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def extract_features(extractor: FeatureExtractor, paths: list[Path], *, image_size: int = 224,
                     resize: str = "bilinear", cache_dir: str | Path | None = None, batch_size: int = 32,
                     desc: str = "features", device: str = "cpu") -> dict:
    """{"patch": (N, D, g, g) float32, "pooled": (N, G) float32, "cached": bool} for ``paths`` in order."""
    paths = [Path(p) for p in paths]
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{extractor.backbone_name}-{cache_key(extractor, paths, image_size, resize)}.pt"
        if cache_file.exists():
            stored = torch.load(cache_file, map_location="cpu", weights_only=True)
            return {"patch": stored["patch"].float(), "pooled": stored["pooled"], "cached": True}
    result = _extract(extractor, lambda i, j: load_batch(paths[i:j], image_size, resize), len(paths),
                      batch_size=batch_size, desc=desc, device=device)
    if cache_file is not None:
        # half precision halves the cache; the first run uses the same rounded values as cached runs
        result["patch"] = result["patch"].half()
        write_torch(cache_file, {"patch": result["patch"], "pooled": result["pooled"],
                                 "paths": [str(p) for p in paths]})
        result["patch"] = result["patch"].float()
    return result


def array_features(extractor: FeatureExtractor, images: list[np.ndarray], *, batch_size: int = 32,
                   device: str = "cpu") -> dict:
    """Like ``extract_features`` for in-memory (S, S, 3) uint8 images (e.g. synthetic defects); not cached."""
    to_batch = lambda i, j: torch.from_numpy(np.stack(images[i:j])).permute(0, 3, 1, 2).float()
    return _extract(extractor, to_batch, len(images), batch_size=batch_size, desc="synthetic", device=device)


def _extract(extractor: FeatureExtractor, batch_of, n: int, *, batch_size: int, desc: str, device: str) -> dict:
    """Run the extractor over images ``batch_of(i, j)`` for i, j stepping through range(n)."""
    extractor = extractor.to(device)
    patches, pooled = [], []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        patch, pool = extractor(batch_of(start, start + batch_size).to(device))
        patches.append(patch.cpu())
        pooled.append(pool.cpu())
    return {"patch": torch.cat(patches), "pooled": torch.cat(pooled), "cached": False}
