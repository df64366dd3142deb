"""``make reproduce``: run every numbered notebook in order with papermill.

Executed copies go to the git-ignored ``runs/notebooks/``; the notebooks themselves write figures
into ``figures/`` and tables into ``results/``. A failing notebook stops the run with its name and
the cell that failed (notebooks already running finish first).

The first notebooks (``SETUP``: the data and the feature cache every other one reads) run alone; the
rest run ``--parallel`` at a time (default 2), each in its own process, in order except that a notebook
whose metadata names others under ``decoflow.after`` (those that train the runs it reads, e.g. notebook
02's) starts once they are done. A notebook's analysis then overlaps another's training, and a run that
two notebooks need is trained once: the first to ask trains it, the other waits (``runs.ensure_run``).

``--executor ray`` (``make reproduce EXECUTOR=ray [RAY_ADDRESS=...]``) trains the notebooks' missing
runs as Ray tasks: the pipeline joins the cluster at ``--ray-address`` (or ``RAY_ADDRESS``), or starts
a local instance when none is given, and hands its address to every notebook's kernel through the
environment variables ``DECOFLOW_EXECUTOR`` and ``DECOFLOW_RAY_ADDRESS``, which ``context.Context``
reads (the notebooks' ``parameters`` cells stay as they are).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import papermill as pm

from ..datasets import resolve_data
from ..train import RunError
from .executors import EXECUTORS, RayExecutor

REPO = Path(__file__).resolve().parents[2]
SETUP = ("00_", "01_")  # build the data and fill the feature cache: run alone, before the others


def notebook_parameters(args) -> dict:
    sets = dict(pair.split("=", 1) for pair in args.set or [])
    params = {"DATA": args.data, "PROFILE": args.profile, "QUICK": bool(int(args.quick)),
              "SEEDS": [int(s) for s in str(args.seeds).split(",") if s != ""],
              "RUN_ROOT": str(REPO / "runs"), "SETS": sets}
    if args.real_data:
        params["REAL_DATA"] = str(Path(args.real_data).resolve())
    if args.similar_data:
        params["SIMILAR_DATA"] = str(Path(args.similar_data).resolve())
    return params


def execute(notebook: Path, out: Path, params: dict, **papermill_options) -> None:
    """Run one notebook with papermill as ``make reproduce`` does: in notebooks/, without text progress
    bars in the executed copy (JupyterLab shows them as widgets when the notebook is run by hand)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the kernel inherits it
    pm.execute_notebook(str(notebook), str(out), parameters=params, cwd=str(REPO / "notebooks"),
                        progress_bar=False, kernel_name="python3", **papermill_options)


def timed(notebook: Path, out: Path, params: dict) -> tuple[float, str | None]:
    """``execute`` in a process of its own: (seconds, None) or (seconds, what failed)."""
    start = time.perf_counter()
    try:
        execute(notebook, out, params)
    except pm.PapermillExecutionError as err:
        return time.perf_counter() - start, f"cell {err.exec_count}: {err.ename}: {err.evalue}"
    return time.perf_counter() - start, None


def after(notebook: Path) -> set[str]:
    """The notebooks (names without ``.ipynb``) that ``notebook`` waits for: its metadata's
    ``decoflow.after``."""
    metadata = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {})
    return set(metadata.get("decoflow", {}).get("after", []))


def run_all(notebooks: list[Path], out_dir: Path, params: dict, parallel: int) -> str | None:
    """Run ``notebooks``: those of ``SETUP`` (and all, with ``parallel`` 1) one by one in this process,
    the rest ``parallel`` at a time, each in a process of its own, the first in order whose ``after``
    notebooks are done (or not among ``notebooks``) next. Prints a line as each starts and ends; returns
    None, or the first failure as ``name, cell N: error`` (no notebook starts after it; those running
    finish)."""
    label = {nb: f"[{i}/{len(notebooks)}] {nb.name}" for i, nb in enumerate(notebooks, 1)}

    def report(notebook, seconds, error):
        if error is None:
            print(f"{label[notebook]} done in {seconds:.0f} s", flush=True)
        return None if error is None else f"{notebook.name}, {error}"

    queue = list(notebooks)
    while queue and (parallel == 1 or queue[0].name.startswith(SETUP)):
        notebook = queue.pop(0)
        print(f"{label[notebook]} ...", flush=True)
        failure = report(notebook, *timed(notebook, out_dir / notebook.name, params))
        if failure:
            return failure
    if not queue:
        return None
    waits = {nb: after(nb) & {n.stem for n in queue} for nb in queue}
    failure, running = None, {}
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        while (queue and failure is None) or running:
            while queue and failure is None and len(running) < parallel:
                unfinished = {n.stem for n in queue} | {n.stem for n in running.values()}
                ready = [nb for nb in queue if not waits[nb] & unfinished]
                if not ready and not running:
                    return f"{queue[0].name}, metadata: decoflow.after names notebooks that wait for it in turn"
                if not ready:
                    break
                notebook = ready[0]
                queue.remove(notebook)
                print(f"{label[notebook]} ...", flush=True)
                running[pool.submit(timed, notebook, out_dir / notebook.name, params)] = notebook
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                notebook = running.pop(future)
                error = report(notebook, *future.result())
                failure = failure or error
    return failure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--quick", default="0")
    parser.add_argument("--only", help="run only notebooks whose name contains this text")
    parser.add_argument("--real-data", help="an MVTec-layout tree with bottle and magnetic_tile (notebook 07)")
    parser.add_argument("--similar-data", help="an MVTec-layout tree of look-alike categories (notebook 06's routers)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="config override for every run, e.g. backbone=efficientnet_lite0")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where missing runs train: local processes (default) or a Ray cluster")
    parser.add_argument("--ray-address", help="the Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--parallel", type=int, default=2, help="notebooks run at a time after the setup ones (default 2)")
    args = parser.parse_args(argv)

    if args.data == "embedded":
        print(f"data: embedded benchmark at {resolve_data('embedded')}")
    notebooks = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if args.only in nb.name]
    if not notebooks:
        print("no notebooks in notebooks/ yet: nothing more to run")
        return 0
    params = notebook_parameters(args)
    os.environ["DECOFLOW_EXECUTOR"] = args.executor  # the notebooks' kernels inherit both
    if args.executor == "ray":
        try:
            os.environ["DECOFLOW_RAY_ADDRESS"] = RayExecutor(args.ray_address).connect()  # one cluster for all
        except RunError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"executor: ray at {os.environ['DECOFLOW_RAY_ADDRESS']}")
    out_dir = REPO / "runs" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: expected 1 or more notebooks at a time")
    total = time.perf_counter()
    failure = run_all(notebooks, out_dir, params, args.parallel)
    if failure is not None:
        print(f"FAILED: {failure}", file=sys.stderr)
        print(f"executed copy with the traceback: {out_dir / failure.split(',')[0]}", file=sys.stderr)
        return 1
    print(f"all {len(notebooks)} notebooks done in {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
