"""Command line: ``python -m decoflow_core {prepare,info,run,score,report,select,sweep,params,bench}``.

Bad arguments and bad data end with a one-line ``error: ...`` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from . import files
from .analysis.executors import EXECUTORS, RunsFailed, make_executor
from .analysis.runs import CRITERIA, ensure_runs, run_dir, save_selection, select, sweep_jobs
from .backbone import BackboneError
from .bench import benchmark, parameter_counts
from .config import ConfigError, make_config
from .data import DataError, format_info_table, validate_tree
from .datasets import BUILT, build_embedded, built_dir, resolve_data
from .datasets.converters import CONVERTERS, MVTEC_AD2_NOTE, REALIAD_RESOLUTIONS
from .learners import METHODS
from .report import format_report, report_is_complete, score_images, score_lines
from .train import RunError, run


def parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def parse_grid(pairs: list[str] | None) -> dict[str, list[str]]:
    """``["a=1,2", "b=x"]`` -> {"a": ["1", "2"], "b": ["x"]}."""
    return {key: [v for v in values.split(",") if v] for key, values in parse_sets(pairs).items()}


def parse_list(spec: str, what: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ValueError(f"{what} expects a comma-separated list, got {spec!r}")
    return names


def parse_candidates(specs: list[str] | None) -> dict[str, dict[str, str]]:
    """``["now:", "recipe:a=1,b=2"]`` -> {"now": {}, "recipe": {"a": "1", "b": "2"}}."""
    out = {}
    for spec in specs or []:
        name, sep, pairs = spec.partition(":")
        if not sep or not name:
            raise ValueError(f"--candidate expects NAME:key=value,key=value (or NAME: for the profile as it is), "
                             f"got {spec!r}")
        out[name] = parse_sets([p for p in pairs.split(",") if p])
    return out


def parse_tasks(spec: str | None) -> list[str] | None:
    """``a, b,c`` -> ["a", "b", "c"] (spaces around names dropped); None (every category,
    alphabetically) when not given."""
    return [t.strip() for t in spec.split(",") if t.strip()] if spec else None


def cmd_prepare(args) -> int:
    if args.what in BUILT:
        out = args.out or built_dir(args.what)
        print(f"{args.what} data ready at {build_embedded(out, seed=args.seed, family=args.what)}")
        return 0
    if not args.src or not args.out:
        raise ValueError(f"prepare {args.what} needs --src (the unpacked {args.what} release) and --out DIR")
    if args.resolution and args.what != "realiad":
        raise ValueError(f"--resolution is for prepare realiad only, not {args.what}")
    options = {"resolution": args.resolution} if args.what == "realiad" else {}
    names = CONVERTERS[args.what](args.src, args.out, **options)
    print(f"converted {len(names)} {args.what} categories into {args.out}: {', '.join(names)}")
    if args.what == "mvtec_ad2":
        print(f"note: {MVTEC_AD2_NOTE}")
    return 0


def cmd_info(args) -> int:
    root = resolve_data(args.data)
    print(f"{root}")
    print(format_info_table(validate_tree(root)))
    return 0


def stream_sets(args) -> dict[str, str]:
    """--set pairs with --scenario and --order folded in (they are config fields)."""
    sets = parse_sets(args.set)
    for key in ("scenario", "order"):
        if getattr(args, key) is not None:
            if key in sets and sets[key] != getattr(args, key):
                raise ValueError(f"--{key} {getattr(args, key)} and --set {key}={sets[key]} disagree; give one")
            sets[key] = getattr(args, key)
    return sets


def cmd_run(args) -> int:
    config = make_config(args.profile, stream_sets(args))
    metrics = run(data_root=resolve_data(args.data), tasks=parse_tasks(args.tasks), method=args.method,
                  config=config, seed=args.seed, out=args.out, resume=args.resume)
    print(format_report([args.out]))
    return 0 if metrics else 1


def cmd_score(args) -> int:
    failed = []

    def noting_failures(records):
        for record in records:
            if "error" in record:
                failed.append(record)
            yield record

    records = score_images(args.run, args.images, out_dir=args.out, allow_partial=args.allow_partial,
                           overwrite=args.overwrite)
    for line in score_lines(noting_failures(records), as_json=args.json):
        print(line, flush=True)
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} image(s) could not be scored, e.g. {failed[0]['image']}: "
              f"{failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    print(format_report(args.runs, per_task=args.per_task))
    return 0 if report_is_complete(args.runs) else 1


def cmd_select(args) -> int:
    grid = parse_grid(args.grid)
    candidates = parse_candidates(args.candidate)
    if bool(grid) == bool(candidates) or (grid and not all(grid.values())):
        raise ValueError("select needs at least one --grid key=v1,v2,... or --candidate NAME:key=v,... (not both)")
    sets = parse_sets(args.set)
    for candidate in candidates.values() or [{k: v[0] for k, v in grid.items()}]:
        make_config(args.profile, {**sets, **candidate})  # bad keys fail before training
    best, rows = select(args.out, args.method, grid or None, candidates=candidates or None, data=args.data,
                        tasks=parse_tasks(args.tasks), profile=args.profile, seed=args.seed, sets=sets,
                        val_fraction=args.val_fraction, workers=args.workers, criterion=args.criterion,
                        executor=make_executor(args.executor, workers=args.workers, ray_address=args.ray_address))
    target, table = save_selection(args.out, args.data, args.method, list(grid or candidates), rows)
    print(table)
    print(f"table written to {target}")
    chosen = ", ".join(f"{k}={best[k]}" for k in grid) if grid else best["candidate"]
    print(f"chosen by {CRITERIA[args.criterion][3]}: {chosen}")
    return 0


def cmd_sweep(args) -> int:
    methods = parse_list(args.methods, "--methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods names {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    try:
        seeds = [int(seed) for seed in parse_list(args.seeds, "--seeds")]
    except ValueError:
        raise ValueError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    grid, sets = parse_grid(args.grid), stream_sets(args)
    if not all(grid.values()) or set(grid) & set(sets):
        raise ValueError("--grid expects KEY=V1,V2,... for keys that no --set (or --scenario, --order) gives")
    jobs = sweep_jobs(methods, seeds, grid, data=args.data, tasks=parse_tasks(args.tasks), profile=args.profile,
                      sets=sets)
    executor = make_executor(args.executor, workers=args.workers, ray_address=args.ray_address)
    dirs = list(dict.fromkeys(run_dir(args.out, **job) for job in jobs))
    missing = [d for d in dirs if not (d / "metrics.json").exists()]
    print(f"{len(dirs)} runs, {len(missing)} to train ({args.executor} executor)", flush=True)
    failures = {}
    try:
        ensure_runs(args.out, jobs, args.workers, executor=executor, progress_bar=True)
    except RunsFailed as err:
        failures = err.failures
    finished = [d for d in dirs if (d / "metrics.json").exists()]
    table = format_report(dirs) if finished else "no run has finished"
    target = files.write_text(Path(args.out) / "sweep.md", table + "\n")
    print(table)
    print(f"table written to {target}")
    if failures:
        print(f"error: {len(failures)} of {len(dirs)} runs failed: "
              + "; ".join(f"{Path(d).name}: {e}" for d, e in failures.items()), file=sys.stderr)
        print("the same command again trains the failed and unfinished runs; the finished ones are kept",
              file=sys.stderr)
        return 1
    return 0


def cmd_params(args) -> int:
    config = make_config(args.profile, parse_sets(args.set))
    print(json.dumps({"profile": args.profile, **parameter_counts(config, args.dim)}, indent=1))
    return 0


def cmd_bench(args) -> int:
    benchmark(data=resolve_data(args.data), task=args.task, profile=args.profile, sets=parse_sets(args.set),
              steps=args.steps, whole_task=not args.steps_only)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m decoflow_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the embedded benchmark or convert a published data set to the MVTec layout")
    p.add_argument("what", choices=[*BUILT, *CONVERTERS])
    p.add_argument("--out", help="output folder (embedded, boards: default data/<what>)")
    p.add_argument("--src", help="the unpacked release: visa holds split_csv/1cls.csv; mpdd, btad, mvtec_ad2 one "
                                 "folder per category; realiad realiad_jsons/ and realiad_<resolution>/")
    p.add_argument("--resolution", choices=REALIAD_RESOLUTIONS,
                   help="realiad: the image folder realiad_<resolution> to read (needed when there are several)")
    p.add_argument("--seed", type=int, default=0, help="embedded benchmark seed")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("info", help="check a data tree and print its per-category table")
    p.add_argument("--data", required=True, help="MVTec-layout root, or 'embedded'")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="train and evaluate one method over the task stream")
    p.add_argument("--data", default="embedded", help="MVTec-layout root, or 'embedded' (default)")
    p.add_argument("--tasks", help="comma-separated classes (default: every category, alphabetically), or tasks "
                                   "of several classes: bottle+cable,carpet")
    p.add_argument("--scenario", help="B-I: B classes in the first task, I in each later one (default 1-1)")
    p.add_argument("--order", help="given (default), alphabetical, texture-first, hard-first, easy-first or "
                                   "random:SEED")
    p.add_argument("--method", default="decoflow", help="decoflow, finetune, ewc, replay, joint, independent")
    p.add_argument("--profile", default="cpu", help="cpu (default), paper, official or smoke")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue a killed run after its last finished task")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("score", help="route and score images with a finished run (docs/bad_input.md)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", help="where anomaly-map PNGs go (default RUN/scores), mirroring the images' folders")
    p.add_argument("--json", action="store_true", help="one JSON record per image instead of a table")
    p.add_argument("--allow-partial", action="store_true", help="score with an unfinished run's learned tasks")
    p.add_argument("--overwrite", action="store_true", help="replace anomaly maps that already exist")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="results table of one or more runs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--per-task", action="store_true", help="also print per-task final metrics")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("select", help="choose settings by validation scores of held-out train/good images")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...", help="candidate values of a config field")
    p.add_argument("--candidate", action="append", metavar="NAME:KEY=V,KEY=V",
                   help="a named bundle of settings (NAME: alone = the profile as it is); instead of --grid")
    p.add_argument("--data", default="embedded")
    p.add_argument("--tasks", help="comma-separated task order (default: all categories, alphabetical)")
    p.add_argument("--method", default="decoflow")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train/good held out (default 0.1)")
    p.add_argument("--workers", type=int, default=2, help="runs trained in parallel, one thread each")
    p.add_argument("--criterion", choices=["nll", "synthetic"], default="nll",
                   help="nll: lowest validation NLL (same flow input); synthetic: highest AUROC of held-out "
                        "images against synthetic defects (settings that change the flow input)")
    p.add_argument("--out", required=True, help="folder for the candidate runs and OUT/<data>/selection-<method>-<keys>.csv")
    add_executor_arguments(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("sweep", help="train the missing runs of methods x seeds x a grid, and tabulate them all")
    p.add_argument("--data", default="embedded", help="MVTec-layout root, or 'embedded' (default)")
    p.add_argument("--tasks", help="comma-separated classes (default: every category, alphabetically)")
    p.add_argument("--methods", default="decoflow", help="comma-separated methods, e.g. decoflow,finetune")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...", help="values of a config field to sweep")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field for every run")
    p.add_argument("--scenario", help="B-I: B classes in the first task, I in each later one (default 1-1)")
    p.add_argument("--order", help="task order, as for run")
    p.add_argument("--profile", default="cpu", help="cpu (default), paper, official or smoke")
    p.add_argument("--workers", type=int, default=2, help="local executor: runs trained in parallel, one thread each")
    p.add_argument("--out", required=True, help="run root: runs in OUT/<data>/<run name>, the table in OUT/sweep.md")
    add_executor_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("params", help="base and per-task parameter counts of a profile's flow, as JSON")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--dim", type=int, help="feature dimension D (default: the profile's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("bench", help="throughput, training step time and latency of a profile on this machine")
    p.add_argument("--data", default="embedded")
    p.add_argument("--task", help="category to time (default: the first)")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=3, help="training steps timed (after one warm-up step)")
    p.add_argument("--steps-only", action="store_true", help="skip training a whole task (GPU-sized profiles)")
    p.set_defaults(func=cmd_bench)
    return parser


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where missing runs train: local processes (default) or Ray tasks (docs/cluster.md)")
    parser.add_argument("--ray-address", help="the Ray cluster: host:port, ray://host:port or auto (default: "
                                              "RAY_ADDRESS, else a local instance started here)")


def _close_progress_bars() -> None:
    """Clear any progress bar, so that a message printed next starts on its own line."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    sys.stderr.write("\r\033[K" if sys.stderr.isatty() else "")


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted ``run``: the same arguments with --resume."""
    return " ".join(["python -m decoflow_core", *argv, *([] if "--resume" in argv else ["--resume"])])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ConfigError, RunError, BackboneError, FileNotFoundError, ValueError) as err:
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        again = {"run": resume_command(argv), "sweep": " ".join(["python -m decoflow_core", *argv])}.get(args.command)
        print(f"interrupted: the tasks finished so far are saved{f'; continue with: {again}' if again else ''}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
