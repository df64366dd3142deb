"""The command line: bad arguments, info, report, score and --set parsing."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_TASKS, TWO_TASKS, error_line, read_json, run_argv
from PIL import Image

from decoflow_core.cli import main, parse_sets
from decoflow_core.config import ConfigError, make_config

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("extra, named", [
    (["--tasks", "checker,widget"], "widget"),
    (["--tasks", "checker,checker"], "twice"),
    (["--method", "bogus"], "bogus"),
    (["--profile", "turbo"], "turbo"),
    (["--set", "epoch=3"], "'epoch'"),
    (["--set", "epochs=three"], "epochs=three"),
    (["--set", "use_tsa=maybe"], "use_tsa=maybe"),
    (["--set", "epochs"], "key=value"),
    (["--data", "{tmp}/no_such_root"], "no_such_root"),
    (["--data", "{tmp}/a_file.txt"], "a_file.txt"),
], ids=["unknown-task", "repeated-task", "unknown-method", "unknown-profile", "unknown-set-key",
        "set-not-an-int", "set-not-a-bool", "set-without-equals", "missing-data", "data-is-a-file"])
def test_bad_run_arguments_exit_2_with_one_line_naming_the_problem(extra, named, tiny_tree, smoke_args,
                                                                   tmp_path, capsys):
    (tmp_path / "a_file.txt").write_text("not a data tree")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    out = tmp_path / "out"
    assert main(run_argv(tiny_tree, out, smoke_args, tasks=["checker"]) + extra) == 2
    assert named in error_line(capsys)
    assert not (out / "progress.json").exists()


def test_module_entry_point_exits_2_with_a_one_line_error(tiny_tree, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "decoflow_core", "run", "--data", str(tiny_tree), "--method", "bogus",
         "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bogus" in lines[0]


def test_info_prints_every_category_and_its_mask_coverage(tiny_tree, capsys):
    assert main(["info", "--data", str(tiny_tree)]) == 0
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
    assert set(table) == set(ALL_TASKS)
    assert "none" in table["noise"].split() and "all" in table["checker"].split()


def _truncate_a_test_image(root: Path) -> Path:
    victim = root / "gradient" / "test" / "good" / "001.png"
    victim.write_bytes(victim.read_bytes()[:40])
    return victim


def _drop_train_good(root: Path) -> Path:
    victim = root / "gradient" / "train" / "good"
    shutil.rmtree(victim)
    return victim


@pytest.mark.parametrize("breakage", [_truncate_a_test_image, _drop_train_good], ids=["truncated-png", "no-train-good"])
def test_info_on_a_broken_tree_fails_naming_the_path(breakage, tiny_tree, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(tiny_tree / "gradient", root / "gradient")
    victim = breakage(root)
    assert main(["info", "--data", str(root)]) != 0
    assert str(victim) in error_line(capsys)


# ----------------------------------------------------------------------------- report and score


def test_report_lists_each_run_with_its_method(run_method, capsys):
    runs = [run_method("decoflow"), run_method("finetune", tasks=TWO_TASKS), run_method("joint", tasks=TWO_TASKS)]
    capsys.readouterr()
    assert main(["report", *map(str, runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:2 + len(runs)]]
    assert [row[1] for row in rows] == ["decoflow", "finetune", "joint"]
    assert [row[2] for row in rows] == ["3", "2", "2"]
    assert any("joint is a reference, not continual" in line for line in lines)


def test_score_routes_each_image_and_writes_its_anomaly_map(run_method, tiny_tree, tmp_path, capsys):
    out = run_method("decoflow")
    images = [tiny_tree / "gradient" / "test" / "dark_line" / "000.png",
              tiny_tree / "checker" / "test" / "good" / "000.png"]
    capsys.readouterr()
    assert main(["score", "--run", str(out), "--out", str(tmp_path / "maps"), *map(str, images)]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header.split("\t") == ["image", "task", "nearest", "distance", "score", "map"]
    assert [line.split("\t")[2] for line in lines] == ["gradient", "checker"]
    for line, image in zip(lines, images):
        path, _, _, distance, score, target = line.split("\t")
        assert math.isfinite(float(score)) and float(distance) >= 0
        with Image.open(target) as written:
            assert written.format == "PNG" and written.size == (64, 64) and written.mode == "RGB"
        # the map keeps the image's path below the images' common folder
        assert Path(target) == tmp_path / "maps" / image.relative_to(tiny_tree).with_name("000_map.png")


# ----------------------------------------------------------------------------- --set parsing


@pytest.mark.parametrize("pair, key, expected", [
    ("use_tsa=false", "use_tsa", False),
    ("use_tsa=YES", "use_tsa", True),
    ("task_agnostic=0", "task_agnostic", False),
    ("epochs=3", "epochs", 3),
    (" epochs = 5 ", "epochs", 5),
    ("lr=1e-3", "lr", 0.001),
    ("hidden_ratio=1", "hidden_ratio", 1.0),
    ("feature_dim=None", "feature_dim", None),
    ("feature_dim=256", "feature_dim", 256),
    ("router_shrinkage=null", "router_shrinkage", None),
    ("backbone_weights=/w/lite0=v2.pth", "backbone_weights", "/w/lite0=v2.pth"),
])
def test_set_values_are_parsed_by_the_field_type(pair, key, expected):
    config = make_config("smoke", parse_sets([pair]))
    value = getattr(config, key)
    assert value == expected and type(value) is type(expected)
    assert config.n_dcs == 2  # the profile's other values stay


@pytest.mark.parametrize("pair, expected_type", [("use_tsa=maybe", "bool"), ("epochs=2.5", "int"),
                                                 ("lr=fast", "float")])
def test_set_values_of_the_wrong_type_are_refused(pair, expected_type):
    with pytest.raises(ConfigError, match=f"expected a {expected_type}"):
        make_config("smoke", parse_sets([pair]))


def test_none_is_refused_for_a_field_that_cannot_be_none():
    with pytest.raises(ConfigError, match="epochs"):
        make_config("smoke", {"epochs": "none"})


# ----------------------------------------------------------------------------- select (validation NLL)




def test_score_calls_a_category_the_run_never_learned_unknown(run_method, tiny_tree, tmp_path, capsys):
    """Trained on checker and gradient: the held-out category `noise` is unknown, their own good
    test images are not."""
    run = run_method("decoflow", tasks=["checker", "gradient"])
    unseen = sorted((tiny_tree / "noise" / "test").rglob("*.png"))
    known = sorted((tiny_tree / "checker" / "test" / "good").glob("*.png"))
    capsys.readouterr()
    assert main(["score", "--run", str(run), "--out", str(tmp_path / "maps"), "--json", *map(str, unseen + known)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    flagged = [r["task"] == "unknown" for r in records]
    assert np.mean(flagged[:len(unseen)]) >= 0.9 and np.mean(flagged[len(unseen):]) <= 0.25
    assert all(r["nearest"] in ("checker", "gradient") and math.isfinite(r["score"]) for r in records)
    metrics = read_json(run / "metrics.json")
    assert set(metrics["unknown"]) == {"checker", "gradient"} and metrics["routed_elsewhere"]["checker"] == 0.0


def test_prepare_boards_builds_the_look_alike_designs(tmp_path, capsys):
    out = tmp_path / "boards"
    assert main(["prepare", "boards", "--out", str(out)]) == 0
    assert "boards data ready at" in capsys.readouterr().out
    assert main(["info", "--data", str(out)]) == 0
    assert "board_d" in capsys.readouterr().out
