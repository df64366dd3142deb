"""Patch features of image files, cached on disk so a second run skips the backbone.

The cache key covers everything the features depend on: backbone, weight source, image size and
resampling, grid, aggregation, feature dimension, positional encoding and its order, and the bytes of
every image file (so a rebuilt data tree with identical files still hits, and a changed file misses).
An entry holds every pooled router feature, so one serves each ``router_feature``.
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
    extra = (resize, extractor.aggregation, extractor.pe_order)
    if extra != ("bilinear", "pool", "rows_first"):
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
    """{"patch": (N, D, g, g) float32, "pooled": (N, G) float32 (the extractor's ``router_feature``),
    ``pooled_key(name)``: (N, G) for every router feature, "cached": bool} for ``paths`` in order."""
    paths = [Path(p) for p in paths]
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{extractor.backbone_name}-{cache_key(extractor, paths, image_size, resize)}.pt"
        if cache_file.exists():
            stored = torch.load(cache_file, map_location="cpu", weights_only=True)
            if "pooled_by_feature" in stored:  # an entry of an earlier format is extracted again
                return _result(extractor, stored["patch"].float(), stored["pooled_by_feature"], cached=True)
    patch, pooled = _extract(extractor, lambda i, j: load_batch(paths[i:j], image_size, resize), len(paths),
                             batch_size=batch_size, desc=desc, device=device)
    if cache_file is not None:
        # half precision halves the cache; the first run uses the same rounded values as cached runs
        patch = patch.half()
        write_torch(cache_file, {"patch": patch, "pooled_by_feature": pooled, "paths": [str(p) for p in paths]})
        patch = patch.float()
    return _result(extractor, patch, pooled, cached=False)


def pooled_key(router_feature: str) -> str:
    """The key of one router feature's pooled values in a features dict, e.g. ``pooled_backbone``."""
    return f"pooled_{router_feature}"


def _result(extractor: FeatureExtractor, patch: torch.Tensor, pooled: dict, *, cached: bool) -> dict:
    return {"patch": patch, "pooled": pooled[extractor.router_feature],
            **{pooled_key(name): values for name, values in pooled.items()}, "cached": cached}


def array_features(extractor: FeatureExtractor, images: list[np.ndarray], *, batch_size: int = 32,
                   device: str = "cpu") -> dict:
    """Like ``extract_features`` for in-memory (S, S, 3) uint8 images (e.g. synthetic defects); not cached."""
    to_batch = lambda i, j: torch.from_numpy(np.stack(images[i:j])).permute(0, 3, 1, 2).float()
    patch, pooled = _extract(extractor, to_batch, len(images), batch_size=batch_size, desc="synthetic", device=device)
    return _result(extractor, patch, pooled, cached=False)


def _extract(extractor: FeatureExtractor, batch_of, n: int, *, batch_size: int, desc: str,
             device: str) -> tuple[torch.Tensor, dict]:
    """Run the extractor over images ``batch_of(i, j)`` for i, j stepping through range(n): the patch
    features and {router feature: pooled values}."""
    extractor = extractor.to(device)
    patches, pooled = [], {}
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        patch, pools = extractor.all_features(batch_of(start, start + batch_size).to(device))
        patches.append(patch.cpu())
        for name, values in pools.items():
            pooled.setdefault(name, []).append(values.cpu())
    return torch.cat(patches), {name: torch.cat(values) for name, values in pooled.items()}
