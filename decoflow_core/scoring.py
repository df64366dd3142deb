"""Anomaly maps and image scores from per-patch anomaly scores (Sec. 3.9, Eq. 22)."""
import math

import torch
import torch.nn.functional as F


def gaussian_blur(images, sigma):
    """Separable Gaussian blur of (B, H, W) maps; kernel truncated at 4 sigma, edges replicated."""
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = images[:, None]  # (B, 1, H, W)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def anomaly_map(patch_scores, size, sigma=4.0):
    """Pixel anomaly map: bilinear upsampling of (B, H, W) patch scores to (B, size, size), then
    Gaussian smoothing with `sigma` pixels (sigma <= 0 skips it)."""
    maps = F.interpolate(patch_scores[:, None], size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma) if sigma > 0 else maps


def image_score(patch_scores, mode="topk", k=3):
    """Image-level score (B,) from (B, H, W) patch scores: mean of the k highest, max, or mean."""
    flat = patch_scores.reshape(patch_scores.shape[0], -1)
    if mode == "topk":
        return torch.topk(flat, min(k, flat.shape[1]), dim=1).values.mean(dim=1)
    if mode == "max":
        return flat.max(dim=1).values
    if mode == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"image_score mode must be 'topk', 'max' or 'mean', got {mode!r}")
