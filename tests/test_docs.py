"""The documentation speaks to users: a short README, links that resolve, and no development history,
issue numbers or paths outside the kit anywhere in what ships."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([KIT / "README.md", KIT / "Makefile", KIT / "pyproject.toml", KIT / "environment.yml",
                  *(KIT / "docs").glob("*.md"), *(KIT / "decoflow_core").rglob("*.py"), *(KIT / "scripts").glob("*.py"),
                  *(KIT / "notebooks").glob("*.ipynb"), *(p for p in (KIT / "tests").rglob("*.py")
                                                          if p.name != Path(__file__).name)])
FORBIDDEN = {  # what a user's clone should never read
    "a path outside the kit": re.compile(r"\.\./shared|/work/|shared/(paper|reference|data)"),
    "an issue number": re.compile(r"\bissues? ?#?\d+", re.IGNORECASE),
    "a development session": re.compile(r"\bsession \d+", re.IGNORECASE),
    "a commit hash": re.compile(r"\bcommit `?[0-9a-f]{7,}", re.IGNORECASE),
}


def test_the_readme_is_short():
    assert len((KIT / "README.md").read_text()) <= 10_000


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(KIT)))
def test_no_development_history_or_outside_paths(path):
    text = path.read_text()
    found = [f"{what}: {m.group(0)!r}" for what, pattern in FORBIDDEN.items() for m in pattern.finditer(text)]
    assert not found, found


def test_documents_the_readme_names_exist():
    names = set(re.findall(r"`((?:docs|results|figures|notebooks|tests|decoflow_core)/[\w./-]+)`",
                           (KIT / "README.md").read_text()))
    missing = [name for name in names if not (KIT / name).exists() and not list(KIT.glob(name + ".*"))]
    assert not missing, missing
