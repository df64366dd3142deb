"""Anomaly maps and image scores from per-patch anomaly scores (Sec. 3.9, Eq. 22)."""
import math

import torch
import torch.nn.functional as F

PADDINGS = ("replicate", "reflect")
UPSAMPLING = ("bilinear", "bicubic")


def _border_index(n, radius, padding, device):
    """Indices of a length-n axis padded by ``radius`` on both sides: ``replicate`` repeats the edge
    (a a | a b c | c c), ``reflect`` mirrors it with the edge repeated (b a | a b c | c b), as
    scipy.ndimage's 'reflect'."""
    index = torch.arange(-radius, n + radius, device=device)
    if padding == "replicate":
        return index.clamp(0, n - 1)
    if padding == "reflect":
        index = index.remainder(2 * n)
        return torch.where(index >= n, 2 * n - 1 - index, index)
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def _blur_matrix(n, kernel, padding, device):
    """(n, n) matrix M with (M @ v) = v padded by ``padding`` and convolved with ``kernel``: row i sums
    kernel[k] * v[border(i + k)], so the padding and the 1-D convolution become one matrix product."""
    radius = (len(kernel) - 1) // 2
    source = _border_index(n, radius, padding, device).unfold(0, len(kernel), 1)  # (n, 2r+1) input index
    matrix = torch.zeros(n, n, dtype=kernel.dtype, device=device)
    return matrix.scatter_add_(1, source, kernel.expand(n, -1))


def gaussian_blur(images, sigma, padding="replicate"):
    """Separable Gaussian blur of (B, H, W) maps; kernel truncated at 4 sigma, edges padded by
    ``padding`` (replicate, or reflect as scipy.ndimage.gaussian_filter's default). Each axis is one
    matrix product (a single-channel convolution is far slower on CPU)."""
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    _, height, width = images.shape
    rows = _blur_matrix(height, kernel, padding, images.device)
    columns = _blur_matrix(width, kernel, padding, images.device)
    return rows @ images @ columns.T


def anomaly_map(patch_scores, size, sigma=4.0, *, upsample="bilinear", padding="replicate"):
    """Pixel anomaly map: ``upsample`` (bilinear or bicubic) of (B, H, W) patch scores to (B, size, size),
    then Gaussian smoothing with `sigma` pixels (sigma <= 0 skips it) and ``padding`` at the border."""
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")
    maps = F.interpolate(patch_scores[:, None], size=(size, size), mode=upsample, align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma, padding) if sigma > 0 else maps


def pixel_maps(patch_scores, config, size=None):
    """The anomaly maps a config asks for at ``size`` (default its eval_size); ``map_sigma`` is in
    pixels at ``image_size`` and scales with the map."""
    size = size or config.eval_size
    return anomaly_map(patch_scores, size, sigma=config.map_sigma * size / config.image_size,
                       upsample=config.map_upsample, padding=config.map_padding)


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
