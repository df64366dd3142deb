"""Converters of published data sets into the MVTec layout (datasets/converters.py), on tiny trees
written in the published layouts."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decoflow_core.data import DataError, list_categories, load_category, validate_tree
from decoflow_core.datasets.converters import convert_visa


def write_image(path: Path, size=(32, 32), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def make_visa(src: Path) -> dict:
    """A tiny release in VisA's layout; returns the source arrays of every mask by (object, stem)."""
    rows, masks = [], {}
    for obj, shift in (("candle", 0), ("pcb1", 40)):
        images = src / obj / "Data/Images"
        for i in range(4):
            write_image(images / f"Normal/{i:04d}.JPG", size=(40, 30), value=(shift + i, 100, 100))
            split = "train" if i < 3 else "test"
            rows.append([obj, split, "normal", f"{obj}/Data/Images/Normal/{i:04d}.JPG", ""])
        for i, labels in enumerate([(1,), (1, 2)]):
            write_image(images / f"Anomaly/{i:03d}.JPG", size=(40, 30), value=(shift, 0, 200))
            values = np.zeros((30, 40), dtype=np.uint8)
            for k, label in enumerate(labels):
                values[5 + 10 * k:10 + 10 * k, 5:15] = label
            mask_path = src / obj / f"Data/Masks/Anomaly/{i:03d}.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(values).save(mask_path)
            masks[obj, f"{i:03d}"] = values
            rows.append([obj, "test", "anomaly", f"{obj}/Data/Images/Anomaly/{i:03d}.JPG",
                         f"{obj}/Data/Masks/Anomaly/{i:03d}.png"])
    (src / "split_csv").mkdir(parents=True)
    with (src / "split_csv/1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return masks


def test_convert_visa_gives_a_loadable_mvtec_tree(tmp_path: Path):
    source_masks = make_visa(tmp_path / "visa")
    out = tmp_path / "converted"
    assert convert_visa(tmp_path / "visa", out, progress=False) == ["candle", "pcb1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "visa"]  # no staging left
    assert [s["category"] for s in validate_tree(out)] == ["candle", "pcb1"]
    for obj in ("candle", "pcb1"):
        category = load_category(out, obj)
        assert [p.name for p in category.train] == ["0000.JPG", "0001.JPG", "0002.JPG"]
        assert [(s.defect_type, s.path.name) for s in category.test] == [
            ("bad", "000.JPG"), ("bad", "001.JPG"), ("good", "0003.JPG")]
        assert category.has_masks
        source_image = tmp_path / f"visa/{obj}/Data/Images/Normal/0000.JPG"
        assert category.train[0].read_bytes() == source_image.read_bytes()  # copied, not re-encoded
        for sample in category.test[:2]:
            written = np.asarray(Image.open(sample.mask_path))
            assert set(np.unique(written)) == {0, 255}
            assert ((written == 255) == (source_masks[obj, sample.path.stem] > 0)).all()


def test_convert_visa_into_an_existing_root_keeps_other_categories(tmp_path: Path):
    make_visa(tmp_path / "visa")
    out = tmp_path / "data"
    write_image(out / "widget/train/good/000.png")  # a category already there
    write_image(out / "widget/test/good/000.png")
    convert_visa(tmp_path / "visa", out, progress=False)
    assert list_categories(out) == ["candle", "pcb1", "widget"]
    with pytest.raises(DataError, match=str(out / "candle")):
        convert_visa(tmp_path / "visa", out, progress=False)


def test_convert_visa_without_csv(tmp_path: Path):
    (tmp_path / "visa").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "visa/split_csv/1cls.csv")):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)


def test_convert_visa_missing_file_leaves_nothing_behind(tmp_path: Path):
    make_visa(tmp_path / "visa")
    missing = tmp_path / "visa/pcb1/Data/Masks/Anomaly/001.png"
    missing.unlink()
    with pytest.raises(DataError, match=str(missing)):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["visa"]


def test_convert_visa_rejects_a_foreign_csv(tmp_path: Path):
    (tmp_path / "visa/split_csv").mkdir(parents=True)
    csv_path = tmp_path / "visa/split_csv/1cls.csv"
    csv_path.write_text("name,path\nx,y\n")
    with pytest.raises(DataError, match=str(csv_path)):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
