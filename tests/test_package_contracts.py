"""Contracts of the package layout: the engine layers never import Lightning; every exported name imports."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import lightning_rpe

LIGHTNING_FREE = [
    "lightning_rpe.curvature",
    "lightning_rpe.geometry",
    "lightning_rpe.stability",
    "lightning_rpe.optim",
    "lightning_rpe.measure",
    "lightning_rpe.names",
    "lightning_rpe.validation",
]


def _modules() -> list[str]:
    names = ["lightning_rpe"]
    for info in pkgutil.walk_packages(lightning_rpe.__path__, prefix="lightning_rpe."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return names


@pytest.mark.parametrize("module", LIGHTNING_FREE)
def test_engine_layers_load_no_lightning(module: str) -> None:
    # a fresh interpreter: what importing the module pulls in, and nothing else
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')))\n"
        "print('\\n'.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{module} imports Lightning modules: {out.stdout.split()[:5]}"


@pytest.mark.parametrize("module", _modules())
def test_every_name_in_all_imports(module: str) -> None:
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"{module}.__all__ lists {name!r}, which does not exist"
