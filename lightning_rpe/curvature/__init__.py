"""Curvature engine: Hessian-vector products, eigen-solvers and trace estimators (pure PyTorch).

Nothing here imports Lightning.
"""

from lightning_rpe.curvature.batch_sharpness import BatchSharpnessResult, batch_sharpness, sample_minibatches
from lightning_rpe.curvature.eigen import EigenResult, eigenpairs
from lightning_rpe.curvature.hessian import HessianOperator
from lightning_rpe.curvature.operator import CurvatureOperator, DenseOperator, PreconditionedOperator, ScaledOperator
from lightning_rpe.curvature.trace import TraceResult, trace
from lightning_rpe.curvature.verify import Verification, known_causes, verify_operator

__all__ = [
    "BatchSharpnessResult",
    "CurvatureOperator",
    "DenseOperator",
    "EigenResult",
    "HessianOperator",
    "PreconditionedOperator",
    "ScaledOperator",
    "TraceResult",
    "Verification",
    "batch_sharpness",
    "eigenpairs",
    "known_causes",
    "sample_minibatches",
    "trace",
    "verify_operator",
]
