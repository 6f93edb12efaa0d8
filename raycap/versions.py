"""Installed packages' versions, read without importing them (importing torchvision costs ~2 s of CPU)."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path


def installed_version(package: str) -> str:
    """`package.__version__` as the package would report it (torch's and torchvision's carry their build, e.g.
    +cu130, which their distribution metadata lacks): the imported module's if imported, else read from its
    version.py (a plain assignment there), else the distribution's."""
    module = sys.modules.get(package)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    if spec is not None and spec.origin:
        with contextlib.suppress(OSError, SyntaxError):
            for node in ast.parse(Path(spec.origin).with_name("version.py").read_text()).body:
                names = [getattr(t, "id", None) for t in node.targets] if isinstance(node, ast.Assign) else []
                if "__version__" in names and isinstance(node.value, ast.Constant):
                    return str(node.value.value)
    return importlib.metadata.version(package)
