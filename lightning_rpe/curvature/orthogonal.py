"""Orthonormal blocks of parameter-sized vectors, with every reduction through ``operator.inner``.

Blocks are ``(dim, b)`` columns. Orthonormality is in the operator's inner product
(:meth:`lightning_rpe.curvature.operator.CurvatureOperator.inner`), which is the Euclidean one by
default and an all-reduced one on sharded vectors; nothing here reduces over ``dim`` itself.

:func:`orthonormalize` is classical Gram-Schmidt against given orthonormal bases, applied twice
("twice is enough", Giraud, Langou & Rozloznik 2005), followed each time by SVQB (Stathopoulos &
Wu 2002): ``W <- W U D^-1/2`` from the eigendecomposition ``W^T W = U D U^T`` of the small Gram
matrix, dropping directions with ``D`` at rounding level (numerically inside the span).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .operator import CurvatureOperator

__all__ = ["orthonormalize", "project_out"]


def project_out(operator: CurvatureOperator, W: Tensor, bases: list[Tensor | None]) -> Tensor:
    """``W - B (B^T W)`` for each orthonormal ``B`` in ``bases`` (``(dim, j)`` blocks; None skipped)."""
    for B in bases:
        if B is not None and B.shape[1] > 0:
            W = W - B @ operator.inner(B, W)
    return W


def orthonormalize(
    operator: CurvatureOperator, W: Tensor, bases: list[Tensor | None], *, overwrite: bool = False
) -> Tensor:
    """Orthonormal columns spanning ``W`` minus its part in ``span(bases)`` (bases orthonormal).

    ``W``: ``(dim, b)``. Returns ``(dim, b')`` with ``b' <= b``: columns numerically inside the
    span (norm below ``1e3 eps`` after projection, or Gram eigenvalue below ``100 eps`` of the
    largest) are dropped. ``overwrite=True`` lets it work in ``W``'s storage (the caller gives ``W``
    up). Memory: at most two ``(dim, b)`` blocks besides ``W`` at any time.
    """
    eps = torch.finfo(W.dtype).eps
    owned = overwrite  # W is the caller's tensor until the first copy; updated in place afterwards
    for _ in range(2):
        if W.shape[1] == 0:
            return W
        W, owned = _normalized(operator, W, owned, 0.0)
        if W.shape[1] == 0:
            return W
        for B in bases:
            if B is not None and B.shape[1] > 0:
                W.sub_(B @ operator.inner(B, W))
        W, owned = _normalized(operator, W, owned, 1e3 * eps)
        if W.shape[1] == 0:
            return W
        G = operator.inner(W, W).to(torch.float64).cpu()
        G = (G + G.T) / 2
        d, U = torch.linalg.eigh(G)
        keep = d > 100 * eps * float(d.max())
        U = U[:, keep] / d[keep].sqrt()
        W = W @ U.to(dtype=W.dtype, device=W.device)
    return W


def _normalized(operator: CurvatureOperator, W: Tensor, owned: bool, floor: float) -> tuple[Tensor, bool]:
    """Columns of ``W`` with norm above ``floor``, scaled to unit norm (in place when ``W`` is ours)."""
    norms = operator.norms(W)
    keep = norms > floor
    if bool(keep.all()):
        if owned:
            return W.div_(norms), True
        return W / norms, True
    return W[:, keep] / norms[keep], True
