"""`sweep` through the CLI with the local executor: it trains only what is missing, names runs as the
notebooks do, writes the report table to OUT/sweep.md, and exits 1 naming a failed run."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import error_line

from decoflow_core import cli
from decoflow_core.analysis import runs
from decoflow_core.cli import main
from decoflow_core.train import RunError

TASKS = ["checker", "gradient"]
REPORT_COLUMNS = ["run", "method", "tasks", "I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO", "FM (I)", "BWT (I)",
                  "routing", "params/task", "train s"]  # those of `report`


def sweep_argv(data, out, smoke_args, *extra) -> list[str]:
    return ["sweep", "--data", str(data), "--tasks", ",".join(TASKS), "--out", str(out), *smoke_args, *extra]


def notebook_run_name(method, seed, smoke_args, tree) -> str:
    """The name a notebook's Context gives the run: the overrides typed, less the profile's own values."""
    sets = dict(smoke_args[i + 1].split("=", 1) for i, arg in enumerate(smoke_args) if arg == "--set")
    typed = {**sets, "image_size": 64, "num_threads": 1}
    return runs.run_dir("root", method, data=str(tree), tasks=TASKS, profile="smoke", seed=seed,
                        sets=runs.profile_sets("smoke", typed)).name


def table_rows(path: Path) -> dict[str, list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_sweep_trains_what_is_missing_and_writes_the_report_table(tiny_tree, smoke_args, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_argv(tiny_tree, out, smoke_args, "--methods", "decoflow,finetune", "--seeds", "0")) == 0
    first = capsys.readouterr().out
    assert "2 runs, 2 to train (local executor)" in first
    names = {method: notebook_run_name(method, 0, smoke_args, tiny_tree) for method in ("decoflow", "finetune")}
    rows = table_rows(out / "sweep.md")
    assert set(rows) == set(names.values())  # named as the notebooks name their runs
    header = (out / "sweep.md").read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == REPORT_COLUMNS
    assert rows[names["finetune"]][1] == "finetune" and header in first  # printed too

    assert main(sweep_argv(tiny_tree, out, smoke_args, "--methods", "decoflow", "--seeds", "0,1")) == 0
    second = capsys.readouterr().out
    trained = [line for line in second.splitlines() if " trained " in line]
    assert "2 runs, 1 to train" in second and len(trained) == 1
    assert notebook_run_name("decoflow", 1, smoke_args, tiny_tree) in trained[0]
    assert set(table_rows(out / "sweep.md")) == {names["decoflow"], notebook_run_name("decoflow", 1, smoke_args,
                                                                                      tiny_tree)}


def test_sweep_exits_1_naming_a_failed_run_and_tabulates_the_others(tiny_tree, smoke_args, tmp_path, capsys,
                                                                     monkeypatch):
    real = runs.ensure_run

    def finetune_fails(run_root, method, **job):
        if method == "finetune":
            raise RunError("the loss became nan in epoch 1")
        return real(run_root, method, **job)

    monkeypatch.setattr(runs, "ensure_run", finetune_fails)
    out = tmp_path / "sweep"
    argv = sweep_argv(tiny_tree, out, smoke_args, "--methods", "decoflow,finetune", "--workers", "1")
    assert main(argv) == 1
    captured = capsys.readouterr()
    failed = notebook_run_name("finetune", 0, smoke_args, tiny_tree)
    assert f"{failed}: the loss became nan in epoch 1" in captured.err
    assert "the same command again" in captured.err
    assert set(table_rows(out / "sweep.md")) == {notebook_run_name("decoflow", 0, smoke_args, tiny_tree)}
    assert f"{failed}: not in the table" in (out / "sweep.md").read_text()


def test_an_interrupted_sweep_says_to_run_the_same_command_again(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "ensure_runs", interrupted)
    argv = ["sweep", "--methods", "decoflow", "--profile", "smoke", "--out", str(tmp_path)]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith("continue with: python -m decoflow_core " + " ".join(argv))


@pytest.mark.parametrize("extra, named", [
    (["--methods", "decoflow,bogus"], "bogus"),
    (["--seeds", "0,one"], "--seeds"),
    (["--grid", "epochs=1,2", "--set", "epochs=3"], "--grid"),
    (["--grid", "epoch=1,2"], "'epoch'"),
    (["--scenario", "2-2", "--set", "scenario=1-1"], "--scenario"),
], ids=["unknown-method", "seed-not-an-int", "grid-and-set-overlap", "unknown-grid-key", "scenario-twice"])
def test_bad_sweep_arguments_exit_2_before_training(extra, named, tmp_path, capsys):
    assert main(["sweep", "--profile", "smoke", "--out", str(tmp_path / "out"), *extra]) == 2
    assert named in error_line(capsys)
    assert not (tmp_path / "out").exists()
