"""Data the kit makes itself: the embedded benchmark, converters of published data sets into the
MVTec layout, and synthetic defects for validation."""
from __future__ import annotations

from pathlib import Path

from .embedded import build_embedded

REPO = Path(__file__).resolve().parents[2]
EMBEDDED_DIR = REPO / "data" / "embedded"


def resolve_data(spec: str) -> Path:
    """``embedded`` means the kit's own benchmark under data/, built on first use; anything else a path."""
    if spec != "embedded":
        return Path(spec)
    return Path(build_embedded(EMBEDDED_DIR, seed=0))
