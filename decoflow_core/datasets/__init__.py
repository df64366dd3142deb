"""Data the kit makes itself: the embedded benchmark, converters of published data sets into the
MVTec layout, and synthetic defects for validation."""
from __future__ import annotations

from pathlib import Path

from .embedded import build_embedded

REPO = Path(__file__).resolve().parents[2]
BUILT = ("embedded", "boards")  # the data the kit makes itself, under data/<name>


def built_dir(name: str) -> Path:
    """Where the kit builds its own data ``name`` (one of BUILT)."""
    return REPO / "data" / name


def resolve_data(spec: str) -> Path:
    """``embedded`` (the kit's benchmark) and ``boards`` (its four look-alike board designs) mean
    data/<spec>, built on first use; anything else is a path."""
    if spec not in BUILT:
        return Path(spec)
    return Path(build_embedded(built_dir(spec), seed=0, family=spec))
