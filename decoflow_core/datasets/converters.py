"""Converters of published anomaly-detection data sets into the MVTec-AD layout the kit reads
(``data.py``): VisA, following its official split file."""
from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data import MASK_SUFFIX, DataError, open_checked, verified_size

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_FOLDERS = {
    ("train", "normal"): "train/good",
    ("test", "normal"): "test/good",
    ("test", "anomaly"): "test/bad",
}


def _plan_visa(src: Path, csv_path: Path) -> list[tuple[Path, Path, Path | None]]:
    """(source, destination relative to `out`, image of a mask or None) per file; checks sources exist."""
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing_columns = [c for c in _VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing_columns:
            raise DataError(
                f"{csv_path}: missing columns {missing_columns}. Expected the header "
                f"{','.join(_VISA_COLUMNS)} of the official VisA split."
            )
        rows = [(reader.line_num, {k: (row[k] or "").strip() for k in _VISA_COLUMNS}) for row in reader]
    if not rows:
        raise DataError(f"{csv_path}: no rows. Expected one row per VisA image.")

    jobs, destinations = [], {}
    for line_number, row in rows:
        where = f"{csv_path}, line {line_number}"
        folder = _VISA_FOLDERS.get((row["split"], row["label"]))
        if folder is None:
            raise DataError(
                f"{where}: split '{row['split']}' with label '{row['label']}'. Expected "
                "train/normal, test/normal or test/anomaly."
            )
        image = src / row["image"]
        if not image.is_file():
            raise DataError(f"{image}: not found ({where}). Expected the file the VisA split names.")
        planned = [(image, Path(row["object"], folder, image.name), None)]
        if row["label"] == "anomaly" and row["mask"]:
            mask = src / row["mask"]
            if not mask.is_file():
                raise DataError(f"{mask}: not found ({where}). Expected the mask the VisA split names.")
            mask_name = f"{image.stem}{MASK_SUFFIX}.png"
            planned.append((mask, Path(row["object"], "ground_truth/bad", mask_name), image))
        for source, destination, mask_of in planned:
            if destination in destinations:
                raise DataError(
                    f"{where}: {source} would overwrite {destinations[destination]} at {destination}. "
                    "Expected unique file names per object and folder."
                )
            destinations[destination] = source
            jobs.append((source, destination, mask_of))
    return jobs


def _write_binary_mask(source: Path, destination: Path, image: Path) -> None:
    """VisA masks hold label ids (1, 2, ...); MVTec masks are 0/255."""
    values = np.asarray(open_checked(source, "mask"))
    if values.ndim == 3:
        values = values.any(axis=-1)
    width, height = verified_size(image)
    if values.shape != (height, width):
        raise DataError(
            f"{source}: mask is {values.shape[1]}x{values.shape[0]} but {image} is {width}x{height}. "
            "Expected the same size."
        )
    Image.fromarray((values != 0).astype(np.uint8) * 255).save(destination)


def convert_visa(src: str | Path, out: str | Path, progress: bool = True) -> list[str]:
    """Convert the official VisA release to the MVTec layout, following split_csv/1cls.csv.

    Anomalies go to test/bad with masks in ground_truth/bad/<stem>_mask.png (0/255).
    Everything is written into a hidden sibling of `out` first and renamed into place at
    the end, so an interrupted run leaves no half-converted object. Returns the objects.
    """
    src, out = Path(src), Path(out)
    csv_path = src / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(
            f"{csv_path}: VisA split file not found. Expected the official VisA release "
            f"unpacked at {src}, with split_csv/1cls.csv beside the object folders."
        )
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file. Expected a folder (new, or a dataset root) for the converted tree.")
    jobs = _plan_visa(src, csv_path)
    objects = sorted({destination.parts[0] for _, destination, _ in jobs})
    for name in objects:
        if (out / name).exists():
            raise DataError(f"{out / name}: already exists. Delete it or choose another output folder.")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.visa-", dir=out.parent))
    try:
        for source, destination, mask_of in tqdm(jobs, desc="VisA -> MVTec", unit="file", disable=not progress):
            target = staging / destination
            target.parent.mkdir(parents=True, exist_ok=True)
            if mask_of is None:
                shutil.copyfile(source, target)
            else:
                _write_binary_mask(source, target, mask_of)
        if not out.exists():
            staging.rename(out)
        else:
            for name in objects:
                (staging / name).rename(out / name)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return objects
