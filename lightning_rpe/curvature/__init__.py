"""Curvature engine: Hessian-vector products, eigen-solvers and trace estimators (pure PyTorch)."""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CurvatureOperator": "operator",
    "DenseOperator": "operator",
    "PreconditionedOperator": "operator",
    "HessianOperator": "hessian",
    "EigenResult": "eigen",
    "eigenpairs": "eigen",
    "TraceResult": "trace",
    "trace": "trace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
