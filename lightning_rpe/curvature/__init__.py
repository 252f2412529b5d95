"""Curvature engine: Hessian-vector products, eigen-solvers and trace estimators (pure PyTorch).

Nothing here imports Lightning.
"""

from lightning_rpe.curvature.batch_sharpness import BatchSharpnessResult, batch_sharpness, sample_minibatches
from lightning_rpe.curvature.eigen import EigenResult, eigenpairs
from lightning_rpe.curvature.hessian import HessianOperator
from lightning_rpe.curvature.operator import CurvatureOperator, DenseOperator, PreconditionedOperator, ScaledOperator
from lightning_rpe.curvature.trace import TraceResult, trace

__all__ = [
    "BatchSharpnessResult",
    "CurvatureOperator",
    "DenseOperator",
    "EigenResult",
    "HessianOperator",
    "PreconditionedOperator",
    "ScaledOperator",
    "TraceResult",
    "batch_sharpness",
    "eigenpairs",
    "sample_minibatches",
    "trace",
]
