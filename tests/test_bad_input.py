"""Bad input and real mistakes: one test per row of docs/bad_input.md. Nothing a user owns is
overwritten, no wrong result comes back with exit code 0, and every refusal is one `error:` line."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALL_TASKS, build_tiny_tree, error_line, run_argv
from PIL import Image

from decoflow_core import train
from decoflow_core.cli import main, resume_command
from decoflow_core.config import ConfigError, make_config
from decoflow_core.files import read_json


@pytest.fixture
def tree(tmp_path):
    """A tiny tree of its own, free to damage."""
    return build_tiny_tree(tmp_path / "tree")


def the_error(capsys) -> str:
    """The one ``error:`` line of stderr, which may also hold progress bars of the work before it."""
    lines = [part for line in capsys.readouterr().err.split("\n") for part in [line.split("\r")[-1]]]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    return errors[0]


def run_cli(tree, out, smoke_args, capsys, *, tasks=ALL_TASKS, extra=()):
    capsys.readouterr()
    return main(run_argv(tree, out, smoke_args, tasks=tasks, extra=extra))


# ----------------------------------------------------------------------------- data loss
def test_run_refuses_a_folder_that_is_not_a_run(tiny_tree, smoke_args, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("my work")
    (out / "config.json").write_text('{"not": "a run"}')
    assert run_cli(tiny_tree, out, smoke_args, capsys) == 2
    line = error_line(capsys)
    assert str(out) in line and "chapter1.tex" in line and "not a run of this kit" in line
    assert (out / "chapter1.tex").read_text() == "my work" and read_json(out / "config.json") == {"not": "a run"}
    assert run_cli(tiny_tree, out, smoke_args, capsys, extra=["--resume"]) == 2  # --resume does not change that


def test_score_maps_never_collide_and_are_never_replaced_silently(run_method, tiny_tree, tmp_path, capsys):
    run = run_method("decoflow")
    same_name = [tiny_tree / "checker/test/good/000.png", tiny_tree / "checker/test/bright_square/000.png"]
    out = tmp_path / "maps"
    capsys.readouterr()
    assert main(["score", "--run", str(run), "--out", str(out), *map(str, same_name)]) == 0
    maps = [line.split("\t")[5] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert len(set(maps)) == 2 and all(Path(m).exists() for m in maps)
    assert main(["score", "--run", str(run), "--out", str(out), *map(str, same_name)]) == 2
    assert "already exist" in error_line(capsys)
    assert main(["score", "--run", str(run), "--out", str(out), "--overwrite", *map(str, same_name)]) == 0


# ----------------------------------------------------------------------------- silent wrong results
def test_resume_on_other_data_is_refused(tree, smoke_args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(train, "evaluate_task", _crash_on(ALL_TASKS[-1], train.evaluate_task))
    with pytest.raises(_Crash):
        run_cli(tree, out, smoke_args, capsys)
    capsys.readouterr()
    monkeypatch.undo()
    other = build_tiny_tree(tmp_path / "other")
    shutil.copy(other / "checker/train/good/001.png", other / "checker/train/good/000.png")  # other images
    assert run_cli(other, out, smoke_args, capsys, extra=["--resume"]) == 2
    line = error_line(capsys)
    assert "checker" in line and "differ" in line and str(tree) in line
    assert run_cli(tree, out, smoke_args, capsys, extra=["--resume"]) == 0  # the same data resumes


def crashed_after_the_first_task(tree, smoke_args, out, capsys, monkeypatch) -> None:
    """A run into ``out`` that crashes while evaluating its second task: the first task is committed."""
    monkeypatch.setattr(train, "evaluate_task", _crash_on(ALL_TASKS[1], train.evaluate_task))
    with pytest.raises(_Crash):
        run_cli(tree, out, smoke_args, capsys)
    capsys.readouterr()
    monkeypatch.undo()


def test_score_on_an_unfinished_run_needs_allow_partial(tree, smoke_args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    crashed_after_the_first_task(tree, smoke_args, out, capsys, monkeypatch)
    image = str(tree / "noise/test/good/000.png")
    assert main(["score", "--run", str(out), "--out", str(tmp_path / "maps"), image]) == 2
    line = error_line(capsys)
    assert "1 of 3 tasks" in line and "checker" in line and "--allow-partial" in line
    assert main(["score", "--run", str(out), "--out", str(tmp_path / "maps"), "--allow-partial", image]) == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[2] == "checker"  # the only task it knows


@pytest.mark.parametrize("pair, named", [
    ("epochs=0", "epochs"), ("lr=0", "lr"), ("lr=-1e-3", "lr"), ("lr=nan", "lr"), ("lr=inf", "lr"),
    ("rank=0", "rank"), ("batch_size=0", "batch_size"), ("top_k=0", "top_k"), ("top_k=1.5", "top_k"),
    ("lambda_tail=-0.1", "lambda_tail"), ("lambda_tail=2", "lambda_tail"), ("score_mode=median", "topk"),
    ("router_metric=cosine", "mahalanobis"), ("device=gpu", "cuda"), ("task_lr=nan", "task_lr"),
])
def test_nonsense_settings_are_refused_before_any_feature_is_extracted(tiny_tree, smoke_args, tmp_path, capsys,
                                                                        pair, named):
    cache = tmp_path / "cache"
    extra = ["--set", pair, "--set", f"feature_cache={cache}"]
    assert run_cli(tiny_tree, tmp_path / "run", smoke_args, capsys, extra=extra) == 2
    line = error_line(capsys)
    assert f"--set {pair.split('=')[0]}=" in line and named in line
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_a_shared_router_covariance_needs_the_ledoit_wolf_mahalanobis_router():
    for other in ({"router_shrinkage": "none"}, {"router_metric": "euclidean"}):
        with pytest.raises(ConfigError, match="--set router_covariance=shared: needs router_metric=mahalanobis"):
            make_config("cpu", {"router_covariance": "shared", **other})
    assert make_config("cpu", {"router_covariance": "shared"}).router_covariance == "shared"


def test_a_diverging_task_stops_with_what_to_try_and_resumes_with_a_lower_lr(tree, smoke_args, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "run"
    real_loss = train.training_loss

    def nan_at_high_lr(model, x, config):  # a stand-in for a learning rate that is too high
        loss = real_loss(model, x, config)
        return loss * float("nan") if config.lr > 5e-3 else loss

    monkeypatch.setattr(train, "training_loss", nan_at_high_lr)
    assert run_cli(tree, out, smoke_args, capsys, extra=["--set", "task_lr=1e-2"]) == 2
    line = the_error(capsys)
    assert "'gradient' diverged" in line and "epoch 1" in line and "lr 0.01" in line and "task_lr" in line
    progress = read_json(out / "progress.json")
    assert progress["done"] == 1 and progress["diverged"]["task"] == "gradient"  # checker is kept
    assert run_cli(tree, out, smoke_args, capsys, extra=["--set", "task_lr=1e-3", "--resume"]) == 0
    meta = read_json(out / "config.json")
    assert meta["changes"] == [{"from_task": "gradient", "fields": {"task_lr": 1e-3}}]
    assert read_json(out / "metrics.json")["tasks"] == ALL_TASKS
    assert run_cli(tree, tmp_path / "again", smoke_args, capsys, extra=["--set", "epochs=2"]) == 0
    assert run_cli(tree, tmp_path / "again", smoke_args, capsys, extra=["--set", "epochs=3", "--resume"]) == 2
    assert "epochs differ" in error_line(capsys)  # only a run that stopped on divergence may change its lr


def _damage_a_png_chunk(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the first data chunk: its CRC no longer matches
    path.write_bytes(bytes(data))


def test_run_and_info_give_a_damaged_png_the_same_verdict(tree, smoke_args, tmp_path, capsys):
    damaged = tree / "gradient/train/good/003.png"
    _damage_a_png_chunk(damaged)
    assert main(["info", "--data", str(tree)]) == 2
    info_line = error_line(capsys)
    assert run_cli(tree, tmp_path / "run", smoke_args, capsys) == 2
    run_line = error_line(capsys)
    assert str(damaged) in info_line and str(damaged) in run_line
    assert not (tmp_path / "run" / "progress.json").exists()


def test_a_mask_with_another_aspect_ratio_is_refused_by_info_and_run(tree, smoke_args, tmp_path, capsys):
    mask = next((tree / "checker/ground_truth").rglob("*_mask.png"))
    Image.fromarray(np.zeros((64, 32), dtype=np.uint8)).save(mask)
    assert main(["info", "--data", str(tree)]) == 2
    assert "aspect ratio" in error_line(capsys)
    assert run_cli(tree, tmp_path / "run", smoke_args, capsys) == 2
    assert str(mask) in error_line(capsys)


def test_a_defect_type_without_its_mask_folder_is_named(tree, smoke_args, tmp_path, capsys):
    shutil.rmtree(tree / "checker/ground_truth/bright_square")
    (tree / "checker/test/scratch").mkdir()
    shutil.copy(tree / "checker/test/bright_square/000.png", tree / "checker/test/scratch/000.png")
    scratch_mask = tree / "checker/ground_truth/scratch"
    scratch_mask.mkdir(parents=True)
    Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(scratch_mask / "000_mask.png")
    assert main(["info", "--data", str(tree)]) == 0
    assert str(tree / "checker/ground_truth/bright_square") in capsys.readouterr().out
    assert run_cli(tree, tmp_path / "run", smoke_args, capsys) == 0
    captured = capsys.readouterr()
    assert "task 'checker'" in captured.err and "bright_square" in captured.err and "pixel AUROC" in captured.err
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["mean_over"]["pixel_auroc"] == 1  # only gradient has every mask ("noise" has none)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "(1/3)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["bottle.v2", "train"])
def test_a_category_name_the_model_cannot_hold_is_refused_by_info_and_run(tree, smoke_args, tmp_path, capsys, name):
    (tree / "checker").rename(tree / name)
    assert main(["info", "--data", str(tree)]) == 2
    info_line = error_line(capsys)
    assert run_cli(tree, tmp_path / "run", smoke_args, capsys, tasks=[name, "gradient"]) == 2
    run_line = error_line(capsys)
    assert name in info_line and info_line.split(": ", 2)[2] == run_line.split(": ", 2)[2]  # one rule
    assert not (tmp_path / "run" / "progress.json").exists()


# ----------------------------------------------------------------------------- clear errors
def test_out_on_a_file_or_where_nothing_can_be_written(tiny_tree, smoke_args, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    assert run_cli(tiny_tree, a_file, smoke_args, capsys) == 2
    assert "is a file" in error_line(capsys) and a_file.read_text() == "keep me"
    assert run_cli(tiny_tree, a_file / "run", smoke_args, capsys) == 2
    assert "cannot write there" in error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(tiny_tree, smoke_args, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert run_cli(tiny_tree, locked / "run", smoke_args, capsys) == 2
        assert "cannot write there" in error_line(capsys)
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tiny_tree, smoke_args, tmp_path, capsys):
    assert run_cli(tiny_tree, tmp_path / "run", smoke_args, capsys, extra=["--set", "device=cuda"]) == 2
    assert "no CUDA GPU" in error_line(capsys)


def test_report_on_what_is_not_a_finished_run(run_method, tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in error_line(capsys)
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run of this kit" in error_line(capsys)
    damaged = tmp_path / "damaged"
    shutil.copytree(run_method("decoflow"), damaged)
    (damaged / "metrics.json").write_text('{"method": "deco')
    assert main(["report", str(damaged)]) == 2
    assert str(damaged / "metrics.json") in error_line(capsys)


def test_report_with_one_unfinished_run_reports_the_others(run_method, tree, smoke_args, tmp_path, capsys,
                                                           monkeypatch):
    unfinished = tmp_path / "unfinished"
    crashed_after_the_first_task(tree, smoke_args, unfinished, capsys, monkeypatch)
    assert main(["report", str(run_method("decoflow")), str(unfinished)]) == 1
    out = capsys.readouterr().out
    assert "| run " in out and "decoflow" in out and "unfinished: not in the table" in out and "--resume" in out


def test_score_with_one_bad_path_scores_the_others(run_method, tiny_tree, tmp_path, capsys):
    good = tiny_tree / "checker/test/good/001.png"
    missing, broken = tmp_path / "nope.png", tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    capsys.readouterr()
    argv = ["score", "--run", str(run_method("decoflow")), "--out", str(tmp_path / "maps"), "--json"]
    assert main([*argv, str(missing), str(good), str(broken)]) == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [("error" in r) for r in records] == [True, False, True]
    assert set(records[1]) == {"image", "task", "nearest", "distance", "score", "map"}
    assert Path(records[1]["map"]).exists()
    assert captured.err.startswith("error: 2 of 3 image(s)")


def test_a_task_list_with_spaces(tiny_tree, smoke_args, tmp_path, capsys):
    capsys.readouterr()
    argv = run_argv(tiny_tree, tmp_path / "run", smoke_args, tasks=["checker", " gradient"])
    argv[argv.index("--tasks") + 1] = "checker, gradient"
    assert main(argv) == 0
    assert read_json(tmp_path / "run" / "metrics.json")["tasks"] == ["checker", "gradient"]


def test_ctrl_c_says_how_to_continue(tiny_tree, smoke_args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_task", interrupt)
    assert run_cli(tiny_tree, out, smoke_args, capsys) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip()]
    assert lines[-1].startswith("interrupted:") and "--resume" in lines[-1] and "Traceback" not in err
    assert resume_command(["run", "--out", "x"]) == "python -m decoflow_core run --out x --resume"


def test_a_killed_write_leaves_no_temporary_file_after_resume(tree, smoke_args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    crashed_after_the_first_task(tree, smoke_args, out, capsys, monkeypatch)
    leftover = out / "checkpoints" / ".task_01_gradient.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert run_cli(tree, out, smoke_args, capsys, extra=["--resume"]) == 0
    assert not leftover.exists()


def test_an_error_line_starts_its_own_line_after_progress_bars(tree, smoke_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "training_loss", lambda model, x, config: torch.tensor(float("nan"),
                                                                                     requires_grad=True))
    assert run_cli(tree, tmp_path / "run", smoke_args, capsys) == 2
    err = capsys.readouterr().err
    assert any(line.split("\r")[-1].startswith("error: task 'checker' diverged") for line in err.split("\n"))


# ----------------------------------------------------------------------------- helpers
class _Crash(Exception):
    pass


def _crash_on(task, evaluate):
    """evaluate_task that crashes (as a killed process would) when it reaches ``task``."""
    def crashing(learner, data, config, **kwargs):
        if data.name == task:
            raise _Crash
        return evaluate(learner, data, config, **kwargs)
    return crashing


def test_a_bad_stream_fails_before_training_with_one_line(tiny_tree, smoke_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_argv(tiny_tree, out, smoke_args, tasks=["checker+gradient", "noise"],
                         extra=["--order", "alphabetical"])) == 2
    assert "drop --scenario and --order" in error_line(capsys)
    assert not out.exists()
    assert main(run_argv(tiny_tree, out, smoke_args, extra=["--order", "hard-first"])) == 2  # an MVTec preset
    assert "hard-first is defined for" in error_line(capsys)
    assert main(run_argv(tiny_tree, out, smoke_args, extra=["--scenario", "2-2", "--set", "scenario=1-1"])) == 2
    assert "disagree" in error_line(capsys)
    assert main(run_argv(tiny_tree, out, smoke_args, extra=["--scenario", "3"])) == 2
    assert "--scenario 3: expected B-I" in error_line(capsys)
    assert main(run_argv(tiny_tree, out, smoke_args, tasks=["checker+gradient", "checker"])) == 2
    assert "checker appear(s) twice" in error_line(capsys)
    assert not out.exists()
