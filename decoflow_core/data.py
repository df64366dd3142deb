"""Datasets in the MVTec-AD folder layout: reading them and checking them.

Layout (one folder per category under a dataset root)::

    <root>/<category>/train/good/*                         normal training images
    <root>/<category>/test/good/*                          normal test images (label 0)
    <root>/<category>/test/<defect_type>/*                 defective test images (label 1)
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   optional masks

Images may be PNG, JPEG or BMP (any case), grayscale or RGB. A mask may also be named
``<stem>.png``; any nonzero pixel marks a defect. Hidden files are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
GOOD = "good"
MASK_SUFFIX = "_mask"
_LOSSY_SUFFIXES = (".jpg", ".jpeg")
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(ValueError):
    """A dataset problem; the message names the offending path and what was expected."""


# attribute names of the containers that hold per-task parameters: a task cannot be named like them
_RESERVED_TASK_NAMES = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))


def task_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a task (a category) of a run, or None: the one rule that `info`, `run`
    and the model apply."""
    if not isinstance(name, str) or not name.strip():
        return "a task name cannot be empty"
    if name != name.strip():
        return f"task name {name!r} has leading or trailing spaces"
    if "." in name:
        return f"task name {name!r} contains '.', which the model's parameter names cannot hold"
    if name in _RESERVED_TASK_NAMES:
        return f"task name {name!r} is reserved by torch (an attribute of nn.ModuleDict)"
    return None


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 defect
    defect_type: str  # "good" for normal images
    mask_path: Path | None


@dataclass
class Category:
    name: str
    root: Path  # the category folder, <dataset root>/<name>
    train: list[Path]
    test: list[Sample]

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.label == 1})

    @property
    def mask_coverage(self) -> str:
        """"all", "none" or "partial": how many defect samples have a mask."""
        with_mask = [s.mask_path is not None for s in self.test if s.label == 1]
        if with_mask and all(with_mask):
            return "all"
        return "partial" if any(with_mask) else "none"

    @property
    def has_masks(self) -> bool:
        """True when every defect sample has a mask, so pixel metrics are defined."""
        return self.mask_coverage == "all"


# ----------------------------------------------------------------------------- listing


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not _is_hidden(path) and path.suffix.lower() in IMAGE_SUFFIXES


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))


def _list_images(folder: Path) -> list[Path]:
    """Sorted image files of `folder`; DataError when it is missing or holds none."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found. Expected a folder of images there.")
    images = sorted(p for p in folder.iterdir() if _is_image_file(p))
    if not images:
        raise DataError(
            f"{folder}: no images. Expected at least one {'/'.join(IMAGE_SUFFIXES)} file "
            "(hidden files are ignored); add images or delete the folder."
        )
    return images


def _require_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(
            f"{root}: dataset root not found. Expected a folder holding one subfolder per "
            "category (<root>/<category>/train/good, <root>/<category>/test/...)."
        )


def list_categories(root: str | Path) -> list[str]:
    """Sorted category names under a dataset root (every non-hidden subfolder)."""
    root = Path(root)
    _require_root(root)
    names = [p.name for p in _subdirs(root)]
    if not names:
        raise DataError(
            f"{root}: no category folders. Expected <root>/<category>/train/good/ "
            "with images, one subfolder per category."
        )
    if (root / "train" / GOOD).is_dir():
        raise DataError(
            f"{root}: this looks like a single category (it holds train/good/). "
            f"Pass its parent folder {root.parent} as the dataset root instead."
        )
    return names


def _image_stem(mask: Path) -> str:
    """Stem of the image a mask belongs to: '000' for both 000_mask.png and 000.png."""
    return mask.stem[: -len(MASK_SUFFIX)] if mask.stem.endswith(MASK_SUFFIX) else mask.stem


def _index_masks(type_dir: Path) -> dict[str, Path]:
    """Map image stem -> mask path for one ground_truth/<type> folder."""
    masks: dict[str, Path] = {}
    for mask in sorted(p for p in type_dir.iterdir() if _is_image_file(p)):
        stem = _image_stem(mask)
        if stem in masks:
            raise DataError(
                f"{mask}: a second mask for image stem '{stem}' (the first is {masks[stem].name}). "
                "Expected one mask per image; delete one of them."
            )
        masks[stem] = mask
    return masks


def load_category(root: str | Path, name: str) -> Category:
    """Read one category's file lists (sorted, so the order is deterministic)."""
    category_dir = Path(root) / name
    if not category_dir.is_dir():
        raise DataError(
            f"{category_dir}: category folder not found. Expected {category_dir}/train/good/ "
            "and test/ inside it."
        )
    if not (category_dir / "train" / GOOD).is_dir():
        raise DataError(
            f"{category_dir / 'train' / GOOD}: missing. Every category needs train/good/ "
            "holding its normal training images."
        )
    train = _list_images(category_dir / "train" / GOOD)

    test_dir = category_dir / "test"
    type_dirs = _subdirs(test_dir) if test_dir.is_dir() else []
    if not type_dirs:
        raise DataError(
            f"{test_dir}: missing or empty. Expected test/good/ and one test/<defect_type>/ "
            "folder per kind of defect."
        )
    masks_dir = category_dir / "ground_truth"
    masks_by_type = {d.name: _index_masks(d) for d in _subdirs(masks_dir)} if masks_dir.is_dir() else {}
    unmatched = sorted(set(masks_by_type) - {d.name for d in type_dirs})
    if unmatched:
        raise DataError(
            f"{masks_dir / unmatched[0]}: masks without images. Expected a matching "
            f"{test_dir / unmatched[0]}/ folder; rename or delete the mask folder."
        )

    test = []
    for type_dir in type_dirs:
        masks = dict(masks_by_type.get(type_dir.name, {}))
        seen: dict[str, Path] = {}
        for image in _list_images(type_dir):
            if image.stem in seen:
                raise DataError(
                    f"{image}: same stem as {seen[image.stem]}, so masks cannot be paired. "
                    "Expected unique file stems per folder; rename one of them."
                )
            seen[image.stem] = image
            label = 0 if type_dir.name == GOOD else 1
            test.append(Sample(image, label, type_dir.name, masks.pop(image.stem, None)))
        if masks:
            orphan = next(iter(masks.values()))
            raise DataError(
                f"{orphan}: mask without an image. Expected {type_dir}/{_image_stem(orphan)}.<png|jpg|bmp>; "
                "rename the mask to <image stem>_mask.png or delete it."
            )
    return Category(name=name, root=category_dir, train=train, test=test)


# ----------------------------------------------------------------------------- pixels


def open_checked(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
    except _PIL_ERRORS as exc:
        raise DataError(f"{path}: cannot read {what} ({exc}). Expected a PNG, JPEG or BMP file.") from exc
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale would be clipped by convert(); rescale them instead."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode != "F" else max(float(values.max()), 1e-12)
        return Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8))
    return image


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}


def load_image(path: str | Path, size: int | None, resize: str = "bilinear") -> np.ndarray:
    """Image as (size, size, 3) uint8 RGB, resampled by ``resize`` (bilinear, or lanczos as the
    official code); grayscale is repeated to 3 channels.

    Non-square images are stretched to a square, as MVTec-style pipelines do (the official code
    crops their centre instead; square images such as MVTec-AD's are the same either way).
    `size=None` keeps the stored resolution.
    """
    if resize not in RESAMPLING:
        raise ValueError(f"image resize must be one of {sorted(RESAMPLING)}, got {resize!r}")
    image = _to_8bit(open_checked(Path(path), "image")).convert("RGB")
    if size is not None:
        image = image.resize((size, size), RESAMPLING[resize])
    return np.asarray(image, dtype=np.uint8)


def load_mask(path: str | Path, size: int | None) -> np.ndarray:
    """Mask as a (size, size) bool array, nearest-neighbour resize; `size=None` keeps its size.

    Nonzero pixels are defects (0/255 MVTec masks and VisA-style label ids alike). JPEG
    masks are thresholded at half range instead, because compression smears the zeros.
    """
    path = Path(path)
    image = open_checked(path, "mask")
    if image.mode not in ("L", "P", "1"):
        image = _to_8bit(image).convert("L")
    if size is not None:
        image = image.resize((size, size), Image.Resampling.NEAREST)
    values = np.asarray(image)
    threshold = 127 if path.suffix.lower() in _LOSSY_SUFFIXES else 0
    return values > threshold


def mask_for(sample: Sample, size: int | None) -> np.ndarray:
    """Ground-truth mask of a test sample: zeros for a good image without a mask file."""
    if sample.mask_path is not None:
        return load_mask(sample.mask_path, size)
    if sample.label == 0:
        if size is None:
            width, height = verified_size(sample.path)
            return np.zeros((height, width), dtype=bool)
        return np.zeros((size, size), dtype=bool)
    category_dir = sample.path.parents[2]
    expected = category_dir / "ground_truth" / sample.defect_type / f"{sample.path.stem}{MASK_SUFFIX}.png"
    raise DataError(
        f"{sample.path}: defect image has no mask. Expected {expected}; pixel metrics need "
        "a mask for every defect image of the category."
    )


# ----------------------------------------------------------------------------- checks


def verified_size(path: Path) -> tuple[int, int]:
    """(width, height) after PIL's integrity check; DataError if the file is broken."""
    try:
        with Image.open(path) as image:
            size = image.size
            # PNG verify() checks every chunk's CRC; for JPEG and BMP it checks nothing, so
            # those are decoded in full to catch truncated downloads.
            if image.format == "PNG":
                image.verify()
            else:
                image.load()
    except _PIL_ERRORS as exc:
        raise DataError(
            f"{path}: unreadable image ({exc}). Expected a valid PNG, JPEG or BMP file; "
            "re-export it or delete it."
        ) from exc
    return size


def validate_tree(root: str | Path, categories: list[str] | None = None) -> list[dict]:
    """Check every file of the chosen categories and summarise each one.

    Opens and verifies every image, checks each mask against its image's size, and counts
    defect masks with no defect pixel ("empty_masks"); callers should leave those out of
    per-region metrics. Raises DataError at the first problem.
    """
    root = Path(root)
    _require_root(root)
    names = list_categories(root) if categories is None else list(categories)
    summaries = []
    for name in names:
        problem = task_name_problem(name)
        if problem:
            raise DataError(f"{root / name}: {problem}; rename the category folder")
        category = load_category(root, name)
        for path in category.train:
            verified_size(path)
        empty_masks = 0
        for sample in category.test:
            width, height = verified_size(sample.path)
            if sample.mask_path is None:
                continue
            mask = load_mask(sample.mask_path, None)
            if mask.shape != (height, width) and not same_aspect(mask.shape[::-1], (width, height)):
                raise DataError(
                    f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{sample.path} is {width}x{height}. Expected the same size, or the same aspect ratio "
                    "(a mask of another size with the image's aspect ratio is resized).")
            empty_masks += int(sample.label == 1 and not mask.any())
        defects = {t: sum(s.defect_type == t for s in category.test) for t in category.defect_types}
        summaries.append({
            "category": name,
            "train_good": len(category.train),
            "test_good": sum(s.label == 0 for s in category.test),
            "defects": defects,
            "masks": category.mask_coverage,
            "empty_masks": empty_masks,
            "missing_mask_folders": missing_mask_folders(category),
        })
    return summaries


def same_aspect(size_a: tuple[int, int], size_b: tuple[int, int], tolerance: float = 0.01) -> bool:
    """Whether two (width, height) sizes have the same aspect ratio, to ``tolerance`` (rounding)."""
    return abs(size_a[0] * size_b[1] - size_a[1] * size_b[0]) <= tolerance * size_a[1] * size_b[0]


def missing_mask_folders(category: Category) -> list[Path]:
    """The ground_truth/<type>/ folders a category lacks while holding other masks: without them the
    category's pixel metrics are not defined. Empty when it has no masks at all, or all of them."""
    if category.mask_coverage != "partial":
        return []
    types = {s.defect_type for s in category.test if s.label == 1 and s.mask_path is None}
    return [category.root / "ground_truth" / t for t in sorted(types)
            if not (category.root / "ground_truth" / t).is_dir()]


def format_info_table(summaries: list[dict]) -> str:
    """An aligned text table, one row per category summary from validate_tree."""
    headers = ["category", "train good", "test good", "test defect", "masks", "defect types"]
    numeric = {1, 2, 3}
    rows = []
    for s in summaries:
        masks = s["masks"] + (f" ({s['empty_masks']} empty)" if s.get("empty_masks") else "")
        rows.append([
            s["category"],
            str(s["train_good"]),
            str(s["test_good"]),
            str(sum(s["defects"].values())),
            masks,
            ", ".join(f"{t} {n}" for t, n in s["defects"].items()) or "-",
        ])
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    notes = [f"{s['category']}: no masks for {folder.name} ({folder}/ missing): the category's pixel metrics "
             "are not computed" for s in summaries for folder in s.get("missing_mask_folders", [])]
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows), *notes])
