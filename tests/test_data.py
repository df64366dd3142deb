"""Dataset layer: MVTec-layout loading and tree validation.

Trees are generated in tmp_path; a real MVTec-layout tree is read only when the environment variable
DECOFLOW_REAL_AD names one (with bottle and magnetic_tile).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decoflow_core.data import (
    Category,
    DataError,
    Sample,
    format_info_table,
    list_categories,
    load_category,
    load_image,
    load_mask,
    mask_for,
    validate_tree,
)

REAL_AD = os.environ.get("DECOFLOW_REAL_AD")  # an MVTec-layout tree holding bottle and magnetic_tile


def write_image(path: Path, size=(32, 32), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def write_mask(path: Path, size=(32, 32), box=(8, 8, 16, 16), value=255) -> Path:
    values = np.zeros(size[::-1], dtype=np.uint8)
    left, top, right, bottom = box
    values[top:bottom, left:right] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    return path


def make_category(root: Path, name: str = "widget", masks: bool = True) -> Path:
    """train/good 3, test/good 2, test/crack 2, test/hole 1; masks for every defect if asked."""
    category = root / name
    for stem in ("000", "001", "002"):
        write_image(category / "train/good" / f"{stem}.png")
    for stem in ("000", "001"):
        write_image(category / "test/good" / f"{stem}.png")
        write_image(category / "test/crack" / f"{stem}.png")
    write_image(category / "test/hole/000.png")
    if masks:
        write_mask(category / "ground_truth/crack/000_mask.png")
        write_mask(category / "ground_truth/crack/001_mask.png")
        write_mask(category / "ground_truth/hole/000_mask.png")
    return category


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_category(root, "widget")
    make_category(root, "gadget", masks=False)
    return root


# ----------------------------------------------------------------------------- loading


def test_load_category_pairs_images_labels_and_masks(tree: Path):
    category = load_category(tree, "widget")
    assert isinstance(category, Category)
    assert category.root == tree / "widget"
    assert [p.name for p in category.train] == ["000.png", "001.png", "002.png"]
    assert [(s.defect_type, s.path.name, s.label) for s in category.test] == [
        ("crack", "000.png", 1), ("crack", "001.png", 1), ("good", "000.png", 0),
        ("good", "001.png", 0), ("hole", "000.png", 1),
    ]
    for sample in category.test:
        if sample.label:
            expected = tree / "widget/ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"
            assert sample.mask_path == expected
        else:
            assert sample.mask_path is None
    assert category.has_masks and category.mask_coverage == "all"
    assert category.defect_types == ["crack", "hole"]
    assert load_category(tree, "widget") == category  # deterministic


def test_list_categories_is_sorted_and_ignores_hidden_entries(tree: Path):
    (tree / ".complete").touch()
    (tree / ".cache").mkdir()
    (tree / "license.txt").write_text("files beside categories are not categories")
    assert list_categories(tree) == ["gadget", "widget"]


def test_hidden_and_non_image_files_are_ignored(tree: Path):
    (tree / "widget/train/good/.DS_Store").write_bytes(b"\0\1")
    (tree / "widget/train/good/._000.png").write_bytes(b"resource fork, not an image")
    (tree / "widget/test/crack/notes.txt").write_text("x")
    (tree / "widget/ground_truth/crack/.DS_Store").write_bytes(b"\0")
    category = load_category(tree, "widget")
    assert len(category.train) == 3 and len(category.test) == 5
    validate_tree(tree)


def test_formats_grayscale_and_uppercase_extensions(tmp_path: Path):
    category = tmp_path / "mixed"
    write_image(category / "train/good/a.png", mode="L")
    write_image(category / "train/good/b.JPG")
    write_image(category / "train/good/c.bmp", mode="L")
    write_image(category / "train/good/d.JPEG")
    write_image(category / "test/good/e.PNG", mode="L")
    write_image(category / "test/scratch/f.Bmp")
    write_mask(category / "ground_truth/scratch/f_mask.png")
    loaded = load_category(tmp_path, "mixed")
    assert [p.name for p in loaded.train] == ["a.png", "b.JPG", "c.bmp", "d.JPEG"]
    assert [s.path.name for s in loaded.test] == ["e.PNG", "f.Bmp"] and loaded.has_masks
    for path in [*loaded.train, *(s.path for s in loaded.test)]:
        image = load_image(path, 16)
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert validate_tree(tmp_path)[0]["train_good"] == 4


def test_masks_may_be_named_like_their_image(tmp_path: Path):
    category = make_category(tmp_path, masks=False)
    write_mask(category / "ground_truth/crack/000.png")
    write_mask(category / "ground_truth/crack/001.png")
    write_mask(category / "ground_truth/hole/000.png")
    assert load_category(tmp_path, "widget").has_masks


def test_partial_and_missing_masks(tree: Path):
    (tree / "widget/ground_truth/hole/000_mask.png").unlink()
    widget = load_category(tree, "widget")
    assert not widget.has_masks and widget.mask_coverage == "partial"
    gadget = load_category(tree, "gadget")
    assert not gadget.has_masks and gadget.mask_coverage == "none"
    assert [s["masks"] for s in validate_tree(tree)] == ["none", "partial"]


# ----------------------------------------------------------------------------- pixels


def test_load_image_expands_grayscale_and_resizes(tmp_path: Path):
    values = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1))  # (20, 30)
    path = tmp_path / "gray.png"
    Image.fromarray(values).save(path)
    image = load_image(path, 24)
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert load_image(path, None).shape == (20, 30, 3)
    assert (load_image(path, None)[..., 0] == values).all()


def test_load_image_rescales_16_bit_grayscale(tmp_path: Path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    assert (load_image(path, 8) == 255).all()


def test_load_mask_is_bool_with_nearest_resize_and_label_ids(tmp_path: Path):
    values = np.zeros((8, 8), dtype=np.uint8)
    values[:4, :4] = 1
    values[4:, 4:] = 2
    path = tmp_path / "labels.png"
    Image.fromarray(values).save(path)
    mask = load_mask(path, None)
    assert mask.dtype == bool and mask.shape == (8, 8)
    assert (mask == (values > 0)).all()
    resized = load_mask(path, 16)
    assert resized.shape == (16, 16) and resized.sum() == 4 * mask.sum()  # nearest: no blur


def test_mask_for_good_defect_and_missing(tree: Path):
    (tree / "widget/ground_truth/hole/000_mask.png").unlink()
    samples = {(s.defect_type, s.path.stem): s for s in load_category(tree, "widget").test}
    good = mask_for(samples["good", "000"], 16)
    assert good.shape == (16, 16) and good.dtype == bool and not good.any()
    assert mask_for(samples["good", "000"], None).shape == (32, 32)
    crack = mask_for(samples["crack", "000"], 32)
    assert crack.sum() == 64 and crack[8:16, 8:16].all()
    with pytest.raises(DataError) as error:
        mask_for(samples["hole", "000"], 16)
    assert str(samples["hole", "000"].path) in str(error.value)
    assert "000_mask.png" in str(error.value)


def test_unreadable_files_raise_with_their_path(tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    for reader in (load_image, load_mask):
        with pytest.raises(DataError, match=str(broken)):
            reader(broken, 8)
    with pytest.raises(DataError, match=str(tmp_path / "absent.png")):
        load_image(tmp_path / "absent.png", 8)


# ----------------------------------------------------------------------------- validation


def test_validate_tree_summaries(tree: Path):
    write_mask(tree / "widget/ground_truth/hole/000_mask.png", box=(0, 0, 0, 0))  # an empty mask
    summaries = validate_tree(tree)
    assert summaries == [
        {"category": "gadget", "train_good": 3, "test_good": 2, "defects": {"crack": 2, "hole": 1},
         "masks": "none", "empty_masks": 0, "missing_mask_folders": []},
        {"category": "widget", "train_good": 3, "test_good": 2, "defects": {"crack": 2, "hole": 1},
         "masks": "all", "empty_masks": 1, "missing_mask_folders": []},
    ]
    assert [s["category"] for s in validate_tree(tree, ["widget"])] == ["widget"]


def test_a_mask_of_another_size_with_the_same_aspect_is_accepted_and_resized(tree: Path):
    write_mask(tree / "widget/ground_truth/crack/001_mask.png", size=(16, 16), box=(4, 4, 8, 8))
    assert validate_tree(tree, ["widget"])[0]["masks"] == "all"
    sample = next(s for s in load_category(tree, "widget").test if s.mask_path and s.path.stem == "001")
    assert mask_for(sample, 32).shape == (32, 32) and mask_for(sample, 32)[8:16, 8:16].all()


def test_format_info_table_aligns_columns(tree: Path):
    summaries = validate_tree(tree)
    summaries[0] = {**summaries[0], "category": "a_much_longer_category_name", "train_good": 1234}
    lines = format_info_table(summaries).splitlines()
    assert len(lines) == 2 + len(summaries)
    header = lines[0]
    for column in ("train good", "test good", "test defect"):
        end = header.index(column) + len(column)  # numbers are right-aligned under their label
        for row in lines[2:]:
            assert row[end - 1].isdigit() and row[end] == " "
    start = header.index("masks")
    assert [row[start:].split()[0] for row in lines[2:]] == ["none", "all"]


def _missing_train_good(root: Path) -> Path:
    path = root / "widget/train"
    for file in (path / "good").iterdir():
        file.unlink()
    (path / "good").rmdir()
    return path / "good"


def _empty_train_good(root: Path) -> Path:
    for file in (root / "widget/train/good").iterdir():
        file.unlink()
    (root / "widget/train/good/.DS_Store").touch()
    return root / "widget/train/good"


def _empty_defect_folder(root: Path) -> Path:
    (root / "widget/test/dent").mkdir()
    return root / "widget/test/dent"


def _unreadable_image(root: Path) -> Path:
    path = root / "widget/test/crack/001.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    return path


def _truncated_jpeg(root: Path) -> Path:
    path = root / "widget/train/good/003.jpg"
    write_image(path, size=(64, 64), value=(10, 200, 30))
    path.write_bytes(path.read_bytes()[:200])
    return path


def _mask_aspect_differs(root: Path) -> Path:
    return write_mask(root / "widget/ground_truth/crack/001_mask.png", size=(32, 16))


def _mask_without_image(root: Path) -> Path:
    return write_mask(root / "widget/ground_truth/crack/007_mask.png")


def _mask_folder_without_images(root: Path) -> Path:
    write_mask(root / "widget/ground_truth/dent/000_mask.png")
    return root / "widget/ground_truth/dent"


def _duplicate_stems(root: Path) -> Path:
    return write_image(root / "widget/test/crack/001.jpg")


def _unreadable_mask(root: Path) -> Path:
    path = root / "widget/ground_truth/hole/000_mask.png"
    path.write_bytes(b"not a mask")
    return path


@pytest.mark.parametrize("break_tree", [
    _missing_train_good, _empty_train_good, _empty_defect_folder, _unreadable_image, _truncated_jpeg,
    _mask_aspect_differs, _mask_without_image, _mask_folder_without_images, _duplicate_stems, _unreadable_mask,
])
def test_validate_tree_names_the_offending_path(tree: Path, break_tree):
    offending = break_tree(tree)
    with pytest.raises(DataError) as error:
        validate_tree(tree)
    assert str(offending) in str(error.value)


def test_root_problems(tmp_path: Path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        list_categories(tmp_path / "nowhere")
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        validate_tree(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".complete").touch()
    with pytest.raises(DataError, match=str(empty)):
        list_categories(empty)
    category = make_category(tmp_path / "root")
    with pytest.raises(DataError, match="single category"):
        list_categories(category)
    with pytest.raises(DataError, match=str(tmp_path / "root/absent")):
        validate_tree(tmp_path / "root", ["absent"])


def test_sample_is_immutable():
    sample = Sample(Path("x.png"), 0, "good", None)
    with pytest.raises(AttributeError):
        sample.label = 1


# ----------------------------------------------------------------------------- real data


@pytest.fixture
def real_ad() -> Path:
    if not REAL_AD or not Path(REAL_AD).is_dir():
        pytest.skip("set DECOFLOW_REAL_AD to an MVTec-layout tree with bottle and magnetic_tile to run this test")
    return Path(REAL_AD)


def test_real_ad_loads_and_validates(real_ad: Path):
    summaries = {s["category"]: s for s in validate_tree(real_ad, ["bottle", "magnetic_tile"])}
    assert summaries["bottle"] == {
        "category": "bottle", "train_good": 209, "test_good": 20,
        "defects": {"broken_large": 20, "broken_small": 22, "contamination": 21},
        "masks": "all", "empty_masks": 0,
    }
    tile = summaries["magnetic_tile"]
    assert (tile["train_good"], tile["test_good"], sum(tile["defects"].values())) == (400, 100, 392)
    assert tile["masks"] == "all"
    for name in ("bottle", "magnetic_tile"):
        category = load_category(real_ad, name)
        assert category.has_masks
        defect = next(s for s in category.test if s.label == 1)
        assert load_image(defect.path, 64).shape == (64, 64, 3)  # magnetic_tile is stored grayscale
        assert mask_for(defect, 64).any()
