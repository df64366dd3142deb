"""VisA, following its official split file split_csv/1cls.csv."""
from __future__ import annotations

import csv
from pathlib import Path

from ...data import DataError
from .common import Job, Plan, convert, mask_destination

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_FOLDERS = {
    ("train", "normal"): "train/good",
    ("test", "normal"): "test/good",
    ("test", "anomaly"): "test/bad",
}


def _plan_visa(src: Path) -> list[Job]:
    csv_path = src / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(
            f"{csv_path}: VisA split file not found. Expected the official VisA release "
            f"unpacked at {src}, with split_csv/1cls.csv beside the object folders."
        )
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

    plan = Plan()
    for line_number, row in rows:
        where = f"{csv_path}, line {line_number}"
        folder = _VISA_FOLDERS.get((row["split"], row["label"]))
        if folder is None:
            raise DataError(
                f"{where}: split '{row['split']}' with label '{row['label']}'. Expected "
                "train/normal, test/normal or test/anomaly."
            )
        image = src / row["image"]
        destination = Path(row["object"], folder, image.name)
        plan.add(image, destination, named_by=where)
        if row["label"] == "anomaly" and row["mask"]:
            plan.add(src / row["mask"], mask_destination(destination), mask_of=image, named_by=where)
    return plan.jobs


def convert_visa(src: str | Path, out: str | Path, progress: bool = True) -> list[str]:
    """Convert the official VisA release (the folder holding split_csv/ and the object folders) to the
    MVTec layout, following split_csv/1cls.csv.

    Anomalies go to test/bad, their masks (label ids) to ground_truth/bad/<stem>_mask.png as 0/255.
    Returns the objects.
    """
    return convert(src, out, "visa", "VisA", _plan_visa, progress)
