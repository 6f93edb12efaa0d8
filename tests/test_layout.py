"""The layout rules of docs/architecture.md: the pure core never imports Ray; modules stay small and documented."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raycap"
RAY_MODULES = {
    "pipeline",
    "resources",
    "session",
    "extract",
    "caption",
    "joiner",
    "train",
    "train_worker",
    "cli",
    "demo",
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", [p for p in MODULES if p.stem not in RAY_MODULES], ids=lambda p: p.stem)
def test_the_pure_core_never_imports_ray(path):
    assert not {n for n in _imports(path) if n == "ray" or n.startswith("ray.")}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_each_module_says_what_it_owns_in_one_line_and_stays_small(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.splitlines()[0].endswith(".")
    assert len(path.read_text().splitlines()) <= 400
