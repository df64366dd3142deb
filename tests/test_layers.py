"""The package's layers: every module imports, every import points downward, and none forms a cycle.

From the bottom: the method (config, scenarios, data, features, flow, model, losses, optim, router, scoring, metrics,
...), the data generators (``datasets``), the learners (``learners``; the registry in its
``__init__`` is imported by none of them), the trainer (``train``), reading and costing runs
(``report``, ``bench``), the notebook layer (``analysis``), and the command line on top.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "decoflow_core"
LAYERS = [  # (layer name, module prefixes), bottom first
    ("method", ("config", "files", "data", "backbone", "features", "flow", "model", "losses", "optim", "router",
                "scoring", "metrics", "official", "settings", "scenarios")),
    ("data generators", ("datasets",)),
    ("learners", ("learners",)),
    ("trainer", ("train",)),
    ("runs", ("report", "bench")),
    ("notebook layer", ("analysis",)),
    ("command line", ("cli", "__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    inside = module.split(".", 1)[1] if "." in module else "__init__"
    if inside == "__init__":
        return 0  # the package's front door re-exports the method
    for index, (_, prefixes) in enumerate(LAYERS):
        if inside.split(".")[0] in prefixes:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports_of(module: str) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its file (top level or not)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in MODULES}
    return found - {module}


@pytest.mark.parametrize("module", [m for m in MODULES if not m.endswith("__main__")])  # __main__ runs the CLI
def test_every_module_imports(module):
    importlib.import_module(module)


def test_imports_point_downward():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {i} ({LAYERS[layer(i)][0]})"
              for m in MODULES for i in imports_of(m) if layer(i) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_learner_imports_the_registry():
    offenders = [m for m in MODULES if m.startswith("decoflow_core.learners.") and
                 "decoflow_core.learners" in imports_of(m)]
    assert not offenders


def test_no_import_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module, path):
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_checks_catch_an_upward_import_and_a_cycle(monkeypatch):
    """The two checks above fail when they should: an injected core -> notebook-layer import."""
    real = imports_of
    monkeypatch.setitem(globals(), "imports_of", lambda m: real(m) | (
        {"decoflow_core.analysis.context"} if m == "decoflow_core.model" else set()))
    with pytest.raises(AssertionError, match="decoflow_core.model"):
        test_imports_point_downward()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()
