"""Atomic writes: a crash never leaves a half-written result behind."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(value):
    """NaN has no JSON spelling: missing values are written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def write_json(path, data) -> Path:
    text = json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n"
    return _atomic(path, lambda h: h.write(text.encode()))


def write_text(path, text: str) -> Path:
    return _atomic(path, lambda h: h.write(text.encode()))


def write_torch(path, obj) -> Path:
    return _atomic(path, lambda h: torch.save(obj, h))


def read_json(path):
    with open(path) as handle:
        return json.load(handle)
