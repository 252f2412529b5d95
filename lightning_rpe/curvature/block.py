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

import torch
from torch import Tensor

from .lanczos import SolverOutput, _failure, budget_reason, n_wanted, random_block, select_ritz
from .operator import CurvatureOperator

__all__ = ["lobpcg", "block_size", "DEFAULT_GUARD"]

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


def _project_out(W: Tensor, bases: list[Tensor]) -> Tensor:
    for B in bases:
        if B is not None and B.shape[1] > 0:
            W = W - B @ (B.T @ W)
    return W


def _orthonormalize(W: Tensor, bases: list[Tensor]) -> Tensor:
    """Orthonormal columns spanning ``W`` minus its part in ``span(bases)`` (bases orthonormal).

    Two passes of projection followed by SVQB (``W U D^-1/2`` from ``W^T W = U D U^T``),
    dropping columns that are numerically inside the span. The result may have fewer columns.
    """
    eps = torch.finfo(W.dtype).eps
    for _ in range(2):
        if W.shape[1] == 0:
            return W
        norms = W.norm(dim=0)
        keep = norms > 0
        W = W[:, keep] / norms[keep]
        W = _project_out(W, bases)
        norms = W.norm(dim=0)
        keep = norms > 1e3 * eps
        if not bool(keep.any()):
            return W[:, :0]
        W = W[:, keep] / norms[keep]
        G = (W.T @ W).to(torch.float64).cpu()
        G = (G + G.T) / 2
        d, U = torch.linalg.eigh(G)
        keep = d > 100 * eps * float(d.max())
        U = U[:, keep] / d[keep].sqrt()
        W = W @ U.to(dtype=W.dtype, device=W.device)
    return W


def _small(M: Tensor) -> Tensor:
    M = M.to(torch.float64).cpu()
    return (M + M.T) / 2


def _rayleigh_ritz(S: Tensor, AS: Tensor) -> tuple[Tensor, Tensor] | None:
    """Ritz values (ascending, float64) and coefficients (float64, S^T S-orthonormal) or None
    when ``S^T S`` is not numerically positive definite.
    """
    G = _small(S.T @ AS)
    M = _small(S.T @ S)
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
) -> SolverOutput:
    """Extreme eigenpairs of ``operator`` by LOBPCG with soft locking (see module docstring).

    ``init``: ``(dim, j)`` start columns (warm start), padded with random columns from
    ``generator`` to the block size :func:`block_size` (or ``n_wanted + guard`` when ``guard`` is
    given). Products: the block size for the first ``A X``, then one batched product per iteration
    on the unconverged residual columns; never more than ``max_hvp`` in total. Arguments are
    assumed validated by :func:`lightning_rpe.curvature.eigenpairs`.
    """
    dim, dtype, device = operator.dim, operator.dtype, operator.device
    nw = n_wanted(k, which)
    tol = torch.as_tensor(tol, dtype=torch.float64).reshape(-1).expand(nw)  # one per wanted pair
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
    cols = []
    if init is not None:
        cols.append(init.to(dtype=dtype, device=device).reshape(dim, -1)[:, :bs])
    X = torch.empty(dim, 0, dtype=dtype, device=device)
    for attempt in range(4):
        need = bs - X.shape[1]
        if need <= 0:
            break
        if attempt == 0 and cols:
            cand = cols[0]
            if cand.shape[1] < need:
                cand = torch.cat([cand, random_block(dim, need - cand.shape[1], generator, dtype, device)], 1)
        else:
            cand = random_block(dim, need, generator, dtype, device)
        X = torch.cat([X, _orthonormalize(cand, [X])], dim=1)
    X = X[:, :bs]
    AX = operator.matmat(X)
    if not bool(torch.isfinite(AX).all()):
        return _failure(dim, nw, dtype, device)
    rr = _rayleigh_ritz(X, AX)
    if rr is None:  # cannot happen for orthonormal X; guard anyway
        X = _orthonormalize(X, [])
        rr = _rayleigh_ritz(X, AX)
        assert rr is not None
    theta_all, C = rr
    Cw = C.to(dtype=dtype, device=device)
    X, AX = X @ Cw, AX @ Cw
    theta = theta_all.clone()
    P = AP = None

    reason: str | None = None
    while True:
        R = AX - X * theta.to(dtype=dtype, device=device)
        rnorm = R.norm(dim=0).to(torch.float64).cpu()
        scale = float(theta_all.abs().max())
        idx = select_ritz(theta, k, which)
        wanted = torch.zeros(theta.shape[0], dtype=torch.bool)
        wanted[idx] = True
        limit = torch.zeros(theta.shape[0], dtype=torch.float64)
        limit[idx] = tol * scale
        conv = rnorm <= limit
        if float(tol.min()) > 0 and bool(conv[wanted].all()):
            break
        remaining = max_hvp - spent()
        if remaining <= 0:
            break
        # active columns: the unconverged wanted ones, largest residual first. Guard columns
        # never cost products: they improve through the Rayleigh-Ritz step alone (measured:
        # fewer products than iterating them, cold and warm).
        order = sorted(
            [i for i in range(theta.shape[0]) if bool(wanted[i]) and not bool(conv[i])],
            key=lambda i: -float(rnorm[i]),
        )
        active = order[:remaining]
        W = _orthonormalize(R[:, active], [X] + ([P] if P is not None else []))
        if W.shape[1] == 0:
            # residuals numerically inside span[X, P]: widen with random directions instead
            W = _orthonormalize(
                random_block(dim, len(active), generator, dtype, device), [X] + ([P] if P is not None else [])
            )
            if W.shape[1] == 0:
                break  # [X, P] spans the whole space: the Ritz pairs are exact
        W = W[:, :remaining]
        AW = operator.matmat(W)
        if not bool(torch.isfinite(AW).all()):
            return _failure(dim, nw, dtype, device)

        blocks = [X, W] + ([P] if P is not None else [])
        ablocks = [AX, AW] + ([AP] if AP is not None else [])
        S, AS = torch.cat(blocks, 1), torch.cat(ablocks, 1)
        rr = _rayleigh_ritz(S, AS)
        if rr is None and P is not None:
            # S lost rank through P: drop the search directions for this step
            S, AS = torch.cat([X, W], 1), torch.cat([AX, AW], 1)
            rr = _rayleigh_ritz(S, AS)
        if rr is None:
            reason = "block solver: Rayleigh-Ritz basis lost rank"
            break
        theta_all, Call = rr
        sel = _select(theta_all, n_top, n_bottom)
        C = Call[:, sel]
        theta = theta_all[sel]
        # search directions: the [W, P] part of the kept coefficients, orthogonalised against
        # the kept coefficients in the S^T S inner product and made orthonormal (in float64)
        nx = X.shape[1]
        Y = C.clone()
        Y[:nx] = 0.0
        M = _small(S.T @ S)
        for _ in range(2):
            Y = Y - C @ (C.T @ M @ Y)
        G = (Y.T @ M @ Y + (Y.T @ M @ Y).T) / 2
        d, U = torch.linalg.eigh(G)
        keep = d > 1e-12 * max(float(d.max()), 1e-300)
        Y = Y @ (U[:, keep] / d[keep].sqrt())
        Cw = C.to(dtype=dtype, device=device)
        Yw = Y.to(dtype=dtype, device=device)
        X, AX = S @ Cw, AS @ Cw
        if Yw.shape[1] > 0:
            P, AP = S @ Yw, AS @ Yw
        else:
            P = AP = None

    idx = select_ritz(theta, k, which)
    R = AX[:, idx] - X[:, idx] * theta[idx].to(dtype=dtype, device=device)
    residuals = R.norm(dim=0).to(torch.float64).cpu()
    norms = X[:, idx].norm(dim=0)
    vectors = X[:, idx] / norms
    threshold = tol * float(theta_all.abs().max())
    converged = residuals <= threshold
    if reason is None and not bool(converged.all()):
        reason = budget_reason(max_hvp, residuals, threshold)
    return SolverOutput(theta[idx].clone(), vectors, residuals, converged, reason)

