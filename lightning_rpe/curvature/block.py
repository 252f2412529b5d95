"""Warm-startable block solver: LOBPCG with soft locking, for both ends of the spectrum.

Locally optimal block preconditioned conjugate gradient (Knyazev 2001) without a
preconditioner, in the basis-selection form of Hetmaniuk & Lehoucq (2006). Each iteration

1. forms the residuals ``R = A X - X Theta`` of the current Ritz block ``X`` (no product: ``A X``
   is carried along),
2. keeps only the wanted columns that have not converged (soft locking: converged columns and the
   guard columns stay in ``X`` and keep improving through the Rayleigh-Ritz step, but cost no
   more products),
3. orthonormalises them against ``[X, P]`` and among themselves (two passes of projection plus
   SVQB, dropping numerically dependent columns) into ``W``, and spends **one** batched product
   ``A W``,
4. performs Rayleigh-Ritz on ``S = [X, W, P]`` with ``A S = [A X, A W, A P]`` (the small
   generalised problem ``S^T A S c = theta S^T S c`` through a Cholesky factor of ``S^T S``,
   which absorbs rounding in the orthogonality of ``S``), and keeps the ``n_top`` largest and
   ``n_bottom`` smallest Ritz vectors as the new ``X``,
5. sets the new search directions ``P = S Y`` with ``Y`` the ``[W, P]`` part of the kept Ritz
   coefficients, made orthonormal and orthogonal to the kept coefficients in the small space,
   so that ``A X`` and ``A P`` follow from ``A S`` by the same coefficients: no product is
   recomputed.

A column has converged when ``||A x - theta x|| <= tol * max|theta|`` (max over the Ritz values
of the last Rayleigh-Ritz step). The residuals returned are those of the returned vectors,
computed from the carried ``A X`` (equal to the true ones up to rounding).

Warm start: ``init`` (for example the previous call's eigenvectors, whose order "k largest then
the smallest" is irrelevant here) fills the first columns of ``X``; the rest of the block is random
from the private generator. When the Hessian moved little, the first Rayleigh-Ritz step already
leaves small residuals and few iterations are needed. A warm start can only refine the directions
it is given: if a new, previously absent eigenvalue overtakes the old ones, the residual
directions must find it, which the residual test does not guarantee. Callers that need
certainty should cold-start Lanczos from time to time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .lanczos import (
    SolverOutput,
    _combine_rows,
    _failure,
    budget_reason,
    eigenvalue_errors,
    n_wanted,
    random_block,
    select_ritz,
)
from .operator import CurvatureOperator
from .orthogonal import orthonormalize

__all__ = ["DEFAULT_GUARD", "block_size", "lobpcg"]

# extra block columns beyond the wanted pairs. They cost products only for the first A X and then
# improve through the Rayleigh-Ritz step alone; they enlarge the subspace and so help to separate
# clustered wanted pairs from their neighbours. Measured on known spectra (dim 400, tol 1e-3):
# two guards save products on cold starts with clusters; on warm starts every guard column adds
# one product and saved none, so warm starts use none.
DEFAULT_GUARD = {"cold": 2, "warm": 0}


def block_size(dim: int, k: int, which: str, init: Tensor | None) -> int:
    """Columns of the LOBPCG block: ``n + guard`` (n pairs wanted; guard 2 cold, 0 warm),
    at least the number of ``init`` columns, and at most ``dim``.
    """
    nw = n_wanted(k, which)
    guard = DEFAULT_GUARD["warm" if init is not None else "cold"]
    bs = nw + guard
    if init is not None:
        bs = max(bs, init.shape[1] if init.ndim == 2 else 1)
    return max(nw, min(bs, dim))


def _split(bs: int, k: int, which: str) -> tuple[int, int]:
    """(n_top, n_bottom): how many of the largest / smallest Ritz vectors the block keeps."""
    if which == "largest":
        return bs, 0
    if which == "smallest":
        return 0, bs
    n_bottom = 1 + (bs - k - 1) // 2
    return bs - n_bottom, n_bottom


def _small(M: Tensor) -> Tensor:
    M = M.to(torch.float64).cpu()
    return (M + M.T) / 2


def _rayleigh_ritz(operator: CurvatureOperator, S: Tensor, AS: Tensor) -> tuple[Tensor, Tensor] | None:
    """Ritz values (ascending, float64) and coefficients (float64, S^T S-orthonormal) or None
    when ``S^T S`` is not numerically positive definite.
    """
    G = _small(operator.inner(S, AS))
    M = _small(operator.inner(S, S))
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        return None
    Linv = torch.linalg.solve_triangular(L, torch.eye(M.shape[0], dtype=torch.float64), upper=False)
    H = Linv @ G @ Linv.T
    theta, Z = torch.linalg.eigh((H + H.T) / 2)
    C = Linv.T @ Z
    return theta, C


def _select(theta: Tensor, n_top: int, n_bottom: int) -> Tensor:
    """Indices (ascending) of the n_bottom smallest and n_top largest of ascending ``theta``."""
    m = theta.shape[0]
    n_top = min(n_top, m)
    n_bottom = min(n_bottom, m - n_top)
    return torch.cat([torch.arange(n_bottom), torch.arange(m - n_top, m)])


def lobpcg(
    operator: CurvatureOperator,
    *,
    k: int,
    which: str,
    tol: float | Tensor,
    max_hvp: int,
    generator: torch.Generator,
    init: Tensor | None = None,
    guard: int | None = None,
    criterion: str = "residual",
    gap: Tensor | None = None,
) -> SolverOutput:
    """Extreme eigenpairs of ``operator`` by LOBPCG with soft locking (see module docstring).

    ``init``: ``(dim, j)`` start columns (warm start), padded with random columns from
    ``generator`` to the block size :func:`block_size` (or ``n_wanted + guard`` when ``guard`` is
    given). Products: the block size for the first ``A X`` (one batched product), then one batched
    product per iteration on the unconverged residual columns; never more than ``max_hvp`` in
    total, and no product is repeated (``A X`` and ``A P`` follow from ``A S`` by the Ritz
    coefficients).

    Memory (parameter-sized vectors, ``b`` the block size): ``[X, P, W]`` and their products live in
    two preallocated buffers of ``3 b`` rows each, updated in place in column chunks; the residual
    block and the orthonormalisation temporaries add at most ``4 b``, the returned vectors
    ``n_wanted``: at most ``10 b + n_wanted`` in all, independent of ``max_hvp``, on top of what
    one product of the operator holds.

    Stopping: every wanted pair has ``err_i <= tol_i * max|theta|``, with ``err_i`` the residual
    norm (``criterion="residual"``) or, with ``criterion="eigenvalue"``, the eigenvalue error
    estimate :func:`~lightning_rpe.curvature.lanczos.eigenvalue_errors` with the gap ``gap`` (one
    lower estimate per wanted pair, e.g. a previous Lanczos result's ``gaps``). The Ritz values of
    the small subspace ``[X, P, W]`` are never used as gap estimates: they say little about the
    neighbours of the wanted eigenvalues (measured: from a random block they over-estimated the
    gap of lambda_min 2x and the solve stopped on the neighbouring eigenvalue). Without ``gap``
    (or where it is NaN) the residual is used. Arguments are assumed validated by
    :func:`lightning_rpe.curvature.eigenpairs`.
    """
    dim, dtype, device = operator.dim, operator.dtype, operator.device
    nw = n_wanted(k, which)
    tol = torch.as_tensor(tol, dtype=torch.float64).reshape(-1).expand(nw)  # one per wanted pair
    hint = None if gap is None else gap.to(torch.float64).reshape(-1).expand(nw)
    if guard is None:
        bs = block_size(dim, k, which, init)
    else:
        bs = max(nw, min(nw + int(guard), dim))
        if init is not None:
            bs = max(bs, min(init.shape[1], dim))
    if bs > max_hvp:
        raise ValueError(f"max_hvp must be >= {bs} (the block size), got max_hvp={max_hvp}")
    n_top, n_bottom = _split(bs, k, which)
    start = operator.n_hvp

    def spent() -> int:
        return operator.n_hvp - start

    # ---- initial block: init columns, padded with random ones
    X = torch.empty(dim, 0, dtype=dtype, device=device)
    for attempt in range(4):
        need = bs - X.shape[1]
        if need <= 0:
            break
        if attempt == 0 and init is not None:
            cand = init.to(dtype=dtype, device=device).reshape(dim, -1)[:, :bs]
            if cand.shape[1] < need:
                cand = torch.cat([cand, random_block(dim, need - cand.shape[1], generator, dtype, device)], 1)
        else:
            cand = random_block(dim, need, generator, dtype, device)
        X = torch.cat([X, orthonormalize(operator, cand, [X])], dim=1)
        del cand
    X = X[:, :bs]
    nx = X.shape[1]
    # [X, P, W] and A[X, P, W] as rows of two buffers: S = V[:s].T is a view, never a copy
    V = torch.empty(3 * nx, dim, dtype=dtype, device=device)
    AV = torch.empty(3 * nx, dim, dtype=dtype, device=device)
    V[:nx] = X.T
    del X
    AX0 = operator.matmat(V[:nx].T)
    AV[:nx] = AX0.T
    del AX0
    if not bool(torch.isfinite(AV[:nx]).all()):
        return _failure(dim, nw, dtype, device)
    rr = _rayleigh_ritz(operator, V[:nx].T, AV[:nx].T)
    if rr is None:  # cannot happen for orthonormal X
        return _failure(dim, nw, dtype, device, "block solver: Rayleigh-Ritz basis lost rank")
    theta_all, C = rr
    _combine_rows(V, nx, C)
    _combine_rows(AV, nx, C)
    theta = theta_all.clone()
    n_p = 0  # columns of P (rows nx : nx + n_p)
    no_gap = torch.full((theta.shape[0],), math.nan, dtype=torch.float64)  # per column of X

    reason: str | None = None
    while True:
        X, AX = V[:nx].T, AV[:nx].T
        R = torch.addcmul(AX, X, theta.to(dtype=dtype, device=device), value=-1.0)
        rnorm = operator.norms(R).to(torch.float64).cpu()
        scale = float(theta_all.abs().max())
        idx = select_ritz(theta, k, which)
        wanted = torch.zeros(theta.shape[0], dtype=torch.bool)
        wanted[idx] = True
        limit = torch.zeros(theta.shape[0], dtype=torch.float64)
        limit[idx] = tol * scale
        err = rnorm.clone()
        if criterion == "eigenvalue":
            col_gap = no_gap.clone()
            if hint is not None:
                col_gap[idx] = hint
            err = eigenvalue_errors(rnorm, col_gap)
        conv = err <= limit
        if (float(tol.min()) > 0 and bool(conv[wanted].all())) or max_hvp - spent() <= 0:
            del R
            break
        remaining = max_hvp - spent()
        # active columns: the unconverged wanted ones, largest residual first. Guard columns
        # never cost products: they improve through the Rayleigh-Ritz step alone (measured:
        # fewer products than iterating them, cold and warm).
        order = sorted(
            [i for i in range(theta.shape[0]) if bool(wanted[i]) and not bool(conv[i])],
            key=lambda i: -float(rnorm[i]),
        )
        active = order[:remaining]
        P = V[nx : nx + n_p].T if n_p > 0 else None
        if len(active) < R.shape[1] or active != list(range(R.shape[1])):
            R = R[:, active]
        W = orthonormalize(operator, R, [X, P], overwrite=True)
        del R
        if W.shape[1] == 0:
            # residuals numerically inside span[X, P]: widen with random directions instead
            W = orthonormalize(operator, random_block(dim, len(active), generator, dtype, device), [X, P])
            if W.shape[1] == 0:
                break  # [X, P] spans the whole space: the Ritz pairs are exact (X, rnorm unchanged)
        W = W[:, :remaining]
        n_w = W.shape[1]
        s = nx + n_p + n_w
        V[nx + n_p : s] = W.T
        del W
        AW = operator.matmat(V[nx + n_p : s].T)
        AV[nx + n_p : s] = AW.T
        del AW
        if not bool(torch.isfinite(AV[nx + n_p : s]).all()):
            return _failure(dim, nw, dtype, device)

        rr = _rayleigh_ritz(operator, V[:s].T, AV[:s].T)
        if rr is None and n_p > 0:
            # S lost rank through P: drop the search directions for this step
            V[nx : nx + n_w] = V[nx + n_p : s].clone()
            AV[nx : nx + n_w] = AV[nx + n_p : s].clone()
            n_p, s = 0, nx + n_w
            rr = _rayleigh_ritz(operator, V[:s].T, AV[:s].T)
        if rr is None:
            reason = "block solver: Rayleigh-Ritz basis lost rank"
            break  # X and rnorm are those of the last completed step
        theta_all, Call = rr
        sel = _select(theta_all, n_top, n_bottom)
        C = Call[:, sel]
        theta = theta_all[sel]
        # search directions: the [P, W] part of the kept coefficients, orthogonalised against
        # the kept coefficients in the S^T S inner product and made orthonormal (in float64)
        Y = C.clone()
        Y[:nx] = 0.0
        M = _small(operator.inner(V[:s].T, V[:s].T))
        for _ in range(2):
            Y = Y - C @ (C.T @ M @ Y)
        G = (Y.T @ M @ Y + (Y.T @ M @ Y).T) / 2
        d, U = torch.linalg.eigh(G)
        keep = d > 1e-12 * max(float(d.max()), 1e-300)
        Y = Y @ (U[:, keep] / d[keep].sqrt())
        coeff = torch.cat([C, Y], dim=1)
        _combine_rows(V, s, coeff)
        _combine_rows(AV, s, coeff)
        n_p = Y.shape[1]

    # every exit leaves X, theta and rnorm of the same (last completed) Rayleigh-Ritz step
    idx = select_ritz(theta, k, which)
    residuals = rnorm[idx].clone()
    vectors = V[:nx].T[:, idx]
    vectors /= operator.norms(vectors)
    gaps = no_gap[idx].clone() if hint is None else hint.clone()
    errors = eigenvalue_errors(residuals, gaps) if criterion == "eigenvalue" else residuals
    threshold = tol * float(theta_all.abs().max())
    converged = errors <= threshold
    if reason is None and not bool(converged.all()):
        reason = budget_reason(max_hvp, errors, threshold)
    return SolverOutput(theta[idx].clone(), vectors, residuals, converged, reason, gaps)
