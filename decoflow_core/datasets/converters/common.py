"""What every converter shares: a checked plan of the files to write, and writing it through a hidden
staging folder, so that an interrupted conversion leaves no half-converted category behind."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...data import (
    MASK_SUFFIX,
    DataError,
    load_mask,
    same_aspect,
    task_name_problem,
    verified_size,
)


class Job(NamedTuple):
    source: Path
    destination: Path  # relative to the output root: <category>/<folder>/<file>
    mask_of: Path | None  # for a mask, the source image it belongs to; None for an image, copied as is


def mask_destination(image_destination: Path) -> Path:
    """<category>/test/<defect>/<stem>.<ext> -> <category>/ground_truth/<defect>/<stem>_mask.png."""
    category, _, defect = image_destination.parts[:3]
    return Path(category, "ground_truth", defect, f"{image_destination.stem}{MASK_SUFFIX}.png")


class Plan:
    """The files of one conversion, checked as they are added: each source exists, and no two files
    land on the same stem in one folder (the kit pairs images and masks by stem)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self._taken: dict[Path, Path] = {}

    def add(self, source: Path, destination: Path, mask_of: Path | None = None,
            named_by: str = "the data set's layout") -> None:
        if not source.is_file():
            raise DataError(f"{source}: not found. Expected this {'mask' if mask_of else 'image'} "
                            f"({'of ' + str(mask_of) + ', ' if mask_of else ''}named by {named_by}).")
        stem = destination.parent / destination.stem
        if stem in self._taken:
            raise DataError(f"{source} ({named_by}) and {self._taken[stem]} would both be written as {stem}.*. "
                            "Expected unique file names (stems) per category and folder.")
        self._taken[stem] = source
        self.jobs.append(Job(source, destination, mask_of))


def write_binary_mask(source: Path, destination: Path, image: Path) -> None:
    """A mask as the kit reads it (data.load_mask: any nonzero pixel is a defect; label ids alike),
    written as a 0/255 PNG; its image must have the same size or aspect ratio."""
    mask = load_mask(source, None)
    width, height = verified_size(image)
    if mask.shape != (height, width) and not same_aspect(mask.shape[::-1], (width, height)):
        raise DataError(f"{source}: mask is {mask.shape[1]}x{mask.shape[0]} but {image} is {width}x{height}. "
                        "Expected the same size (or aspect ratio).")
    Image.fromarray(mask.astype(np.uint8) * 255).save(destination)


def convert(src: str | Path, out: str | Path, key: str, title: str, plan: Callable[[Path], list[Job]],
            progress: bool) -> list[str]:
    """Check `src` and `out`, plan every file with `plan(src)`, write them into a hidden sibling of
    `out` and rename each category into place at the end. Returns the categories, sorted."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"{src}: folder not found. Expected the unpacked {title} release there.")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file. Expected a folder (new, or a dataset root) for the converted tree.")
    jobs = plan(src)
    categories = sorted({job.destination.parts[0] for job in jobs})
    if not categories:
        raise DataError(f"{src}: nothing to convert. Expected the {title} layout there.")
    for name in categories:
        problem = task_name_problem(name)
        if problem:
            raise DataError(f"{src}: {problem}. Expected {title} category names the kit accepts.")
        if (out / name).exists():
            raise DataError(f"{out / name}: already exists. Delete it or choose another output folder.")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{key}-", dir=out.parent))
    try:
        for source, destination, mask_of in tqdm(jobs, desc=f"{title} -> MVTec", unit="file",
                                                 disable=not progress):
            target = staging / destination
            target.parent.mkdir(parents=True, exist_ok=True)
            if mask_of is None:
                shutil.copyfile(source, target)
            else:
                write_binary_mask(source, target, mask_of)
        if not out.exists():
            staging.rename(out)
        else:
            for name in categories:
                (staging / name).rename(out / name)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return categories
