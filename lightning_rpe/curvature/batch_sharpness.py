"""Batch sharpness: the curvature of each mini-batch loss along that mini-batch's own gradient.

For a mini-batch ``B`` with mean loss ``L_B``, gradient ``g_B = dL_B/dtheta`` and Hessian
``H_B = d^2 L_B / dtheta^2`` the batch sharpness is the mean over mini-batches of the training batch
size of the Rayleigh quotient

    BS = E_B [ g_B^T H_B g_B / ||g_B||^2 ]

(Andreyev & Beneventano, "Edge of Stochastic Stability: Revisiting the Edge of Stability for SGD",
arXiv 2412.20553). Under minibatch SGD it is this quantity, not the full-batch ``lambda_max``, that
settles at the stability threshold ``2 / lr``: one SGD step along ``-lr g_B`` changes ``L_B`` by
``-lr ||g_B||^2 (1 - lr q_B / 2)`` to second order, with ``q_B`` the quotient above, so the step
increases the batch's own loss exactly when ``lr q_B > 2``.

With per-coordinate step scales ``S`` (a non-negative diagonal: ``P^-1`` for Adam's preconditioner
``P = sqrt(v_hat) + eps``, or the ``lr / K [P]`` of :class:`lightning_rpe.stability.StepScales`) the
quotient is taken for the scaled operator ``S^1/2 H_B S^1/2`` along the scaled gradient
``w = S^1/2 g_B``:

    q_B = w^T (S^1/2 H_B S^1/2) w / ||w||^2 = u^T H_B u / (g_B^T u),    u = S g_B,

the directional curvature the update ``-S g_B`` sees. With ``S = P^-1`` it is in the units of the
preconditioned sharpness; with the step scales of :func:`lightning_rpe.stability.step_scales` it is
the dimensionless batch-sharpness stability ratio (the step of mini-batch ``B`` raises ``L_B``
exactly when ``q_B > 1``), exact for several learning rates and for the Adam family.

Cost: per mini-batch one loss and gradient and one Hessian-vector product (``n_hvp`` counts the
products). Each product uses :class:`~lightning_rpe.curvature.HessianOperator` on that mini-batch
alone, so the dtype, BatchNorm, dropout and AD-backend policies are the operator's.

Data parallelism: an SGD step under DDP uses the gradient of the union of the processes' local
batches, so the mini-batch whose quotient matters is that union (``world_size`` times the local
batch size). Each process passes the same number of local mini-batches; ``reduce`` (a SUM across
processes) is handed to the operator, so mini-batch ``k`` is the union of every process's ``k``-th
local batch: its gradient and its product are summed over the processes (every process's examples
count), and every process computes the same quotients, mean and standard error.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._functional import default_batch_size, map_tensors
from .hessian import HessianOperator

__all__ = ["BatchSharpnessResult", "batch_sharpness", "sample_minibatches"]


@dataclass(frozen=True)
class BatchSharpnessResult:
    """Batch sharpness over the mini-batches of all processes.

    Attributes:
        mean: ``BS``, the mean quotient ``q_B`` over the usable mini-batches (the loss's units per
            parameter^2, or the preconditioned units with a preconditioner).
        std_error: standard error of that mean, ``std(q_B) / sqrt(n)`` with the ``n - 1``
            (unbiased) variance; NaN when ``n_batches < 2``.
        n_batches: usable mini-batches.
        values: the quotients ``q_B`` in the order of the usable mini-batches.
        n_hvp: Hessian-vector products spent (on this process).
        n_skipped: mini-batches skipped (non-finite loss or quotient, zero gradient).
        scaled: whether ``scales`` were applied.
    """

    mean: float
    std_error: float
    n_batches: int
    values: tuple[float, ...]
    n_hvp: int
    n_skipped: int
    scaled: bool


def batch_sharpness(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    batchnorm: str = "eval",
    dropout: str = "off",
    reduce: Callable[[Tensor], Tensor] | None = None,
    scales: Tensor | None = None,
) -> BatchSharpnessResult:
    """Mean and standard error of ``g_B^T H_B g_B / ||g_B||^2`` over ``batches``.

    Args:
        model: the network (never modified; see :class:`~lightning_rpe.curvature.HessianOperator`).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of a batch.
        batches: this process's mini-batches, each of the training batch size (non-empty sequence).
        dtype: computation dtype (as for :class:`~lightning_rpe.curvature.HessianOperator`).
        backend: AD path (as for the operator).
        batchnorm: BatchNorm policy (as for the operator).
        dropout: dropout policy (as for the operator).
        reduce: SUM across processes for the operator's products, gradients and batch weights
            (module docstring); identity by default. Every process must call this function with
            the same number of batches.
        scales: optional non-negative diagonal ``S`` as a flat tensor of length ``dim`` in the
            operator's parameter order (zeros: coordinates that take no step); the quotient is then
            the scaled one (module docstring).

    Returns:
        A :class:`BatchSharpnessResult`.

    Raises:
        ValueError: empty ``batches``, an invalid policy argument, ``scales`` of the wrong length or
            not finite and non-negative, or no usable mini-batch (the decision is made on
            reduced quantities, so under DDP every process raises together).
    """
    if batches is None or isinstance(batches, (Tensor, str, bytes)):
        raise ValueError("batch_sharpness: batches must be a non-empty sequence of mini-batches")
    batches = list(batches)
    if not batches:
        raise ValueError("batch_sharpness: batches must be a non-empty sequence of mini-batches (got an empty list)")
    if reduce is not None and not callable(reduce):
        raise ValueError("batch_sharpness: reduce must be a callable Tensor -> Tensor (a SUM across processes) or None")
    values: list[float] = []
    n_hvp = 0
    skipped = 0
    for batch in batches:
        op = HessianOperator(
            model, loss_fn, [batch], dtype=dtype, backend=backend, batchnorm=batchnorm, dropout=dropout,
            reduce=reduce,
        )
        if scales is not None:
            if scales.ndim != 1 or scales.shape[0] != op.dim:
                raise ValueError(
                    f"batch_sharpness: scales must be a flat tensor of length dim={op.dim}, "
                    f"got shape {tuple(scales.shape)}"
                )
            diag = scales.to(dtype=op.dtype, device=op.device)
            if not bool(torch.isfinite(diag).all()) or bool((diag < 0).any()):
                raise ValueError("batch_sharpness: scales must be finite and non-negative")
        try:
            _, grad = op.loss_and_gradient()
        except ValueError:  # non-finite (reduced) loss of this mini-batch
            skipped += 1
            continue
        u = grad if scales is None else grad * diag
        denominator = float(grad @ u)
        if not (math.isfinite(denominator) and denominator > 0):
            skipped += 1
            continue
        hu = op.matvec(u)
        n_hvp += op.n_hvp
        q = float(u @ hu) / denominator
        if not math.isfinite(q):
            skipped += 1
            continue
        values.append(q)
    n = len(values)
    if n < 1:
        raise ValueError(
            "batch_sharpness: no usable mini-batch (non-finite losses, non-finite quotients or zero gradients)"
        )
    mean = math.fsum(values) / n
    std_error = math.sqrt(statistics.variance(values) / n) if n >= 2 else math.nan
    return BatchSharpnessResult(
        mean=mean,
        std_error=std_error,
        n_batches=n,
        values=tuple(values),
        n_hvp=n_hvp,
        n_skipped=skipped,
        scaled=scales is not None,
    )


def _concat(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along dim 0 of every tensor."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches), dim=0)
    if isinstance(first, dict):
        return type(first)({k: _concat([b[k] for b in batches]) for k in first})
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([b[i] for b in batches]) for i in range(len(first)))
    return first


def sample_minibatches(
    batches: Sequence[Any], batch_size: int, n_batches: int, generator: torch.Generator, *, always: bool = False
) -> list[Any]:
    """``n_batches`` mini-batches of ``batch_size`` examples drawn from the examples in ``batches``.

    The examples of all ``batches`` (tensors, tuples, lists or dicts of tensors with the examples
    along dim 0; non-tensor leaves are taken from the first batch) are pooled; each mini-batch is a
    uniformly random subset of distinct examples (``torch.randperm`` with ``generator``), the
    mini-batches independent of each other. When ``batch_size`` is at least the pooled size there is
    one mini-batch: all examples (full-batch training); with ``always`` it is returned ``n_batches``
    times instead, so that every process of a distributed measurement runs the same number of
    reduced products when only some of them hold fewer examples than ``batch_size``.

    Raises:
        ValueError: ``batch_size`` or ``n_batches`` not a positive int, or no batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sample_minibatches: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"sample_minibatches: n_batches must be an int >= 1, got {n_batches!r}")
    if not batches:
        raise ValueError("sample_minibatches: batches must be a non-empty sequence")
    pooled = _concat(list(batches))
    total = default_batch_size(pooled)
    if batch_size >= total:
        return [pooled] * (n_batches if always else 1)
    out = []
    for _ in range(n_batches):
        index = torch.randperm(total, generator=generator)[:batch_size]

        def take(t: Tensor, _index: Tensor = index) -> Tensor:
            return t[_index.to(t.device)] if t.ndim > 0 and t.shape[0] == total else t

        out.append(map_tensors(pooled, take))
    return out
