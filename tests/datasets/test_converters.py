"""Converters of published data sets into the MVTec layout (datasets/converters/), on tiny trees
written in the published layouts."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line
from PIL import Image

from decoflow_core.cli import main
from decoflow_core.data import DataError, list_categories, load_category, validate_tree
from decoflow_core.datasets.converters import (
    CONVERTERS,
    convert_btad,
    convert_mpdd,
    convert_realiad,
    convert_visa,
)


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


# ----------------------------------------------------------------------------- tiny releases of the other data sets


def write_mask(path: Path, size=(40, 30), box=(5, 5, 15, 12), value=255) -> np.ndarray:
    """A grayscale mask with `value` inside `box` (x0, y0, x1, y1); returns its pixels."""
    values = np.zeros(size[::-1], dtype=np.uint8)
    values[box[1]:box[3], box[0]:box[2]] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    return values


def make_mpdd(src: Path) -> dict:
    """MPDD's layout (the MVTec one); returns the source mask pixels by (category, defect, stem)."""
    masks = {}
    for category in ("bracket_black", "tubes"):
        root = src / category
        for i in range(3):
            write_image(root / f"train/good/{i:03d}.png", size=(40, 30), value=(i, 90, 90))
        write_image(root / "test/good/000.png", size=(40, 30))
        for defect, value in (("hole", 255), ("scratches", 1)):
            write_image(root / f"test/{defect}/000.png", size=(40, 30), value=(200, 0, 0))
            masks[category, defect, "000"] = write_mask(root / f"ground_truth/{defect}/000_mask.png", value=value)
    return masks


def make_btad(src: Path) -> dict:
    """BTAD's layout: 01 bmp images with png masks, 02 png with png, 03 bmp with bmp."""
    masks = {}
    for product, image_ext, mask_ext in (("01", "bmp", "png"), ("02", "png", "png"), ("03", "bmp", "bmp")):
        root = src / product
        for i in range(2):
            write_image(root / f"train/ok/{i:04d}.{image_ext}", size=(40, 30), value=(i, 50, 50))
        write_image(root / f"test/ok/0000.{image_ext}", size=(40, 30))
        for i, value in ((1, 255), (2, 7)):
            write_image(root / f"test/ko/{i:04d}.{image_ext}", size=(40, 30), value=(0, 0, 200))
            masks[product, "ko", f"{i:04d}"] = write_mask(root / f"ground_truth/ko/{i:04d}.{mask_ext}", value=value)
    return masks


def _realiad_name(category: str, sample: int, label: str) -> str:
    return f"{category}_{sample:04d}_{label}_C1_20230101120000"


def make_realiad(src: Path, jsons: str = "realiad_jsons", resolution: str = "512") -> dict:
    """Real-IAD's layout: realiad_jsons/<category>.json naming images and masks relative to
    realiad_<resolution>/<category>/; zipper has a split file but no images."""
    masks = {}
    for category in ("audiojack", "toy_brick", "zipper"):
        root = src / f"realiad_{resolution}" / category
        train, test = [], []
        for sample in range(1, 4):
            path = f"OK/S{sample:04d}/{_realiad_name(category, sample, 'OK')}.jpg"
            train.append({"category": category, "anomaly_class": "OK", "image_path": path, "mask_path": None})
        test.append({"category": category, "anomaly_class": "OK", "image_path": f"OK/S0004/{_realiad_name(category, 4, 'OK')}.jpg",
                     "mask_path": None})
        for sample, label, value in ((5, "AK", 255), (6, "BX", 3), (7, "ZW", None)):
            name = _realiad_name(category, sample, "NG")
            mask = None if value is None else f"NG/{label}/S{sample:04d}/{name}.png"
            test.append({"category": category, "anomaly_class": label,
                         "image_path": f"NG/{label}/S{sample:04d}/{name}.jpg", "mask_path": mask})
            if mask and category != "zipper":
                masks[category, label, name] = write_mask(root / mask, size=(32, 32), value=value)
        if category != "zipper":
            for entry in train + test:
                write_image(root / entry["image_path"], size=(32, 32), value=(len(entry["image_path"]), 60, 60))
        split = {"meta": {"prefix": category, "normal_class": "OK"}, "train": train, "test": test}
        (src / jsons).mkdir(parents=True, exist_ok=True)
        (src / jsons / f"{category}.json").write_text(json.dumps(split))
    return masks


def make_mvtec_ad2(src: Path) -> dict:
    """MVTec AD 2's layout, with validation/good and the two private test sets (no labels)."""
    masks = {}
    for category in ("can", "vial"):
        root = src / category
        for i in range(3):
            write_image(root / f"train/good/{i:03d}_regular.png", size=(40, 30), value=(i, 70, 70))
        for i in range(2):
            write_image(root / f"validation/good/{i + 10:03d}_regular.png", size=(40, 30))
            write_image(root / f"test_private/{i:03d}_regular.png", size=(40, 30))
            write_image(root / f"test_private_mixed/{i:03d}_overexposed.png", size=(40, 30))
        write_image(root / "test_public/good/000_regular.png", size=(40, 30))
        for i, value in ((0, 255), (1, 1)):
            write_image(root / f"test_public/bad/{i:03d}_regular.png", size=(40, 30), value=(250, 0, 0))
            masks[category, "bad", f"{i:03d}_regular"] = write_mask(
                root / f"test_public/ground_truth/bad/{i:03d}_regular_mask.png", value=value)
    return masks


# converter -> (tiny release, a category of it, a file of it whose absence must be reported)
RELEASES = {
    "visa": (make_visa, "pcb1", "pcb1/Data/Masks/Anomaly/001.png"),
    "mpdd": (make_mpdd, "tubes", "tubes/ground_truth/scratches/000_mask.png"),
    "btad": (make_btad, "03", "03/ground_truth/ko/0002.bmp"),
    "realiad": (make_realiad, "toy_brick",
                f"realiad_512/toy_brick/NG/BX/S0006/{_realiad_name('toy_brick', 6, 'NG')}.png"),
    "mvtec_ad2": (make_mvtec_ad2, "vial", "vial/test_public/ground_truth/bad/001_regular_mask.png"),
}


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def check_masks(out: Path, category: str, source_masks: dict) -> int:
    """Every defect image of `category` has a 0/255 mask named <stem>_mask.png with the source's defect
    pixels; returns how many."""
    checked = 0
    for sample in load_category(out, category).test:
        if sample.label == 0:
            assert sample.mask_path is None
            continue
        assert sample.mask_path == out / category / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"
        written = np.asarray(Image.open(sample.mask_path))
        assert set(np.unique(written)) == {0, 255}
        assert ((written == 255) == (source_masks[category, sample.defect_type, sample.path.stem] > 0)).all()
        checked += 1
    return checked


def test_converters_cover_every_data_set():
    assert list(CONVERTERS) == ["visa", "mpdd", "btad", "realiad", "mvtec_ad2"]
    assert CONVERTERS["visa"] is convert_visa


@pytest.mark.parametrize("key", sorted(RELEASES))
def test_an_existing_category_is_refused_and_left_untouched(key, tmp_path: Path):
    make, category, _ = RELEASES[key]
    make(tmp_path / "src")
    out = tmp_path / "data"
    write_image(out / category / "train/good/mine.png")
    with pytest.raises(DataError, match=f"{out / category}: already exists"):
        CONVERTERS[key](tmp_path / "src", out, progress=False)
    assert tree(out) == [category, f"{category}/train", f"{category}/train/good", f"{category}/train/good/mine.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # no staging left


@pytest.mark.parametrize("key", sorted(RELEASES))
def test_a_missing_source_file_is_named_and_nothing_is_written(key, tmp_path: Path):
    make, _, missing = RELEASES[key]
    make(tmp_path / "src")
    (tmp_path / "src" / missing).unlink()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "src" / missing))):
        CONVERTERS[key](tmp_path / "src", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_mpdd_copies_the_tree_with_binary_masks(tmp_path: Path, capsys):
    source_masks = make_mpdd(tmp_path / "mpdd")
    out = tmp_path / "converted"
    assert convert_mpdd(tmp_path / "mpdd", out, progress=False) == ["bracket_black", "tubes"]
    summaries = validate_tree(out)
    assert [(s["category"], s["train_good"], s["test_good"], s["defects"], s["masks"]) for s in summaries] == [
        (name, 3, 1, {"hole": 1, "scratches": 1}, "all") for name in ("bracket_black", "tubes")]
    for category in ("bracket_black", "tubes"):
        assert check_masks(out, category, source_masks) == 2
    image = "tubes/train/good/001.png"
    assert (out / image).read_bytes() == (tmp_path / "mpdd" / image).read_bytes()
    assert main(["info", "--data", str(out)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"bracket_black\s+3\s+1\s+2\s+all\s+hole 1, scratches 1", table), table


def test_convert_btad_maps_ok_to_good_and_ko_to_a_defect_type(tmp_path: Path):
    source_masks = make_btad(tmp_path / "btad")
    out = tmp_path / "converted"
    assert convert_btad(tmp_path / "btad", out, progress=False) == ["01", "02", "03"]
    assert [s["category"] for s in validate_tree(out)] == ["01", "02", "03"]
    for product, ext in (("01", "bmp"), ("02", "png"), ("03", "bmp")):
        category = load_category(out, product)
        assert [p.name for p in category.train] == [f"0000.{ext}", f"0001.{ext}"]
        assert [(s.defect_type, s.path.name) for s in category.test] == [
            ("good", f"0000.{ext}"), ("ko", f"0001.{ext}"), ("ko", f"0002.{ext}")]
        assert check_masks(out, product, source_masks) == 2
    assert tree(out / "03/ground_truth") == ["ko", "ko/0001_mask.png", "ko/0002_mask.png"]


@pytest.mark.parametrize("jsons", ["realiad_jsons", "realiad_jsons/realiad_jsons"])
def test_convert_realiad_follows_the_split_files(jsons, tmp_path: Path):
    source_masks = make_realiad(tmp_path / "realiad", jsons=jsons)
    out = tmp_path / "converted"
    # zipper has a split file but no images: it is skipped
    assert convert_realiad(tmp_path / "realiad", out, progress=False) == ["audiojack", "toy_brick"]
    summaries = validate_tree(out)
    assert [(s["category"], s["train_good"], s["test_good"], s["defects"], s["masks"]) for s in summaries] == [
        (name, 3, 2, {"AK": 1, "BX": 1}, "all") for name in ("audiojack", "toy_brick")]
    category = load_category(out, "audiojack")
    assert [p.name for p in category.train] == [f"{_realiad_name('audiojack', i, 'OK')}.jpg" for i in (1, 2, 3)]
    # an anomalous entry without a mask counts as good, as in the official loader
    assert [(s.defect_type, s.path.stem) for s in category.test] == [
        ("AK", _realiad_name("audiojack", 5, "NG")), ("BX", _realiad_name("audiojack", 6, "NG")),
        ("good", _realiad_name("audiojack", 4, "OK")), ("good", _realiad_name("audiojack", 7, "NG"))]
    assert check_masks(out, "audiojack", source_masks) == 2


def test_convert_realiad_needs_a_choice_among_several_resolutions(tmp_path: Path, capsys):
    make_realiad(tmp_path / "realiad")
    (tmp_path / "realiad/realiad_1024").mkdir()
    with pytest.raises(DataError, match="realiad_1024, realiad_512"):
        convert_realiad(tmp_path / "realiad", tmp_path / "out", progress=False)
    argv = ["prepare", "realiad", "--src", str(tmp_path / "realiad"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--resolution" in error_line(capsys)
    assert main([*argv, "--resolution", "512"]) == 0
    assert "converted 2 realiad categories" in capsys.readouterr().out
    assert list_categories(tmp_path / "out") == ["audiojack", "toy_brick"]


def test_convert_realiad_refuses_anomalies_in_train(tmp_path: Path):
    make_realiad(tmp_path / "realiad")
    split_path = tmp_path / "realiad/realiad_jsons/audiojack.json"
    split = json.loads(split_path.read_text())
    split["train"][1]["anomaly_class"] = "AK"
    split_path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=re.escape(f"{split_path}, train entry 2: anomaly_class 'AK'")):
        convert_realiad(tmp_path / "realiad", tmp_path / "out", progress=False)


def test_convert_realiad_without_split_files(tmp_path: Path):
    (tmp_path / "realiad/realiad_512").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "realiad/realiad_jsons")):
        convert_realiad(tmp_path / "realiad", tmp_path / "out", progress=False)


def test_prepare_mvtec_ad2_converts_test_public_and_says_so(tmp_path: Path, capsys):
    source_masks = make_mvtec_ad2(tmp_path / "mvtec_ad2")
    out = tmp_path / "converted"
    assert main(["prepare", "mvtec_ad2", "--src", str(tmp_path / "mvtec_ad2"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"converted 2 mvtec_ad2 categories into {out}: can, vial" in printed
    assert "test_public" in printed and "private" in printed
    for name in ("can", "vial"):
        category = load_category(out, name)
        # validation/good stays out of train; the private test sets are not converted
        assert [p.name for p in category.train] == ["000_regular.png", "001_regular.png", "002_regular.png"]
        assert [(s.defect_type, s.path.name) for s in category.test] == [
            ("bad", "000_regular.png"), ("bad", "001_regular.png"), ("good", "000_regular.png")]
        assert check_masks(out, name, source_masks) == 2
        assert sorted(p.name for p in (out / name).iterdir()) == ["ground_truth", "test", "train"]
    assert len([p for p in out.rglob("*") if p.is_file()]) == 2 * (3 + 3 + 2)


def test_prepare_a_data_set_needs_src_and_out(tmp_path: Path, capsys):
    assert main(["prepare", "btad", "--out", str(tmp_path / "out")]) == 2
    assert "--src" in error_line(capsys)
    make_btad(tmp_path / "btad")
    assert main(["prepare", "btad", "--src", str(tmp_path / "btad"), "--out", str(tmp_path / "out"),
                 "--resolution", "512"]) == 2
    assert "--resolution" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["btad"]


def test_a_category_folder_that_is_not_one_is_named(tmp_path: Path):
    make_btad(tmp_path / "btad")
    (tmp_path / "btad/docs").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "btad/docs/train/ok"))):
        convert_btad(tmp_path / "btad", tmp_path / "out", progress=False)
