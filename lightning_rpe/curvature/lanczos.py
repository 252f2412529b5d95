"""Lanczos with full re-orthogonalisation for extreme eigenpairs of a symmetric operator.

For a symmetric ``A`` and a unit start vector ``q_0`` the Lanczos process builds an orthonormal
basis ``Q_m = [q_0, ..., q_{m-1}]`` of the Krylov space ``span{q_0, A q_0, ..., A^{m-1} q_0}``
and a symmetric tridiagonal ``T_m = Q_m^T A Q_m`` with

    A Q_m = Q_m T_m + beta_m q_m e_m^T,

where ``alpha_j = q_j^T A q_j`` is the diagonal and ``beta_j = ||w_j||`` is the norm of the
vector ``w_j = A q_j - Q_{j+1} (Q_{j+1}^T A q_j)`` left after orthogonalisation; ``q_{j+1} =
w_j / beta_j``. Using anything else for ``beta_j`` (for example the norm before orthogonalisation)
breaks the relation and biases every Ritz value.

Every new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt, "twice
is enough"), so the basis stays orthonormal to working precision and no spurious copies of
converged eigenvalues appear. From an eigenpair ``T_m s = theta s`` the Ritz pair
``(theta, Q_m s)`` has the residual

    ||A Q_m s - theta Q_m s|| = |beta_m s_m|     (s_m: last entry of s)

which is what the stopping test uses; it equals the true residual up to rounding because the
basis is orthonormal. No product is spent on checking.

A breakdown (``beta_j`` at rounding level: the Krylov space is invariant) is handled by
continuing with a fresh random vector orthogonal to the basis (``T`` gets a zero off-diagonal
entry), or by stopping when the dimension is exhausted.

Limitation shared by every single-vector Krylov method: an eigenvalue of multiplicity ``r > 1``
appears once in exact arithmetic; use the block solver (:mod:`lightning_rpe.curvature.block`)
when exact multiplicities matter.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .operator import CurvatureOperator

__all__ = ["lanczos", "SolverOutput", "select_ritz", "random_block", "n_wanted"]

NONFINITE_REASON = "non-finite Hessian-vector product"


class SolverOutput(NamedTuple):
    """What a solver hands to :func:`lightning_rpe.curvature.eigenpairs` (already ordered).

    ``values`` / ``residuals``: float64 on the CPU; ``vectors``: ``(dim, m)`` in the operator's
    dtype and device; ``converged``: bool on the CPU; ``reason``: ``None`` when all converged.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: Tensor
    reason: str | None


def n_wanted(k: int, which: str) -> int:
    """Number of eigenpairs a request returns: ``k``, or ``k + 1`` for ``which="both"``."""
    return k + 1 if which == "both" else k


def select_ritz(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices into ascending Ritz values ``theta`` of the wanted pairs, in output order.

    ``"largest"``: k largest, descending. ``"smallest"``: k smallest, ascending. ``"both"``: the k
    largest (descending) followed by the smallest. ``theta`` must hold at least
    ``n_wanted(k, which)`` values.
    """
    m = theta.shape[0]
    order = torch.arange(m)
    if which == "largest":
        return order.flip(0)[:k]
    if which == "smallest":
        return order[:k]
    return torch.cat([order.flip(0)[:k], order[:1]])


def random_block(
    dim: int, b: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Standard normal ``(dim, b)`` block drawn from ``generator`` (never the global RNG).

    The numbers are drawn on the generator's device in float64 and then moved, so a seed gives
    the same start vectors on every device and in every dtype (up to the final rounding).
    """
    draw = torch.randn(dim, b, generator=generator, dtype=torch.float64, device=generator.device)
    return draw.to(dtype=dtype, device=device)


def _failure(dim: int, m: int, dtype: torch.dtype, device: torch.device) -> SolverOutput:
    nan = torch.full((m,), math.nan, dtype=torch.float64)
    return SolverOutput(
        values=nan.clone(),
        vectors=torch.full((dim, m), math.nan, dtype=dtype, device=device),
        residuals=nan.clone(),
        converged=torch.zeros(m, dtype=torch.bool),
        reason=NONFINITE_REASON,
    )


def _tridiagonal(alpha: list[float], beta: list[float]) -> Tensor:
    m = len(alpha)
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def lanczos(
    operator: CurvatureOperator,
    *,
    k: int,
    which: str,
    tol: float | Tensor,
    max_hvp: int,
    generator: torch.Generator,
    start: Tensor | None = None,
) -> SolverOutput:
    """Extreme eigenpairs of ``operator`` by Lanczos with full re-orthogonalisation.

    Runs until every wanted Ritz pair has ``|beta_m s_m| <= tol_i * max|theta|`` (max over all
    current Ritz values; ``tol`` holds one float64 tolerance per wanted pair, in result order), until ``max_hvp`` products were spent, or until the Krylov space is the
    whole space (then the pairs are exact up to rounding and count as converged). One product per
    iteration; memory ``(max_hvp + 1) * dim`` entries for the basis.

    ``start``: optional start vector ``(dim,)`` (normalised here); otherwise a Gaussian vector
    from ``generator``. Arguments are assumed validated by :func:`eigenpairs`.
    """
    dim, dtype, device = operator.dim, operator.dtype, operator.device
    nw = n_wanted(k, which)
    tol = torch.as_tensor(tol, dtype=torch.float64).reshape(-1).expand(nw)  # one per wanted pair
    m_max = min(int(max_hvp), dim)
    eps = torch.finfo(dtype).eps
    # beta below this (relative to the spectrum's scale seen so far) is an invariant subspace
    breakdown_tol = 100.0 * eps * math.sqrt(dim)

    Q = torch.empty(m_max + 1, dim, dtype=dtype, device=device)  # basis as rows
    q = start.to(dtype=dtype, device=device).reshape(dim) if start is not None else None
    if q is None or not bool(torch.isfinite(q).all()) or float(q.norm()) == 0.0:
        q = random_block(dim, 1, generator, dtype, device)[:, 0]
    Q[0] = q / q.norm()

    alpha: list[float] = []
    beta: list[float] = []
    scale = 0.0
    theta = S = res = None
    last_beta = 0.0
    exhausted = False
    for j in range(m_max):
        w = operator.matvec(Q[j])
        if not bool(torch.isfinite(w).all()):
            return _failure(dim, nw, dtype, device)
        basis = Q[: j + 1]
        h = basis @ w
        w = w - basis.T @ h
        h2 = basis @ w
        w = w - basis.T @ h2
        alpha.append(float(h[j]) + float(h2[j]))
        b = float(w.norm())

        T = _tridiagonal(alpha, beta)
        theta, S = torch.linalg.eigh(T)
        scale = max(scale, float(theta.abs().max()), abs(alpha[-1]))
        breakdown = b <= breakdown_tol * max(scale, torch.finfo(dtype).tiny)
        exhausted = j + 1 == dim
        last_beta = 0.0 if exhausted else b
        res = (last_beta * S[-1, :]).abs()

        if theta.shape[0] >= nw:
            idx = select_ritz(theta, k, which)
            # tol=0 runs to the budget (a Ritz residual can be exactly 0 by deflation in eigh)
            if float(tol.min()) > 0 and bool((res[idx] <= tol * float(theta.abs().max())).all()):
                break
        if exhausted or j + 1 == m_max:
            break
        if breakdown:
            # invariant subspace: continue the basis with a random vector orthogonal to it
            beta.append(0.0)
            for _ in range(5):
                r = random_block(dim, 1, generator, dtype, device)[:, 0]
                r = r - basis.T @ (basis @ r)
                r = r - basis.T @ (basis @ r)
                nr = float(r.norm())
                if nr > 1e-3 * math.sqrt(dim):
                    break
            Q[j + 1] = r / nr
        else:
            beta.append(b)
            Q[j + 1] = w / b

    assert theta is not None and S is not None and res is not None
    m = theta.shape[0]
    if m < nw:
        # only reachable when max_hvp < n_wanted, which eigenpairs() refuses
        raise ValueError(f"max_hvp={max_hvp} is too small to return {nw} eigenpairs")
    idx = select_ritz(theta, k, which)
    values = theta[idx].clone()
    coeff = S[:, idx].to(dtype=dtype, device=device)
    vectors = Q[:m].T @ coeff
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    residuals = res[idx].clone()
    threshold = tol * float(theta.abs().max())
    converged = residuals <= threshold
    if exhausted:
        converged = torch.ones_like(converged)
    reason = None
    if not bool(converged.all()):
        reason = budget_reason(max_hvp, residuals, threshold)
    return SolverOutput(values, vectors, residuals, converged, reason)


def budget_reason(max_hvp: int, residuals: Tensor, threshold: Tensor) -> str:
    """Why a solve stopped unconverged: the pair furthest above its tolerance, relative to it."""
    worst = int(torch.argmax(residuals / threshold))
    return (
        f"max_hvp={max_hvp} products reached before the tolerance "
        f"(residual {float(residuals[worst]):.3g} > tol * max|theta| = {float(threshold[worst]):.3g})"
    )
