"""Task streams: which classes arrive together, and in which order.

A *task* is a group of classes trained together (one set of task parameters on the union of their
images); its name joins the classes with ``+`` (``bottle+cable``). The stream is made in three steps:

1. the classes: ``--tasks`` (comma-separated), or every category of the data alphabetically;
2. ``order`` reorders them: ``given`` (as listed), ``alphabetical``, ``random:SEED``, or a preset --
   ``texture-first``, ``hard-first``, ``easy-first`` -- defined for MVTec-AD (the official scenario
   script's lists) and for the embedded benchmark (textures per data/README.md; difficulty by the
   PaDiM reference's image AUROC per category in results/02_per_task_image_auroc.md, lowest first);
3. ``scenario`` ``B-I`` groups them: the first task takes the first B classes, every later task the
   next I (the last may be shorter). ``1-1`` is one class per task.

Explicit groups (``--tasks "a+b+c,d+e"``) give the tasks directly; they take neither a scenario nor
an order.
"""
from __future__ import annotations

import re

import numpy as np

GROUP = "+"
MVTEC_AD = ("bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush "
            "transistor wood zipper").split()
EMBEDDED = ("brick_wall carpet circuit_board coffee_cup coin grass gravel hex_nut metal_mesh pill printed_text "
            "sand screw stone_wall wood").split()
PRESETS = {  # {preset: {data set: class order}}
    "texture-first": {
        "MVTec-AD": "carpet grid leather tile wood bottle cable capsule hazelnut metal_nut pill screw toothbrush "
                    "transistor zipper".split(),
        "embedded": "brick_wall carpet grass gravel metal_mesh sand stone_wall wood circuit_board coffee_cup coin "
                    "hex_nut pill printed_text screw".split()},
    "hard-first": {
        "MVTec-AD": "screw toothbrush capsule cable pill grid zipper transistor carpet wood hazelnut metal_nut "
                    "leather tile bottle".split(),
        "embedded": "screw gravel brick_wall sand coin wood carpet metal_mesh circuit_board coffee_cup "
                    "printed_text grass hex_nut pill stone_wall".split()},
}
PRESETS["easy-first"] = {
    "MVTec-AD": "bottle leather metal_nut tile hazelnut carpet grid cable pill zipper transistor wood capsule "
                "toothbrush screw".split(),
    "embedded": PRESETS["hard-first"]["embedded"][::-1]}
ORDERS = ("given", "alphabetical", *PRESETS, "random:SEED")


class StreamError(ValueError):
    """The scenario, the order or the task groups cannot make a stream of this data."""


def parse_scenario(scenario: str) -> tuple[int, int]:
    """``"B-I"`` -> (B, I), both >= 1."""
    match = re.fullmatch(r"(\d+)-(\d+)", scenario.strip())
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise StreamError(f"--scenario {scenario}: expected B-I with whole numbers >= 1, e.g. 1-1, 3-3 or 14-1")
    return int(match[1]), int(match[2])


def check_order(order: str) -> None:
    if order in ORDERS[:-1] or re.fullmatch(r"random:\d+", order):
        return
    raise StreamError(f"--order {order}: expected one of {', '.join(ORDERS)}")


def ordered(classes: list[str], order: str) -> list[str]:
    """``classes`` in ``order`` (see the module docstring)."""
    check_order(order)
    if order == "given":
        return list(classes)
    if order == "alphabetical":
        return sorted(classes)
    if order.startswith("random:"):
        rng = np.random.default_rng(int(order.split(":")[1]))
        return [classes[i] for i in rng.permutation(len(classes))]
    for data_set, preset in PRESETS[order].items():
        if set(classes) == set(preset):
            return list(preset)
    known = "; ".join(f"{name}: {len(p)} classes" for name, p in PRESETS[order].items())
    raise StreamError(f"--order {order} is defined for the full class sets of {known}; these {len(classes)} "
                      f"classes ({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}) are not one "
                      "of them. Use --order random:SEED, alphabetical, or list the classes in --tasks")


def grouped(classes: list[str], scenario: str) -> list[list[str]]:
    """The classes cut into tasks by ``scenario`` B-I."""
    first, step = parse_scenario(scenario)
    if first > len(classes):
        raise StreamError(f"--scenario {scenario}: the first task needs {first} classes, the stream has "
                          f"{len(classes)}")
    return [classes[:first]] + [classes[i:i + step] for i in range(first, len(classes), step)]


def parse_groups(spec: list[str] | None) -> list[list[str]] | None:
    """``["a+b", "c"]`` -> [["a", "b"], ["c"]] (spaces around names dropped)."""
    if not spec:
        return None
    return [[c.strip() for c in task.split(GROUP) if c.strip()] for task in spec]


def task_stream(available: list[str], tasks: list[str] | None, *, scenario: str = "1-1",
                order: str = "given") -> list[list[str]]:
    """The stream as a list of tasks, each the list of its classes (see the module docstring)."""
    groups = parse_groups(tasks)
    classes = [c for g in groups for c in g] if groups else sorted(available)
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise StreamError(f"unknown task(s) {', '.join(map(repr, unknown))}; available: {', '.join(available)}")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise StreamError(f"{', '.join(twice)} appear(s) twice in --tasks; every class belongs to one task")
    if groups and any(len(g) > 1 for g in groups):
        if scenario != "1-1" or order != "given":
            raise StreamError("--tasks with groups (a+b,c) gives the tasks and their order itself; drop "
                              "--scenario and --order, or list single classes")
        if any(not g for g in groups):
            raise StreamError("--tasks has an empty group; expected e.g. a+b,c")
        return groups
    return grouped(ordered(classes, order), scenario)


def task_name(classes: list[str]) -> str:
    return GROUP.join(classes)
