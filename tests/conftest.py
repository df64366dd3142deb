"""Shared fixtures: a tiny MVTec-layout tree and the overrides that make runs take seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 64
N_TRAIN, N_TEST_GOOD, N_DEFECT = 12, 4, 4
# category -> (defect type, whether ground_truth masks are written)
TINY_CATEGORIES = {"checker": ("bright_square", True), "gradient": ("dark_line", True),
                   "noise": ("bright_square", False)}
TINY_TEST_COUNT = N_TEST_GOOD + N_DEFECT


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Two cores are shared with other work; one thread avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _normal_image(category: str, rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) float in [0, 1]: one normal instance, with small per-image variation."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    if category == "gradient":
        angle = rng.uniform(0, np.pi / 2)
        ramp = np.cos(angle) * x + np.sin(angle) * y
        image = np.stack([0.2 + 0.6 * ramp, 0.3 + 0.4 * ramp, 0.8 - 0.5 * ramp], axis=-1)
    elif category == "checker":
        cell = 8
        dy, dx = rng.integers(0, 2, size=2)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        board = (((yy + dy) // cell + (xx + dx) // cell) % 2).astype(np.float32)
        image = np.stack([0.1 + 0.8 * board] * 3, axis=-1) * np.array([1.0, 0.9, 0.7], np.float32)
    elif category == "noise":
        image = rng.uniform(0.3, 0.7, size=(SIZE, SIZE, 3)).astype(np.float32) * np.array([0.6, 1.0, 0.5], np.float32)
    else:
        raise ValueError(category)
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05)
    return np.clip(gain * image + offset + rng.normal(0, 0.01, size=image.shape), 0, 1)


def _defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect; its mask is exactly the painted pixels."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if kind == "bright_square":
        top, left = rng.integers(8, SIZE - 18, size=2)
        mask[top:top + 10, left:left + 10] = True
        image = image.copy()
        image[mask] = [1.0, 1.0, 0.2]
    elif kind == "dark_line":
        row = rng.integers(10, SIZE - 14)
        mask[row:row + 2, 20:SIZE - 20] = True
        image = image.copy()
        image[mask] = 0.0
    else:
        raise ValueError(kind)
    return image, mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        Image.fromarray(array.astype(np.uint8) * 255).save(path)
    else:
        Image.fromarray((array * 255).round().astype(np.uint8)).save(path)


def build_tiny_tree(root: Path) -> Path:
    """Three visually different categories; 'noise' has defects but no ground_truth folder."""
    for index, (category, (defect, with_masks)) in enumerate(sorted(TINY_CATEGORIES.items())):
        rng = np.random.default_rng(1000 + index)
        base = root / category
        for i in range(N_TRAIN):
            _save(_normal_image(category, rng), base / "train/good" / f"{i:03d}.png")
        for i in range(N_TEST_GOOD):
            _save(_normal_image(category, rng), base / "test/good" / f"{i:03d}.png")
        for i in range(N_DEFECT):
            image, mask = _defect(_normal_image(category, rng), defect, rng)
            _save(image, base / "test" / defect / f"{i:03d}.png")
            if with_masks:
                _save(mask, base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """A small deterministic MVTec-layout tree (see TINY_CATEGORIES); treat it as read-only."""
    return build_tiny_tree(tmp_path_factory.mktemp("tiny_tree"))


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory) -> Path:
    """One feature cache for the session, so the backbone runs once per category."""
    return tmp_path_factory.mktemp("feature_cache")


@pytest.fixture(scope="session")
def smoke_args(smoke_cache) -> list[str]:
    """CLI arguments for runs that take seconds on a CPU: the smoke profile at 64 px.

    The grid stays the paper's 14: the backbone's 8x8 and 4x4 maps at 64 px are adaptively pooled up to it.
    """
    sets = {"feature_cache": str(smoke_cache), "image_size": 64,
            "device": "cpu", "num_threads": 1}
    args = ["--profile", "smoke"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


# ----------------------------------------------------------------------------- runs through the CLI
# the keys of a run's metrics.json
REQUIRED_KEYS = {"method", "tasks", "final", "mean", "forgetting", "bwt", "routing_accuracy", "params", "seconds"}
DOCUMENTED_EXTRA_KEYS = {"oracle", "validation", "final_by_defect", "history", "breaks_no_replay", "continual", "backbone",
                         "weight_source", "mean_over", "routed_elsewhere", "unknown", "task_classes", "final_by_class",
                         "mean_by_class", "class_routing_accuracy"}
ALL_TASKS = ["checker", "gradient", "noise"]  # "noise" is the category without masks
TWO_TASKS = ["gradient", "noise"]


def run_argv(data, out, smoke_args, *, method="decoflow", tasks=ALL_TASKS, extra=()) -> list[str]:
    return ["run", "--data", str(data), "--tasks", ",".join(tasks), "--method", method, "--seed", "0",
            "--out", str(out), *smoke_args, *extra]


@pytest.fixture(scope="session")
def run_method(tiny_tree, smoke_args, tmp_path_factory):
    """run_method(method, tasks, extra) -> run directory, trained on first request only."""
    from decoflow_core.cli import main
    done = {}

    def _run(method="decoflow", tasks=ALL_TASKS, extra=()):
        key = (method, tuple(tasks), tuple(extra))
        if key not in done:
            out = tmp_path_factory.mktemp(f"run-{method}") / "run"
            assert main(run_argv(tiny_tree, out, smoke_args, method=method, tasks=tasks, extra=extra)) == 0
            done[key] = out
        return done[key]

    return _run


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_matrix(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """(column names, row names, cells as written) of one of the run's CSV matrices."""
    header, *lines = path.read_text().strip().splitlines()
    rows = [line.split(",") for line in lines]
    return header.split(",")[1:], [r[0] for r in rows], [r[1:] for r in rows]


def error_line(capsys) -> str:
    """The whole of stderr, which must be exactly one ``error: ...`` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
