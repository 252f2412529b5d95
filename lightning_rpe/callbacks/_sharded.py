"""Lightning side of sharded (FSDP) measurements (private): which strategies work, and the operator.

- :func:`is_sharded`: the strategy keeps only a shard of the parameters on each process;
- :func:`check_supported`: raises a clear ValueError for what cannot be measured (tensor parallel,
  HSDP / Replicate placements, FSDP1 NO_SHARD / HYBRID / flat parameters, half-precision compute,
  DeepSpeed);
- :func:`sharded_operator`: a :class:`~lightning_rpe.curvature.sharded.ShardedHessianOperator` of
  ``loss_fn(pl_module, batch)`` through the strategy's wrapped model, called the way Lightning calls
  ``training_step`` (through the wrapper's ``forward`` when the strategy wraps the module, so FSDP1's
  root unshards).

Every function that touches the model is a collective: call it on every process together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
)
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from torch import Tensor, nn
from torch.distributed.fsdp import ShardingStrategy

from lightning_rpe.curvature.sharded import ShardedHessianOperator

__all__ = ["check_supported", "is_sharded", "sharded_operator"]

_METHOD = "_lightning_rpe_sharded_loss"
_FSDP1_OK = (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP)


def is_sharded(strategy: Strategy) -> bool:
    """True for strategies that keep a shard of the parameters per process (FSDP, ModelParallel, DeepSpeed)."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy))


def check_supported(strategy: Strategy, module: nn.Module | None = None) -> None:
    """Raise ValueError when a sharded ``strategy`` cannot be measured by finite differences.

    Supported: ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` (FSDP2 ``fully_shard`` on
    the data-parallel mesh in ``configure_model``) and ``FSDPStrategy`` with FULL_SHARD or
    SHARD_GRAD_OP, ``use_orig_params=True``, and float32/float64 compute. With ``module`` (the
    strategy's wrapped model after setup) the parameters themselves are checked too (every one a
    Shard placement on a 1-D mesh, no half-precision mixed precision): this builds nothing and runs
    no collective. A non-sharded strategy passes.
    """
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(  # noqa: TRY004
            f"SharpnessMonitor does not support {name}: DeepSpeed's partitioned parameters are not reachable as "
            "local shards. Use FSDPStrategy or ModelParallelStrategy (FSDP2) instead"
        )
    if isinstance(strategy, ModelParallelStrategy):
        tp = getattr(strategy, "_tensor_parallel_size", 1)
        mesh = getattr(strategy, "_device_mesh", None)
        if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()):
            tp = mesh["tensor_parallel"].size()
        if tp == "auto" or int(tp) != 1:
            raise ValueError(
                f"SharpnessMonitor supports {name} only with tensor_parallel_size=1 (FSDP2 data parallelism); got "
                f"tensor_parallel_size={tp!r}. Tensor-parallel parameters are replicated or split along dimensions "
                "whose inner products need the tensor-parallel layout"
            )
    if isinstance(strategy, FSDPStrategy):
        sharding = getattr(strategy, "sharding_strategy", ShardingStrategy.FULL_SHARD)
        if sharding not in _FSDP1_OK:
            raise ValueError(
                f"SharpnessMonitor supports {name} with sharding_strategy FULL_SHARD or SHARD_GRAD_OP; got "
                f"{getattr(sharding, 'name', sharding)} (NO_SHARD and HYBRID replicate parameters across processes)"
            )
        if not strategy.kwargs.get("use_orig_params", True):
            raise ValueError(
                f"SharpnessMonitor needs {name}(use_orig_params=True) (the default): flat parameters carry alignment "
                "padding that corrupts norms"
            )
    if module is not None and is_sharded(strategy):
        ShardedHessianOperator.check_module(module)


def _wrapped_loss(strategy: Strategy, pl_module: pl.LightningModule,
                  loss_fn: Callable[[Any, Any], Tensor]) -> Callable[[nn.Module, Any], Tensor]:
    wrapper = strategy.model
    if wrapper is None or wrapper is pl_module:
        return lambda _module, batch: loss_fn(pl_module, batch)
    redirect = _ForwardRedirection()

    def loss(_module: nn.Module, batch: Any) -> Tensor:
        pl_module.__dict__[_METHOD] = lambda b: loss_fn(pl_module, b)
        try:
            out = redirect(wrapper, pl_module, _METHOD, batch)
        finally:
            pl_module.__dict__.pop(_METHOD, None)
        if not isinstance(out, Tensor):
            raise ValueError(f"the measured loss must be a scalar tensor, got {type(out).__name__}")  # noqa: TRY004
        return out

    return loss


def sharded_operator(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Sequence[Any],
    dtype: torch.dtype | None = None,
    *,
    batchnorm: str = "eval",
    dropout: str = "off",
    eps: float | None = None,
) -> ShardedHessianOperator:
    """The Hessian of the mean of ``loss_fn(pl_module, batch)`` over every process's ``batches``,
    on this process's parameter shards, by finite differences (a collective).

    Args:
        trainer: a Trainer whose strategy passed :func:`check_supported`.
        pl_module: the LightningModule; ``loss_fn`` receives it (as ``training_step`` would).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar tensor`` (mean loss of the batch).
        batches: this process's probe batches (non-empty on every process).
        dtype: vector dtype (None: float64 when the model computes in float64, else float32).
        batchnorm: the normalization policy (see :class:`~lightning_rpe.curvature.sharded.ShardedHessianOperator`).
        dropout: the dropout policy (same).
        eps: the finite-difference step (same; None: the documented default per dtype).

    Returns:
        The operator (vectors are local shards; solve with
        :func:`~lightning_rpe.curvature.sharded.sharded_eigenpairs`).

    Raises:
        ValueError: an unsupported strategy or sharding (see :func:`check_supported`).
    """
    strategy = trainer.strategy
    check_supported(strategy)
    module = strategy.model if strategy.model is not None else pl_module
    return ShardedHessianOperator(module, _wrapped_loss(strategy, pl_module, loss_fn), batches, dtype=dtype,
                                  eps=eps, batchnorm=batchnorm, dropout=dropout)
