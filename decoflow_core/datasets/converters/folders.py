"""Data sets published as one folder per category, close to the MVTec layout: MPDD, BTAD, MVTec AD 2."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ...data import GOOD, MASK_SUFFIX, DataError, _is_hidden, _list_images, _subdirs
from .common import Job, Plan, convert, mask_destination

MVTEC_AD2_NOTE = ("MVTec AD 2: the test set here is test_public (its labels are published); results on it are "
                  "not those of the official private test sets, whose labels are withheld.")


class Folder(NamedTuple):
    source: str  # images, relative to the source category folder
    destination: str  # relative to the converted category folder
    masks: tuple[str, ...] = ()  # where a defect image's mask may be ({stem}: the image's), first found wins


def _categories(src: Path, marker: str, title: str) -> list[Path]:
    folders = [p for p in sorted(src.iterdir()) if p.is_dir() and not _is_hidden(p)]
    if not folders:
        raise DataError(f"{src}: no category folders. Expected the {title} release: one folder per "
                        f"category, each holding {marker}/.")
    for folder in folders:
        if not (folder / marker).is_dir():
            raise DataError(f"{folder / marker}: missing, so {folder.name} is not a {title} category. Expected "
                            f"{src} to hold only category folders, each with {marker}/.")
    return folders


def _find_mask(category: Path, image: Path, candidates: tuple[str, ...]) -> Path:
    paths = [category / c.format(stem=image.stem) for c in candidates]
    found = next((p for p in paths if p.is_file()), None)
    if found is None:
        others = f" (or {', '.join(map(str, paths[1:]))})" if len(paths) > 1 else ""
        raise DataError(f"{paths[0]}: not found. Expected the mask of {image} there{others}.")
    return found


def _plan_folders(src: Path, marker: str, title: str, layout: Callable[[Path], list[Folder]]) -> list[Job]:
    plan = Plan()
    for category in _categories(src, marker, title):
        for folder in layout(category):
            for image in _list_images(category / folder.source):
                destination = Path(category.name, folder.destination, image.name)
                plan.add(image, destination)
                if folder.masks:
                    mask = _find_mask(category, image, folder.masks)
                    plan.add(mask, mask_destination(destination), mask_of=image)
    return plan.jobs


def _convert_folders(src: str | Path, out: str | Path, progress: bool, key: str, title: str, marker: str,
                     layout: Callable[[Path], list[Folder]]) -> list[str]:
    return convert(src, out, key, title, lambda s: _plan_folders(s, marker, title, layout), progress)


def _mpdd_layout(category: Path) -> list[Folder]:
    test = category / "test"
    defects = [d.name for d in _subdirs(test) if d.name != GOOD] if test.is_dir() else []
    return [Folder("train/good", "train/good"), Folder("test/good", "test/good"),
            *(Folder(f"test/{d}", f"test/{d}", (f"ground_truth/{d}/{{stem}}{MASK_SUFFIX}.png",
                                                 f"ground_truth/{d}/{{stem}}.png")) for d in defects)]


_BTAD_LAYOUT = [Folder("train/ok", "train/good"), Folder("test/ok", "test/good"),
                Folder("test/ko", "test/ko", ("ground_truth/ko/{stem}.png", "ground_truth/ko/{stem}.bmp"))]

_MVTEC_AD2_LAYOUT = [Folder("train/good", "train/good"), Folder("test_public/good", "test/good"),
                     Folder("test_public/bad", "test/bad", (f"test_public/ground_truth/bad/{{stem}}{MASK_SUFFIX}.png",))]


def convert_mpdd(src: str | Path, out: str | Path, progress: bool = True) -> list[str]:
    """Convert MPDD (https://github.com/stepanje/MPDD; `src` holds bracket_black, connector, ...) to the
    kit's tree.

    MPDD has the MVTec layout already: <category>/train/good, test/good, test/<defect>, with masks in
    ground_truth/<defect>/<stem>_mask.png (<stem>.png is accepted too). Images are copied as they are;
    every defect image must have its mask, written as 0/255. Returns the categories.
    """
    return _convert_folders(src, out, progress, "mpdd", "MPDD", "train/good", _mpdd_layout)


def convert_btad(src: str | Path, out: str | Path, progress: bool = True) -> list[str]:
    """Convert BTAD, the beanTech Anomaly Detection data set (`src` holds 01, 02 and 03), to the kit's tree.

    Each product folder holds train/ok, test/ok, test/ko and ground_truth/ko; images are .bmp or .png
    and a mask shares its image's stem, as .png or .bmp (01: bmp images, png masks; 02: png, png; 03:
    bmp, bmp). ok becomes good, and ko the one defect type (test/ko, ground_truth/ko/<stem>_mask.png,
    0/255). The categories keep their published names 01, 02 and 03, which the kit accepts as task
    names. Returns the categories.
    """
    return _convert_folders(src, out, progress, "btad", "BTAD", "train/ok", lambda _: _BTAD_LAYOUT)


def convert_mvtec_ad2(src: str | Path, out: str | Path, progress: bool = True) -> list[str]:
    """Convert MVTec AD 2 (`src` holds can, fabric, fruit_jelly, ...) to the kit's tree.

    train/good is the training set. validation/good is left out: the kit holds out its own validation
    images from train/good, and training on train/good alone keeps the published training set.
    test_public (good, and bad with masks in test_public/ground_truth/bad/<stem>_mask.png) becomes the
    test set: test/good, test/bad. test_private and test_private_mixed are not converted, their labels
    being withheld, so results on the converted tree are on test_public, not on the official (private)
    test sets. Returns the categories.
    """
    return _convert_folders(src, out, progress, "mvtec_ad2", "MVTec AD 2", "train/good", lambda _: _MVTEC_AD2_LAYOUT)
