"""Real-IAD, following its per-category JSON split files."""
from __future__ import annotations

import json
from pathlib import Path

from ...data import GOOD, DataError, _is_hidden
from .common import Job, Plan, convert, mask_destination

REALIAD_RESOLUTIONS = ("1024", "512", "256", "raw")  # the image folders realiad_<resolution>
_JSON_FOLDERS = ("realiad_jsons", "realiad_jsons/realiad_jsons")  # the zip unpacked beside the images, or into its own folder


def _image_root(src: Path, resolution: str | None) -> Path:
    if resolution is not None:
        if str(resolution) not in REALIAD_RESOLUTIONS:
            raise DataError(f"Real-IAD resolution {resolution!r}: unknown. Expected one of "
                            f"{', '.join(REALIAD_RESOLUTIONS)} (the image folders realiad_<resolution>).")
        root = src / f"realiad_{resolution}"
        if not root.is_dir():
            raise DataError(f"{root}: folder not found. Expected the Real-IAD images of that resolution there.")
        return root
    found = [src / f"realiad_{r}" for r in REALIAD_RESOLUTIONS if (src / f"realiad_{r}").is_dir()]
    if not found:
        raise DataError(f"{src}: no Real-IAD image folder. Expected one of "
                        f"{', '.join('realiad_' + r for r in REALIAD_RESOLUTIONS)} beside realiad_jsons/.")
    if len(found) > 1:
        raise DataError(f"{src}: several Real-IAD image folders ({', '.join(p.name for p in found)}). Expected "
                        "one, or a choice: resolution= (prepare realiad --resolution).")
    return found[0]


def _split_files(src: Path) -> list[Path]:
    for folder in _JSON_FOLDERS:
        files = sorted(p for p in (src / folder).glob("*.json") if not _is_hidden(p))
        if files:
            return files
    raise DataError(f"{src / _JSON_FOLDERS[0]}: no Real-IAD split files. Expected <category>.json files there "
                    f"(or in {src / _JSON_FOLDERS[1]}), unpacked from the release's realiad_jsons.zip.")


def _read_split(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc}). Expected a Real-IAD split file (JSON).") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "test")):
        raise DataError(f"{path}: expected a JSON object with 'train' and 'test' lists (a Real-IAD split file).")
    return data


def _plan_entry(plan: Plan, base: Path, category: str, split: str, entry: object, where: str, normal: str) -> None:
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("anomaly_class", "image_path")):
        raise DataError(f"{where}: {str(entry)[:80]}. Expected an object with anomaly_class and image_path.")
    label, mask = entry["anomaly_class"], entry.get("mask_path")
    if split == "train" and label != normal:
        raise DataError(f"{where}: anomaly_class {label!r} in train. Expected only {normal!r} there "
                        "(the split files of realiad_jsons, not a noisy-training variant).")
    defect = split == "test" and label != normal and bool(mask)
    folder = "train/good" if split == "train" else f"test/{label if defect else GOOD}"
    image = base / entry["image_path"]
    destination = Path(category, folder, image.name)
    plan.add(image, destination, named_by=where)
    if defect:
        plan.add(base / mask, mask_destination(destination), mask_of=image, named_by=where)


def _plan_realiad(src: Path, resolution: str | None) -> list[Job]:
    images = _image_root(src, resolution)
    split_files = _split_files(src)
    plan = Plan()
    for path in split_files:
        data = _read_split(path)
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        prefix = meta.get("prefix")
        base = images / (prefix if isinstance(prefix, str) and prefix.strip("/") else path.stem)
        if not base.is_dir():
            continue  # this category's images were not downloaded
        normal = meta.get("normal_class") or "OK"
        for split in ("train", "test"):
            for number, entry in enumerate(data[split], 1):
                _plan_entry(plan, base, path.stem, split, entry, f"{path}, {split} entry {number}", normal)
    if not plan.jobs:
        raise DataError(f"{images}: none of the categories of {split_files[0].parent} "
                        f"({', '.join(p.stem for p in split_files[:3])}, ...) found there. "
                        f"Expected {images}/<category>/ folders, unpacked from the release's per-category zips.")
    return plan.jobs


def convert_realiad(src: str | Path, out: str | Path, progress: bool = True, *,
                    resolution: str | None = None) -> list[str]:
    """Convert Real-IAD (https://realiad4ad.github.io/Real-IAD) to the kit's tree, following the split
    files of realiad_jsons (the standard multi-view split; single-view and noisy-training variants are
    not read).

    `src` holds both the split files, realiad_jsons/<category>.json (or realiad_jsons/realiad_jsons/
    when the zip was unpacked into its own folder), and one image folder realiad_<resolution>/<category>/
    (1024, 512, 256 or raw; `resolution` chooses when there are several). Each split file lists train
    and test entries: anomaly_class (OK is good), image_path and mask_path, relative to
    realiad_<resolution>/<meta prefix>/ (the category). Train holds only OK entries; a test entry that is
    not OK goes to test/<anomaly_class> with its mask as ground_truth/<anomaly_class>/<stem>_mask.png,
    0/255, except one without a mask, which counts as good (as in the official Real-IAD loader).
    Categories whose image folder is absent are skipped. Returns the converted categories.
    """
    return convert(src, out, "realiad", "Real-IAD", lambda s: _plan_realiad(s, resolution), progress)
