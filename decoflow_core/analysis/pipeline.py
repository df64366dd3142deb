"""``make reproduce``: run every numbered notebook in order with papermill.

Executed copies go to the git-ignored ``runs/notebooks/``; the notebooks themselves write figures
into ``figures/`` and tables into ``results/``. A failing notebook stops the run with its name and
the cell that failed.

``--executor ray`` (``make reproduce EXECUTOR=ray [RAY_ADDRESS=...]``) trains the notebooks' missing
runs as Ray tasks: the pipeline joins the cluster at ``--ray-address`` (or ``RAY_ADDRESS``), or starts
a local instance when none is given, and hands its address to every notebook's kernel through the
environment variables ``DECOFLOW_EXECUTOR`` and ``DECOFLOW_RAY_ADDRESS``, which ``context.Context``
reads (the notebooks' ``parameters`` cells stay as they are).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import papermill as pm
from jupyter_client.manager import AsyncKernelManager

from ..datasets import resolve_data
from ..train import RunError
from .executors import EXECUTORS, RayExecutor

REPO = Path(__file__).resolve().parents[2]


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


OPTIONAL_PARAMETERS = ("REAL_DATA", "SIMILAR_DATA")  # only the notebooks that declare them get them


def notebook_own_parameters(notebook: Path, params: dict) -> dict:
    """``params`` without the optional trees the notebook's ``parameters`` cell does not declare."""
    declared = pm.inspect_notebook(str(notebook))
    return {k: v for k, v in params.items() if k in declared or k not in OPTIONAL_PARAMETERS}


class LocalKernelManager(AsyncKernelManager):
    """A kernel that talks to papermill over local sockets (IPC) instead of TCP ports: nothing listens
    on the network, and the kernel has no reason to warn about unencrypted TCP. POSIX only."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.transport = "ipc"


def execute(notebook: Path, out: Path, params: dict, **papermill_options) -> None:
    """Run one notebook with papermill as ``make reproduce`` does: in notebooks/, without text progress
    bars in the executed copy (JupyterLab shows them as widgets when the notebook is run by hand), and
    with the optional trees only where the notebook declares them; over local sockets where the
    system has them."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the kernel inherits it
    params = notebook_own_parameters(notebook, params)
    if os.name == "posix":
        papermill_options.setdefault("kernel_manager_class", LocalKernelManager)
    pm.execute_notebook(str(notebook), str(out), parameters=params, cwd=str(REPO / "notebooks"),
                        progress_bar=False, kernel_name="python3", **papermill_options)


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
    total = time.perf_counter()
    for index, notebook in enumerate(notebooks, 1):
        start = time.perf_counter()
        print(f"[{index}/{len(notebooks)}] {notebook.name} ...", flush=True)
        try:
            execute(notebook, out_dir / notebook.name, params)
        except pm.PapermillExecutionError as err:
            print(f"FAILED: {notebook.name}, cell {err.exec_count}: {err.ename}: {err.evalue}", file=sys.stderr)
            print(f"executed copy with the traceback: {out_dir / notebook.name}", file=sys.stderr)
            return 1
        print(f"[{index}/{len(notebooks)}] {notebook.name} done in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"all {len(notebooks)} notebooks done in {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
