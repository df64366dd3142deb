"""The run cache and selection on held-out data (analysis/runs.py), and `select` through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import error_line, read_json

from decoflow_core import config as config_module
from decoflow_core import train
from decoflow_core.analysis import runs
from decoflow_core.cli import main
from decoflow_core.config import make_config

REPO = Path(__file__).resolve().parents[1]


def test_select_cli_chooses_the_lowest_validation_nll_and_writes_its_table(tiny_tree, smoke_args, tmp_path, capsys):
    argv = ["select", "--data", str(tiny_tree), "--tasks", "checker,gradient", "--grid", "task_lr=0.001,0.01",
            "--val-fraction", "0.25", "--workers", "1", "--out", str(tmp_path), *smoke_args]
    assert main(argv) == 0
    table = (tmp_path / tiny_tree.name / "selection-decoflow-task_lr.csv").read_text().strip().splitlines()
    assert table[0] == "task_lr,mean_val_nll,mean_val_synthetic_auroc,run,chosen" and len(table) == 3
    rows = [line.split(",") for line in table[1:]]
    assert [r[0] for r in rows] == ["0.001", "0.01"] and [r[4] for r in rows].count("True") == 1
    nll = {r[0]: float(r[1]) for r in rows}
    chosen = min(nll, key=nll.get)
    assert dict((r[0], r[4]) for r in rows)[chosen] == "True"
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)  # the synthetic-defect AUROC is recorded too
    assert f"chosen by validation NLL: task_lr={chosen}" in capsys.readouterr().out
    for r in rows:  # each candidate is an ordinary run directory that held 25% of train/good out
        config = read_json(Path(r[3]) / "config.json")["config"]
        assert config["val_fraction"] == 0.25 and config["task_lr"] == float(r[0])


def test_select_reads_only_validation_nll_and_never_picks_a_diverged_run(monkeypatch, tmp_path):
    nll = {"a": 0.5, "b": float("nan"), "c": float("-inf"), "d": 0.2, "e": float("inf")}
    monkeypatch.setattr(runs, "ensure_runs", lambda root, jobs, workers, executor=None: [
        Path(job["sets"]["x"]) for job in jobs])
    # no test metrics in these runs at all: selection cannot read them
    monkeypatch.setattr(runs, "load_metrics", lambda d: {"validation": {"mean_patch_nll": nll[str(d)]}})
    best, rows = runs.select(tmp_path, "decoflow", {"x": list(nll)})
    assert best["x"] == "d" and [r["chosen"] for r in rows] == [False, False, False, True, False]
    monkeypatch.setattr(runs, "load_metrics", lambda d: {"validation": {"mean_patch_nll": float("nan")}})
    with pytest.raises(ValueError, match="finite mean_patch_nll"):
        runs.select(tmp_path, "decoflow", {"x": ["a", "b"]})


def test_select_by_synthetic_defects_takes_the_highest_auroc_and_skips_unscored_runs(monkeypatch, tmp_path):
    auroc = {"a": 0.7, "b": float("nan"), "c": 0.9, "d": None, "e": 0.8}
    monkeypatch.setattr(runs, "ensure_runs", lambda root, jobs, workers, executor=None: [
        Path(job["sets"]["x"]) for job in jobs])
    monkeypatch.setattr(runs, "load_metrics", lambda d: {"validation": {
        "mean_patch_nll": -ord(str(d)), "mean_synthetic_auroc": auroc[str(d)]}})  # NLL would pick "e"
    best, rows = runs.select(tmp_path, "decoflow", {"x": list(auroc)}, criterion="synthetic")
    assert best["x"] == "c" and [r["chosen"] for r in rows] == [False, False, True, False, False]
    with pytest.raises(ValueError, match="finite mean_synthetic_auroc"):
        runs.select(tmp_path, "decoflow", {"x": ["b", "d"]}, criterion="synthetic")
    with pytest.raises(ValueError, match="unknown criterion"):
        runs.select(tmp_path, "decoflow", {"x": ["a"]}, criterion="test_auroc")


def test_select_between_named_bundles(monkeypatch, tmp_path, capsys):
    """--candidate NAME:k=v,...: each bundle is one run (NAME: alone is the profile as it is)."""
    seen = []
    monkeypatch.setattr(runs, "ensure_runs", lambda root, jobs, workers, executor=None: seen.extend(jobs) or [
        Path(json.dumps(job["sets"], sort_keys=True)) for job in jobs])
    nll = lambda d: 0.3 if "grad_clip" in str(d) else 0.5  # noqa: E731 -- the bundle has the lower NLL
    monkeypatch.setattr(runs, "load_metrics", lambda d: {"validation": {"mean_patch_nll": nll(d)}})
    argv = ["select", "--candidate", "now:", "--candidate", "recipe:grad_clip=0.5,weight_decay=0.01",
            "--out", str(tmp_path), "--profile", "smoke"]
    assert main(argv) == 0
    assert [job["sets"] for job in seen] == [{"val_fraction": 0.1},
                                             {"grad_clip": "0.5", "weight_decay": "0.01", "val_fraction": 0.1}]
    assert "chosen by validation NLL: recipe" in capsys.readouterr().out
    table = (tmp_path / "embedded" / "selection-decoflow-now-recipe.csv").read_text().splitlines()
    assert table[0].startswith("candidate,grad_clip,weight_decay,mean_val_nll") and table[2].endswith("True")
    assert main(["select", "--candidate", "recipe:grad_clip=x", "--out", str(tmp_path)]) == 2  # checked first
    assert "grad_clip" in error_line(capsys)
    assert main(["select", "--candidate", "nameless", "--out", str(tmp_path)]) == 2
    assert "NAME:" in error_line(capsys)


def test_select_without_a_grid_exits_2(tiny_tree, tmp_path, capsys):
    assert main(["select", "--data", str(tiny_tree), "--out", str(tmp_path)]) == 2
    assert "--grid" in error_line(capsys)


def test_a_finished_run_with_other_settings_is_refused_not_reused(tiny_tree, smoke_args, tmp_path):
    sets = {"feature_cache": smoke_args[smoke_args.index("--set") + 1].split("=", 1)[1], "image_size": 64,
            "device": "cpu", "num_threads": 1}
    out = runs.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke",
                                 sets=sets)
    assert runs.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke",
                                  sets=sets) == out  # the same settings: reused
    saved = read_json(out / "config.json")
    del saved["config"]["val_fraction"]  # written before the field existed: counts as its default (0.0)
    saved["config"]["task_lr"] = 0.5  # as if the profile had changed since
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(train.RunError, match=r"\(task_lr differ") as err:
        runs.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke", sets=sets)
    assert str(out) in str(err.value)
    job = dict(method="decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke", sets=sets)
    with pytest.raises(train.RunError, match=r"\(task_lr differ"):  # the batch path (select, notebooks) too
        runs.ensure_runs(tmp_path, [job], workers=2)
    saved["config"]["task_lr"] = None
    saved["config"]["independent_lr"] = 0.5  # a field decoflow does not read: the run stays valid
    (out / "config.json").write_text(json.dumps(saved))
    assert runs.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"], profile="smoke",
                                  sets=sets) == out
    assert config_module.changed_fields(saved["config"], make_config("smoke", {
        k: str(v) for k, v in sets.items()}), "independent") == ["independent_lr"]


def test_two_processes_asking_for_one_run_train_it_once(tiny_tree, smoke_args, tmp_path, monkeypatch):
    """Two notebooks asking for one run: the second waits on the run's lock, then reuses the run."""
    import threading

    sets = {"feature_cache": smoke_args[smoke_args.index("--set") + 1].split("=", 1)[1], "image_size": 64,
            "device": "cpu", "num_threads": 1}
    trained, real = [], runs.run
    first_started = threading.Event()

    def counted(**kwargs):
        trained.append(kwargs["out"])
        first_started.set()
        return real(**kwargs)

    monkeypatch.setattr(runs, "run", counted)
    outs = []
    ask = lambda: outs.append(runs.ensure_run(tmp_path, "decoflow", data=str(tiny_tree), tasks=["checker"],
                                              profile="smoke", sets=sets, progress_bar=False))
    first = threading.Thread(target=ask)
    first.start()
    assert first_started.wait(60)
    second = threading.Thread(target=ask)  # asks while the first is training
    second.start()
    first.join()
    second.join()
    assert len(trained) == 1 and len(outs) == 2 and outs[0] == outs[1]
    assert (outs[0] / "metrics.json").exists()
