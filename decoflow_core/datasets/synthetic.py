"""Synthetic defects on held-out good images: a validation score for choices NLL cannot compare.

Validation NLL ranks settings that model the same flow input (learning rates, widths). It cannot rank
settings that change the input itself (e.g. TSA's standardization), and it says nothing about
detection. For those, ``select --criterion synthetic`` uses the AUROC of held-out train/good images
against synthetic defects made from them -- never a test image.

Two CutPaste-style defects (Li et al., CVPR 2021) per held-out image, with a fixed recipe that is not
tuned on any result: a rectangle (2-10% of the image, aspect 0.3-3.3) and a thin scar (1-3% of the
side wide, 10-25% long, rotated by up to 45 degrees), each cut from another held-out image, shifted in
brightness by up to +-25 grey levels and pasted at a random place.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def paste_defect(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, *, scar: bool) -> np.ndarray:
    """``image`` (S, S, 3) uint8 with a piece of ``donor`` pasted in: a rectangle, or a rotated scar."""
    size = image.shape[0]
    if scar:
        height, width = size * rng.uniform(0.10, 0.25), size * rng.uniform(0.01, 0.03)
    else:
        area, aspect = size * size * rng.uniform(0.02, 0.10), np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        height, width = np.sqrt(area * aspect), np.sqrt(area / aspect)
    height, width = (int(np.clip(v, 2, size - 1)) for v in (height, width))
    top, left = rng.integers(0, size - height), rng.integers(0, size - width)
    piece = donor[top:top + height, left:left + width].astype(np.float64) + rng.uniform(-25, 25)
    piece = Image.fromarray(np.clip(piece, 0, 255).astype(np.uint8)).convert("RGBA")
    if scar:
        piece = piece.rotate(rng.uniform(-45, 45), expand=True, resample=Image.Resampling.BILINEAR)
    top, left = rng.integers(0, max(1, size - piece.height)), rng.integers(0, max(1, size - piece.width))
    out = Image.fromarray(image).convert("RGBA")
    out.alpha_composite(piece, (int(left), int(top)))
    return np.asarray(out.convert("RGB"))


def synthetic_defects(images: list[np.ndarray], *, seed: int) -> list[np.ndarray]:
    """Two defective copies (rectangle, scar) of every image, each piece cut from the next image."""
    if len(images) < 2:
        raise ValueError("synthetic defects need at least two held-out images (one donates the piece)")
    rng = np.random.default_rng(seed)
    out = []
    for i, image in enumerate(images):
        donor = images[(i + 1) % len(images)]
        out += [paste_defect(image, donor, rng, scar=False), paste_defect(image, donor, rng, scar=True)]
    return out
