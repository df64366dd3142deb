"""Properties of the embedded benchmark: layout, counts, masks, determinism, safe writing."""
import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from decoflow_core.datasets import embedded
from decoflow_core.datasets.embedded import EMBEDDED_CATEGORIES, build_embedded

SMALL = ("grass", "screw")      # one texture, one object: a build of these takes a few seconds


def tree_hash(root):
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def full_build(tmp_path_factory):
    return build_embedded(tmp_path_factory.mktemp("full") / "embedded", seed=0, progress=False)


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = build_embedded(tmp_path / "a", seed=3, progress=False, categories=SMALL)
    b = build_embedded(tmp_path / "b", seed=3, progress=False, categories=SMALL)
    assert tree_hash(a) == tree_hash(b)


def test_other_seed_gives_other_files(tmp_path):
    a = build_embedded(tmp_path / "a", seed=3, progress=False, categories=SMALL)
    b = build_embedded(tmp_path / "b", seed=4, progress=False, categories=SMALL)
    assert tree_hash(a / "grass") != tree_hash(b / "grass")
    assert tree_hash(a / "screw") != tree_hash(b / "screw")


def test_subset_build_matches_full_build(tmp_path, full_build):
    subset = build_embedded(tmp_path / "subset", seed=0, progress=False, categories=SMALL)
    for name in SMALL:
        assert tree_hash(subset / name) == tree_hash(full_build / name)


def test_fifteen_sorted_snake_case_categories(full_build):
    assert len(EMBEDDED_CATEGORIES) == 15
    assert list(EMBEDDED_CATEGORIES) == sorted(EMBEDDED_CATEGORIES)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", name) for name in EMBEDDED_CATEGORIES)
    assert sorted(p.name for p in full_build.iterdir() if p.is_dir()) == list(EMBEDDED_CATEGORIES)


@pytest.mark.parametrize("name", EMBEDDED_CATEGORIES)
def test_full_build_counts(full_build, name):
    cat = full_build / name
    assert len(list((cat / "train" / "good").glob("*.png"))) >= 150
    assert len(list((cat / "test" / "good").glob("*.png"))) >= 30
    defects = [d for d in (cat / "test").iterdir() if d.name != "good"]
    assert len(defects) >= 2
    for folder in defects:
        assert len(list(folder.glob("*.png"))) >= 15, folder


@pytest.mark.parametrize("name", EMBEDDED_CATEGORIES)
def test_every_defect_image_has_a_matching_nonempty_mask(full_build, name):
    cat = full_build / name
    for image_path in (cat / "test").glob("*/*.png"):
        if image_path.parent.name == "good":
            continue
        mask_path = cat / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
        image, mask = Image.open(image_path), Image.open(mask_path)
        assert mask.mode == "L" and mask.size == image.size == (embedded.SIZE, embedded.SIZE)
        values = np.asarray(mask)
        assert set(np.unique(values)) == {0, 255}, mask_path


@pytest.mark.parametrize("name", EMBEDDED_CATEGORIES)
def test_good_images_have_no_mask_and_no_mask_is_orphaned(full_build, name):
    cat = full_build / name
    assert not (cat / "ground_truth" / "good").exists()
    for mask_path in (cat / "ground_truth").glob("*/*_mask.png"):
        assert (cat / "test" / mask_path.parent.name / mask_path.name.replace("_mask", "")).exists()


@pytest.mark.parametrize("name", EMBEDDED_CATEGORIES)
def test_train_images_differ_from_each_other(full_build, name):
    train = list((full_build / name / "train" / "good").glob("*.png"))
    assert len({p.read_bytes() for p in train}) == len(train)


def test_full_build_fits_the_size_budget(full_build):
    assert sum(p.stat().st_size for p in full_build.rglob("*") if p.is_file()) < 60e6


def test_marker_records_the_build(full_build):
    marker = json.loads((full_build / embedded.MARKER).read_text())
    assert marker["seed"] == 0
    assert marker["format_version"] == embedded.FORMAT_VERSION
    assert marker["categories"] == list(EMBEDDED_CATEGORIES)


def test_complete_build_is_reused_untouched(full_build):
    before = (full_build / embedded.MARKER).stat().st_mtime_ns
    assert build_embedded(full_build, seed=0, progress=False) == full_build
    assert (full_build / embedded.MARKER).stat().st_mtime_ns == before


def test_other_seed_replaces_an_earlier_build(tmp_path):
    out = build_embedded(tmp_path / "emb", seed=1, progress=False, categories=["screw"])
    build_embedded(out, seed=2, progress=False, categories=["screw"])
    assert json.loads((out / embedded.MARKER).read_text())["seed"] == 2


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_write = embedded._write_category

    def write_then_fail(root, name, seed, family="embedded"):
        real_write(root, name, seed, family)
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_write_category", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_embedded(tmp_path / "emb", seed=0, progress=False, categories=SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no .complete marker"):
        build_embedded(tmp_path / "emb", seed=0, progress=False, categories=["screw"])
    assert (tmp_path / "emb" / "notes.txt").exists()


def test_unknown_category_is_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match="toaster"):
        build_embedded(tmp_path / "emb", categories=["toaster"])


def test_boards_are_four_look_alike_designs_of_the_circuit_board(tmp_path):
    """The `boards` family: four categories in the usual layout; each design differs from the embedded
    circuit board (board_a) in a small part of the image only."""
    root = build_embedded(tmp_path / "boards", seed=0, progress=False, family="boards")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["board_a", "board_b", "board_c", "board_d"]
    for design in ("board_a", "board_b", "board_c", "board_d"):
        assert len(list((root / design / "train" / "good").glob("*.png"))) == 150
        assert sorted(p.name for p in (root / design / "ground_truth").iterdir()) == [
            "broken_trace", "misplaced_part", "missing_part"]
    reference = embedded._pcb_board(design="board_a")
    for design in ("board_b", "board_c", "board_d"):
        changed = np.abs(embedded._pcb_board(design=design) - reference).max(-1) > 0.1
        assert 0.003 < changed.mean() < 0.05, design
    with pytest.raises(ValueError, match="unknown family 'cables'"):
        build_embedded(tmp_path / "x", family="cables")
    with pytest.raises(ValueError, match="unknown boards categories"):
        build_embedded(tmp_path / "x", family="boards", categories=["grass"])
