"""Synthetic defects used as a validation score (select --criterion synthetic)."""
import numpy as np
import pytest

from decoflow_core.datasets.synthetic import paste_defect, synthetic_defects


def _images(n=3, size=64):
    rng = np.random.default_rng(0)
    return [np.full((size, size, 3), 40 * (i + 1), np.uint8) + rng.integers(0, 5, (size, size, 3), dtype=np.uint8)
            for i in range(n)]


def test_a_rectangle_covers_a_few_percent_of_the_image_and_a_scar_less():
    image, donor = _images(2, size=128)
    rng = np.random.default_rng(1)
    rect_share, scar_share = [], []
    for _ in range(20):
        rect_share.append((paste_defect(image, donor, rng, scar=False) != image).any(axis=2).mean())
        scar_share.append((paste_defect(image, donor, rng, scar=True) != image).any(axis=2).mean())
    assert 0.01 < min(rect_share) and max(rect_share) <= 0.11  # 2-10% of the area (+- the jitter)
    assert 0.0 < min(scar_share) and max(scar_share) < 0.03 and np.mean(scar_share) < np.mean(rect_share)


def test_two_defects_per_image_same_shape_and_seeded():
    images = _images()
    out = synthetic_defects(images, seed=5)
    assert len(out) == 2 * len(images)
    assert all(o.shape == images[0].shape and o.dtype == np.uint8 for o in out)
    assert all((o != images[i // 2]).any() for i, o in enumerate(out))  # every copy was changed
    assert all((a == b).all() for a, b in zip(out, synthetic_defects(images, seed=5)))
    assert any((a != b).any() for a, b in zip(out, synthetic_defects(images, seed=6)))
    assert all((o == images[i // 2]).any(axis=2).mean() > 0.5 for i, o in enumerate(out))  # mostly the original


def test_one_image_cannot_donate_to_itself():
    with pytest.raises(ValueError, match="at least two"):
        synthetic_defects(_images(1), seed=0)
