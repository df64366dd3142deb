"""The numbered notebooks: committed clean, and run end to end in QUICK mode asserting on what they record.

Every notebook is executed once per session with papermill (QUICK=True, the first three embedded
categories, a temporary RUN_ROOT, one torch thread), in order, so the later ones reuse the runs of
02_sequential_training as they do in ``make reproduce``. Each then has its own test reading the JSON
record ``RUN_ROOT/notebook_results/<name>.json``.
"""
from __future__ import annotations

import ast
import io
import json
import math
import time
from pathlib import Path

import nbformat
import pytest

from decoflow_core.analysis import pipeline, routing
from decoflow_core.config import make_config
from decoflow_core.datasets.embedded import EMBEDDED_CATEGORIES

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
REQUIRED_PARAMETERS = {"DATA", "TASKS", "PROFILE", "SEEDS", "QUICK", "RUN_ROOT"}
EXPECTED = ["00_data_and_protocol", "01_feature_extraction", "02_sequential_training", "03_forgetting_heatmaps",
            "04_svd_delta_w", "05_tal_gradients", "06_routing_confusion", "07_component_ablation",
            "08_depth_and_first_task", "09_why_nf_and_placement", "10_acl_analysis", "11_computational_cost",
            "12_scenarios_and_orders"]


def test_every_planned_notebook_is_committed():
    assert [nb.stem for nb in NOTEBOOKS] == EXPECTED


# ----------------------------------------------------------------------------- committed sources


def parameter_cells(notebook) -> list:
    return [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs_and_one_literal_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} holds outputs"
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith(f"# {path.stem[:2]} ")
    cells = parameter_cells(notebook)
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters'"
    assert notebook.cells.index(cells[0]) == 1, "the parameters cell follows the title"
    names = []
    for line in cells[0].source.splitlines():
        code_part, hash_sign, comment = line.partition("  #")
        assert hash_sign and comment.strip(), f"{path.name}: parameter line without a comment: {line!r}"
        statement = ast.parse(code_part).body
        assert len(statement) == 1 and isinstance(statement[0], ast.Assign), line
        target = statement[0].targets[0]
        assert isinstance(target, ast.Name) and target.id.isupper(), line
        ast.literal_eval(statement[0].value)  # literals only
        names.append(target.id)
    assert REQUIRED_PARAMETERS <= set(names), f"{path.name} lacks {REQUIRED_PARAMETERS - set(names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path):
    from papermill.translators import PythonTranslator
    cell = parameter_cells(nbformat.read(path, as_version=4))[0]
    lines = [line for line in cell.source.splitlines() if line.strip()]
    assert [p.name for p in PythonTranslator.inspect(cell)] == [line.split("=")[0].strip() for line in lines]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_code_is_thin(path):
    """No def/class longer than a few lines: reusable logic belongs in decoflow_core."""
    for c in nbformat.read(path, as_version=4).cells:
        if c.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(c.source)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.end_lineno - node.lineno < 5, f"{path.name}: {node.name} is too long for a notebook"


# ----------------------------------------------------------------------------- executed in QUICK mode


@pytest.fixture(scope="session")
def executed(tmp_path_factory):
    """{notebook name: (JSON record or None, error or None, seconds)} after running all notebooks
    as ``make reproduce`` does (``pipeline.execute``); the executed copies are in ``_out_dir``."""
    run_root = tmp_path_factory.mktemp("notebook_runs")
    out_dir = tmp_path_factory.mktemp("executed")
    params = {"DATA": "embedded", "TASKS": list(EMBEDDED_CATEGORIES[:3]), "PROFILE": "cpu", "SEEDS": [0],
              "QUICK": True, "RUN_ROOT": str(run_root), "THREADS": 1}
    results = {}
    for path in NOTEBOOKS:
        start, error = time.perf_counter(), None
        try:
            pipeline.execute(path, out_dir / path.name, params, stdout_file=io.StringIO(), stderr_file=io.StringIO())
        except Exception as err:  # noqa: BLE001 -- reported by the notebook's own test
            error = f"{type(err).__name__}: {err}"
        record_file = run_root / "notebook_results" / f"{path.stem}.json"
        record = json.loads(record_file.read_text()) if record_file.exists() else None
        results[path.stem] = (record, error, time.perf_counter() - start)
    results["_run_root"], results["_out_dir"] = run_root, out_dir
    return results


def values(executed, name: str) -> dict:
    record, error, _ = executed[name]
    assert error is None, f"{name} failed: {error}"
    assert record is not None and record["quick"] is True
    return {k: v["value"] for k, v in record["values"].items()}


def is_fraction(value) -> bool:
    return value is not None and 0.0 <= value <= 1.0


def test_executed_notebooks_carry_no_warnings(executed):
    """A reader of an executed notebook sees its results, not warnings or progress bars on stderr."""
    noise = []
    for path in NOTEBOOKS:
        copy = nbformat.read(executed["_out_dir"] / path.name, as_version=4)
        noise += [f"{path.stem}: {out.text.strip()[:200]}" for cell in copy.cells if cell.cell_type == "code"
                  for out in cell.outputs if out.output_type == "stream" and out.name == "stderr"]
    assert not noise, "\n".join(noise)


def test_quick_mode_writes_figures_and_tables_under_run_root(executed):
    quick = executed["_run_root"] / "quick"
    for name in EXPECTED:
        assert (executed["_run_root"] / "notebook_results" / f"{name}.json").exists(), name
        assert list((quick / "figures").glob(f"{name[:2]}_*.png")), f"{name} wrote no figure"
        assert list((quick / "figures").glob(f"{name[:2]}_*.pdf")), f"{name} wrote no PDF"
    assert list((quick / "results").glob("02_main_table.csv")) and list((quick / "results").glob("02_main_table.md"))


def test_00_data_and_protocol(executed):
    v = values(executed, "00_data_and_protocol")
    assert v["n_tasks"] == 3
    assert v["train_images_min"] > 0 and v["test_images_total"] > 0
    assert 0 < v["defect_share"] < 1
    assert v["share_with_masks"] == 1.0  # every embedded defect has a mask


def test_01_feature_extraction(executed):
    v = values(executed, "01_feature_extraction")
    assert v["feature_dim"] == sum(v["stage_channels"]) and v["grid"] == 14
    assert v["pe_row_channels_constant_along_rows"] == 0.0 and v["pe_abs_max"] <= 1.0
    assert v["seconds_cached"] < v["seconds_no_cache"]
    assert is_fraction(v["pca_explained_variance_2d"]) and v["min_task_separation"] > 0


def test_02_sequential_training(executed):
    v = values(executed, "02_sequential_training")
    methods = ["decoflow", "finetune", "ewc", "replay", "joint", "independent", "padim", "decoflow (oracle task id)"]
    for method in methods:
        for metric in ("image_auroc", "pixel_auroc", "pixel_ap"):
            assert is_fraction(v[f"{method}/{metric}"]), (method, metric, v[f"{method}/{metric}"])
    assert v["decoflow (oracle task id)/fm"] == 0.0 and v["decoflow (oracle task id)/bwt"] == 0.0
    assert is_fraction(v["decoflow/routing"])
    if v["decoflow/routing"] == 1.0:  # correct routing at the end means correct routing all along
        assert v["decoflow/fm"] == 0.0 and v["decoflow/bwt"] == 0.0
        assert v["decoflow/image_auroc"] == v["decoflow (oracle task id)/image_auroc"]
    for method in ("joint", "padim"):  # not continual: no forgetting is defined
        assert v[f"{method}/fm"] is None
    assert 0 < v["decoflow/params_per_task"] < v["decoflow/params_base"] + v["decoflow/params_per_task"]
    assert is_fraction(v["gallery_routed_correctly"])


def test_03_forgetting_heatmaps(executed):
    v = values(executed, "03_forgetting_heatmaps")
    assert all(is_fraction(x) for x in v["R_values"]) and len(v["R_values"]) == 2 * (3 * 4 // 2)
    assert v["decoflow (oracle task id)/fm_image_auroc"] == 0.0
    curve = v["DeCoFlow/first_task_curve"]
    if v["decoflow/routing_accuracy"] == 1.0:
        assert v["decoflow/fm_image_auroc"] == 0.0 and len(set(curve)) == 1 and v["DeCoFlow/first_task_retained"] == 1.0
    assert len(v["finetune/first_task_curve"]) == 3 and v["finetune/fm_image_auroc"] is not None
    # the two summaries of 02 and 03 come from the same runs
    assert v["finetune/fm_image_auroc"] == values(executed, "02_sequential_training")["finetune/fm"]
    assert v["decoflow/oracle_drop_max"] == 0.0  # with the true task id no old task moves
    assert is_fraction(v["decoflow/routed_elsewhere_max"])


def test_04_svd_delta_w(executed):
    v = values(executed, "04_svd_delta_w")
    curve = v["mean_energy_curve"]
    assert all(is_fraction(x) for x in curve) and math.isclose(curve[-1], 1.0, rel_tol=1e-9)
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:])), "cumulative energy must not decrease"
    for key in ("energy_at_64_mean", "energy_at_profile_rank_mean", "energy_at_matched_rank_mean",
                "random_energy_at_profile_rank_mean"):
        assert is_fraction(v[key]), key
    assert v["energy_at_profile_rank_mean"] <= v["energy_at_64_mean"] + 1e-12  # the cpu profile's rank is below 64
    assert v["top_64_is_full_rank"] == all(r <= 64 for r in v["full_ranks"])
    assert v["rank_sensitivity/ranks"] == [16, 32]
    assert all(is_fraction(x) for x in v["rank_sensitivity/image_auroc"])
    assert v["rank_sensitivity/params_per_task"][0] < v["rank_sensitivity/params_per_task"][1]
    assert v["rank_sensitivity/lora_alpha"] == make_config("cpu").rank  # one alpha for every rank


def test_05_tal_gradients(executed):
    v = values(executed, "05_tal_gradients")
    assert is_fraction(v["nll/tail_share"]) and is_fraction(v["tal/tail_share"])
    assert v["tal/tail_share"] > v["nll/tail_share"], "TAL must move gradient onto the tail patches"
    assert math.isclose(v["nll/expected_weight"], 0.02) and math.isclose(v["tal/expected_weight"], 0.3 * 0.02 + 0.7)
    assert len(v["sensitivity/settings"]) == 2 and all(is_fraction(x) for x in v["sensitivity/image_auroc"])


def test_06_routing_confusion(executed):
    v = values(executed, "06_routing_confusion")
    for key in ("accuracy/Mahalanobis, Ledoit-Wolf", "accuracy/Mahalanobis, sample covariance", "accuracy/Euclidean"):
        assert is_fraction(v[key]), key
    # the notebook's router and the run's router see the same features and must agree exactly
    assert v["kit_router_accuracy"] == v["run_routing_accuracy"] == v["accuracy/kit"]
    assert (v["routing_errors"] == 0) == (v["kit_router_accuracy"] == 1.0)
    # distinct categories: an unlearned one is mostly unknown, held-out good images are mostly accepted
    assert v["unknown/never_learned_mean"] > 0.5 and v["unknown/false_rejection_mean"] < 0.5
    # the comparison's kit row is the kit's router on the same features, and the runs' own routers agree
    assert v["compare/this stream/" + routing.KIT] == v["kit_router_accuracy"]
    assert v["compare/this stream/" + routing.PER_TASK] == v["accuracy/Mahalanobis, Ledoit-Wolf"]
    assert v["run/this stream/routing"] == v["kit_router_accuracy"]
    assert v["run/boards/routing"] == v["compare/boards/" + routing.KIT]
    assert all(is_fraction(v[k]) for k in v if k.startswith(("compare/", "run/")))
    assert {k.split("/")[1] for k in v if k.startswith("compare/")} == {"this stream", "boards"}
    assert "compare/boards/each task's flow, standardised" in v
    # with the true task id nothing is forgotten, on either stream
    assert v["run/this stream/oracle_FM"] == 0 and v["run/boards/oracle_FM"] == 0


def test_07_component_ablation(executed):
    v = values(executed, "07_component_ablation")
    assert is_fraction(v["full/I-AUROC"])
    for name in ("TSA", "SCM", "TAL", "ACL"):
        for metric in ("I-AUROC", "P-AUROC", "P-AP"):
            assert -1 <= v[f"without {name}/delta_{metric}"] <= 1, (name, metric)
    assert len(v["loo/std_I-AUROC"]) == 4 and all(x >= 0 for x in v["loo/std_I-AUROC"])  # QUICK runs two seeds
    assert all(isinstance(x, bool) for x in v["loo/within_noise"])
    # a frozen base keeps every old task's score: zero forgetting with and without the components
    assert v["2x2/frozen_present/FM"] == 0.0 and v["2x2/frozen_absent/FM"] == 0.0
    cells = {k: v[f"2x2/{k}/I-AUROC"] for k in ("frozen_present", "frozen_absent", "trainable_present", "trainable_absent")}
    assert v["full/I-AUROC"] == cells["frozen_present"]  # the same runs
    assert math.isclose(v["2x2/effect_frozen"], cells["frozen_present"] - cells["frozen_absent"], abs_tol=1e-9)
    assert math.isclose(v["2x2/interaction"], v["2x2/effect_frozen"] - v["2x2/effect_trainable"], abs_tol=1e-9)
    if "standardize/skipped" not in v:  # the real data is beside the checkout
        for task in ("bottle", "magnetic_tile"):
            assert -1 <= v[f"standardize/{task}/delta_I-AUROC"] <= 1


def test_08_depth_and_first_task(executed):
    v = values(executed, "08_depth_and_first_task")
    for depth in (2, 4):
        for acl in ("acl", "noacl"):
            assert is_fraction(v[f"depth/{depth}_{acl}/I-AUROC"])
            assert v[f"depth/{depth}_{acl}/nonfinite"] >= 0
    followers = v["first_task/followers_I-AUROC"]
    assert len(followers) == 2 and all(is_fraction(x) for x in followers)
    assert math.isclose(v["first_task/spread"], max(followers) - min(followers), abs_tol=1e-12)


def test_09_why_nf_and_placement(executed):
    v = values(executed, "09_why_nf_and_placement")
    for method in ("decoflow", "ae_lora", "vae_lora", "ts_lora", "feature_prompt"):
        for metric in ("I-AUROC", "P-AUROC", "P-AP"):
            assert is_fraction(v[f"{method}/{metric}"]), (method, metric)
        assert v[f"{method}/FM (I-AUROC)"] == 0.0, f"{method}: a frozen base with per-task parameters cannot forget"
        assert v[f"{method}/params/task"] > 0


def test_10_acl_analysis(executed):
    v = values(executed, "10_acl_analysis")
    assert v["n_acl"] >= 1
    for key in ("abs_skewness", "abs_excess_kurtosis"):
        assert v[f"mean/{key} before"] >= 0 and v[f"mean/{key} after"] >= 0
    assert v["mean/R² affine fit"] <= 1.0


def test_11_computational_cost(executed):
    v = values(executed, "11_computational_cost")
    for method in ("decoflow", "independent", "replay"):
        assert v[f"{method}/backbone ms"] > 0 and v[f"{method}/flow ms"] > 0
        assert len(v[f"{method}/size_curve_mib"]) == 3
    assert v["decoflow/params per task"] < v["independent/params per task"]
    assert v["replay/params per task"] == 0 and v["replay/router KiB per task"] == 0
    d, i = v["decoflow/size_curve_mib"], v["independent/size_curve_mib"]
    assert d[-1] - d[0] < i[-1] - i[0], "DeCoFlow must grow slower per task than a flow per task"


def test_12_scenarios_and_orders(executed):
    v = values(executed, "12_scenarios_and_orders")
    for scenario in ("1-1", "2-1"):  # QUICK: three classes
        assert v[f"decoflow/{scenario}/oracle_FM"] == 0.0  # zero forgetting with the task id, tasks of 2 classes too
        assert is_fraction(v[f"decoflow/{scenario}/routing"]) and is_fraction(v[f"finetune/{scenario}/I-AUROC"])
        assert v[f"finetune/{scenario}/FM"] is not None
    assert v["loses/1-1/routing_part"] == pytest.approx(0.0, abs=1e-12)
    assert v["loses/1-1/capacity_part"] == pytest.approx(0.0, abs=1e-12)
    # the two parts add up to the drop from 1-1
    drop = v["decoflow/1-1/I-AUROC"] - v["decoflow/2-1/I-AUROC"]
    assert v["loses/2-1/routing_part"] + v["loses/2-1/capacity_part"] == pytest.approx(drop, abs=1e-9)
    assert v["router_prototypes/choice"] in ("task", "class")
    assert is_fraction(v["class_prototypes/2-1/routing (class)"]) and is_fraction(v["class_prototypes/2-1/routing (task)"])
    assert v["class_prototypes/2-1/routing (task)"] >= v["class_prototypes/2-1/routing (class)"]  # right class: right task
    assert v["class_prototypes/2-1/oracle FM"] == 0.0
    assert is_fraction(v["order/random:3/I-AUROC"])
    assert v["order/random:3/FM"] == 0.0 or v["order/random:3/routing"] < 1.0  # right routing: no forgetting
    assert v["order/random:3/stream"] == ["circuit_board", "carpet", "brick_wall"]  # random:3 of the QUICK classes
    quick = executed["_run_root"] / "quick"
    assert (quick / "figures" / "12_scenario_heatmaps.png").exists()
    assert (quick / "results" / "12_where_it_loses.csv").exists()


def test_report_notebook_times(executed, capsys):
    """Not a check: prints each notebook's QUICK runtime (visible with pytest -s)."""
    with capsys.disabled():
        for name in EXPECTED:
            print(f"\n{name}: {executed[name][2]:.0f} s", end="")
        print()


def test_a_notebook_edited_in_jupyter_is_committed_with_the_edit_and_without_outputs(tmp_path):
    """The committed filter (.gitattributes, installed by `make setup`): `git add` keeps a changed cell
    and drops what running the notebook added."""
    import shutil
    import subprocess
    import sys
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    shutil.copy(REPO / ".gitattributes", repo / ".gitattributes")
    subprocess.run([sys.executable, "-m", "nbstripout", "--install", "--attributes", ".gitattributes"], cwd=repo,
                   check=True, capture_output=True)
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    code = next(c for c in notebook.cells if c.cell_type == "code" and "ctx" in c.source)
    code.source += "\nprint('my edit')"
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="my edit\n")]
    code.execution_count = 3
    nbformat.write(notebook, repo / "edited.ipynb")
    git("add", "edited.ipynb")
    staged = nbformat.reads(git("show", ":edited.ipynb").stdout, as_version=4)
    cells = [c for c in staged.cells if c.cell_type == "code"]
    assert any("print('my edit')" in c.source for c in cells)
    assert all(not c.outputs and c.execution_count is None for c in cells)
    assert parameter_cells(staged)  # the parameters tag survives
