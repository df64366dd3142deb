"""A notebook's context: task stream, profile overrides, tables, paths (analysis/context.py)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from decoflow_core.analysis import context, pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_task_stream():
    available = ["b", "a", "d", "c"]
    assert context.task_stream(available, None, quick=False) == ["a", "b", "c", "d"]
    assert context.task_stream(available, None, quick=True) == ["a", "b", "c"]
    assert context.task_stream(available, ["d", "a"], quick=True) == ["d", "a"]
    with pytest.raises(ValueError, match="zebra"):
        context.task_stream(available, ["a", "zebra"], quick=False)


def test_profile_sets_drop_what_the_profile_already_has():
    assert context.profile_sets("cpu", {"rank": 16, "epochs": 1, "lambda_tail": 0.7}) == {"epochs": 1}
    assert context.profile_sets("cpu", {"rank": 64}) == {"rank": 64}


def test_save_table_writes_csv_and_markdown(tmp_path):
    df = pd.DataFrame({"method": ["decoflow", "finetune"], "I-AUROC": [0.91234, float("nan")]})
    csv, md = context.save_table(df, "main", tmp_path)
    assert pd.read_csv(csv)["method"].tolist() == ["decoflow", "finetune"]
    lines = md.read_text().splitlines()
    assert lines == ["| method | I-AUROC |", "|---|---|", "| decoflow | 0.9123 |", "| finetune | n/a |"]


def test_markdown_table_writes_counts_as_whole_numbers():
    df = pd.DataFrame({"method": ["a", "b"], "params/task": [39749.0, 0.0], "routing": [1.0, float("nan")]})
    lines = context.markdown_table(df).splitlines()
    assert lines[2:] == ["| a | 39,749 | 1.0000 |", "| b | 0 | n/a |"]


def test_kit_path_keeps_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere" / "data"
    assert context.kit_path(target) == target
    assert context.kit_path(str(target)) == target
    assert isinstance(context.kit_path(str(target)), Path)


def test_kit_path_resolves_relative_paths_against_the_kit_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert context.kit_path("runs/x") == REPO_ROOT / "runs" / "x"
    assert context.kit_path(Path("data")) == REPO_ROOT / "data"
    assert context.kit_path("../sibling") == REPO_ROOT.parent / "sibling"
    assert context.kit_path("runs/x").is_absolute()


def test_make_reproduce_hands_the_optional_trees_to_the_notebooks(tmp_path):
    args = argparse.Namespace(data="embedded", profile="cpu", quick="1", seeds="0,1", set=["epochs=2"],
                              real_data=None, similar_data=str(tmp_path / "boards"))
    params = pipeline.notebook_parameters(args)
    assert params["SIMILAR_DATA"] == str((tmp_path / "boards").resolve()) and "REAL_DATA" not in params
    assert params["SEEDS"] == [0, 1] and params["QUICK"] is True and params["SETS"] == {"epochs": "2"}
    notebooks = REPO_ROOT / "notebooks"  # only the notebook that declares a tree gets it
    assert "SIMILAR_DATA" in pipeline.notebook_own_parameters(notebooks / "06_routing_confusion.ipynb", params)
    assert pipeline.notebook_own_parameters(notebooks / "00_data_and_protocol.ipynb", params) == {
        k: v for k, v in params.items() if k != "SIMILAR_DATA"}


@pytest.mark.skipif(os.name != "posix", reason="local-socket kernels are POSIX only")
def test_make_reproduce_kernels_use_local_sockets_and_print_no_transport_warning(tmp_path, capfd):
    notebook, out = tmp_path / "tiny.ipynb", tmp_path / "tiny-out.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")]), notebook)
    pipeline.execute(notebook, out, {})
    assert nbformat.read(out, as_version=4).cells[0].outputs[0]["text"] == "42\n"
    assert "without encryption" not in capfd.readouterr().err
