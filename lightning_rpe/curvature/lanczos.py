"""Thick-restart Lanczos with full re-orthogonalisation for extreme eigenpairs of a symmetric operator.

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

The basis is capped at ``max_basis`` vectors and restarted thickly when full (see :func:`lanczos`),
so the working memory does not grow with the product budget.

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
from .orthogonal import project_out

__all__ = [
    "SolverOutput",
    "default_max_basis",
    "eigenvalue_errors",
    "lanczos",
    "n_wanted",
    "random_block",
    "ritz_gaps",
    "select_ritz",
]

NONFINITE_REASON = "non-finite Hessian-vector product"


class SolverOutput(NamedTuple):
    """What a solver hands to :func:`lightning_rpe.curvature.eigenpairs` (already ordered).

    ``values`` / ``residuals``: float64 on the CPU; ``vectors``: ``(dim, m)`` in the operator's
    dtype and device; ``converged``: bool on the CPU; ``reason``: ``None`` when all converged;
    ``gaps``: float64 estimated gap of each pair to the rest of the spectrum (:func:`ritz_gaps`),
    NaN where the subspace holds no other Ritz value.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: Tensor
    reason: str | None
    gaps: Tensor | None = None


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


def _failure(
    dim: int, m: int, dtype: torch.dtype, device: torch.device, reason: str = NONFINITE_REASON
) -> SolverOutput:
    nan = torch.full((m,), math.nan, dtype=torch.float64)
    return SolverOutput(
        values=nan.clone(),
        vectors=torch.full((dim, m), math.nan, dtype=dtype, device=device),
        residuals=nan.clone(),
        converged=torch.zeros(m, dtype=torch.bool),
        reason=reason,
        gaps=nan.clone(),
    )


def default_max_basis(dim: int, k: int, which: str) -> int:
    """Default basis cap of :func:`lanczos`: ``min(dim, max(12, 2 n + 8))`` vectors, ``n`` pairs wanted.

    Chosen from measured product counts (docs/benchmarks.md, "Bounded memory"): at 12 vectors the
    restarted solve of lambda_max (and lambda_min) on the benchmark networks needs at most a few
    products more than the unrestarted one.
    """
    return min(int(dim), max(12, 2 * n_wanted(k, which) + 8))


def _keep_count(cap: int, nw: int) -> int:
    """Ritz vectors kept on a thick restart: the wanted ones and about as many neighbours, leaving
    at least 3 new Lanczos vectors per cycle.
    """
    return max(nw, min(cap - 3, max(2 * nw, (cap + 1) // 2)))


def _keep_indices(theta: Tensor, n_keep: int, k: int, which: str) -> Tensor:
    """Indices (into ascending ``theta``) of the Ritz vectors kept on restart: the wanted ends
    first (``n_keep`` in all; for "both" the extra vectors are split between the two ends).
    """
    m = theta.shape[0]
    order = torch.arange(m)
    if which == "largest":
        return order.flip(0)[:n_keep]
    if which == "smallest":
        return order[:n_keep]
    extra = n_keep - (k + 1)
    n_top = k + extra // 2
    n_bottom = n_keep - n_top
    return torch.cat([order.flip(0)[:n_top], order[:n_bottom]])


def _combine_rows(Q: Tensor, m: int, coeff: Tensor, scratch: Tensor | None = None) -> None:
    """In place: ``Q[:l] <- coeff^T Q[:m]`` for ``coeff`` of shape ``(m, l)``, ``l <= m``.

    Row-local (no reduction over ``dim``), done in column chunks of ``Q``: with ``scratch`` (a free
    contiguous row of ``dim`` entries, e.g. a spare row of the basis) each chunk's product is written
    into it and copied back, so nothing is allocated; without it chunks of ``ceil(dim / (4 l))``
    entries leave a temporary of about a quarter of a parameter vector rather than ``l`` vectors.
    """
    n_keep = coeff.shape[1]
    C = coeff.T.to(dtype=Q.dtype, device=Q.device).contiguous()
    if scratch is not None:
        chunk = max(1, scratch.shape[0] // max(n_keep, 1))  # n_keep rows of chunk entries fit in it
    else:
        chunk = max(1, -(-Q.shape[1] // max(4 * n_keep, 1)))
    for c0 in range(0, Q.shape[1], chunk):
        width = min(chunk, Q.shape[1] - c0)
        if scratch is None:
            Q[:n_keep, c0 : c0 + width] = C @ Q[:m, c0 : c0 + width]
        else:
            buf = scratch[: n_keep * width].view(n_keep, width)
            torch.matmul(C, Q[:m, c0 : c0 + width], out=buf)
            Q[:n_keep, c0 : c0 + width].copy_(buf)


def ritz_gaps(theta: Tensor, res: Tensor, idx: Tensor) -> Tensor:
    """Estimated distance from each selected Ritz value to the rest of the spectrum.

    ``gap_i = min_{j != i} (|theta_i - theta_j| - res_j)``: each other Ritz value ``theta_j`` has an
    eigenvalue within ``res_j`` of it (Bauer-Fike for symmetric matrices), so this is the distance
    to the nearest eigenvalue the current subspace has seen, less its uncertainty. NaN when there
    is no other Ritz value. It over-estimates the true gap when a neighbouring eigenvalue has not
    been seen yet (an eigenvalue missing from the subspace); see :func:`eigenvalue_errors`.
    """
    out = torch.full((idx.shape[0],), math.nan, dtype=torch.float64)
    if theta.shape[0] < 2:
        return out
    for n, i in enumerate(idx.tolist()):
        others = torch.ones(theta.shape[0], dtype=torch.bool)
        others[i] = False
        out[n] = float(((theta[others] - theta[i]).abs() - res[others]).min())
    return out


def eigenvalue_errors(res: Tensor, gaps: Tensor) -> Tensor:
    """Eigenvalue error estimate of Ritz pairs: ``r^2 / gap`` where ``r <= gap / 4``, else ``r``.

    For a unit vector with Rayleigh quotient ``theta`` and residual ``r``, some eigenvalue lies
    within ``r`` of ``theta`` (Bauer-Fike for symmetric matrices) and, when that eigenvalue is
    separated from all others by ``gap``, within ``r^2 / gap`` (Kato-Temple; Parlett, The Symmetric
    Eigenvalue Problem, ch. 11). The quadratic bound is used only once ``r <= gap / 4``, where the
    eigenvalue near ``theta`` is unambiguous; above it a Ritz value between two eigenvalues could
    be taken for converged to the wrong one (measured: a warm block solve stopped on the neighbour
    of lambda_min without this condition, tests/test_bounded_memory.py). ``gap`` NaN or ``<= 0``: ``r``.
    """
    g = torch.nan_to_num(gaps.to(torch.float64), nan=0.0)
    quad = (g > 0) & (res <= g / 4)
    return torch.where(quad, res * res / g.clamp_min(1e-300), res)


def lanczos(
    operator: CurvatureOperator,
    *,
    k: int,
    which: str,
    tol: float | Tensor,
    max_hvp: int,
    generator: torch.Generator,
    start: Tensor | None = None,
    max_basis: int | None = None,
    criterion: str = "residual",
    gap: Tensor | None = None,
) -> SolverOutput:
    """Extreme eigenpairs of ``operator`` by thick-restart Lanczos with full re-orthogonalisation.

    Lanczos (see the module docstring) on a basis of at most ``max_basis`` vectors (default
    :func:`default_max_basis`). When the basis is full it is restarted thickly (Wu & Simon 2000,
    "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM J. Matrix Anal.
    Appl. 22(2)): the basis is replaced in place by the ``l`` Ritz vectors nearest the wanted ends
    (:func:`_keep_count`) plus the last Lanczos vector, and the projected matrix by the arrowhead
    ``[[diag(theta), beta s_last], [beta s_last^T, .]]``, so that ``A Q = Q T + beta q e^T`` still
    holds and the residual of a Ritz pair is still ``|beta s_last|``. No product is repeated.

    Memory (parameter-sized vectors, independent of ``max_hvp``): the basis ``max_basis`` and one
    spare row (the scratch of a restart), and besides them either the product ``A q``
    (orthogonalised in place, ``addmv_``) or at the end the ``n_wanted`` returned Ritz vectors:
    ``max_basis + 1 + max(1, n_wanted)``, on top of what one product of the operator holds beside
    its output. The start vector is dropped once copied into the basis.

    Stops when every wanted Ritz pair meets ``err_i <= tol_i * max|theta|`` (max over all
    current Ritz values; ``tol`` holds one float64 tolerance per wanted pair, in result order),
    where ``err_i`` is the residual ``|beta s_last|`` (``criterion="residual"``, or no ``gap``) or,
    with ``criterion="eigenvalue"`` and ``gap`` (one estimate per wanted pair, e.g. a previous
    cold solve's ``gaps``), the eigenvalue error estimate :func:`eigenvalue_errors` with the gap
    ``min(gap, ritz_gaps)`` (the residual while there is no other Ritz value: a gap passed in says
    nothing about a first Ritz value's neighbours; measured: ``gap=1e30`` stopped a cold solve after
    one product at 1e-4 of lambda_max). Ritz gaps alone are not trusted: from a few Krylov vectors they
    over-estimated the gap when an eigenvalue next to the wanted one had not appeared yet, and the
    solve stopped on the neighbour (measured on a known spectrum, tests/test_bounded_memory.py);
    or when ``max_hvp`` products were spent, or when the Krylov space
    is the whole space (then the pairs are exact up to rounding and count as converged).

    ``start``: optional start vector ``(dim,)`` (normalised here); otherwise a Gaussian vector
    from ``generator``. Arguments are assumed validated by :func:`eigenpairs`.
    """
    dim, dtype, device = operator.dim, operator.dtype, operator.device
    nw = n_wanted(k, which)
    tol = torch.as_tensor(tol, dtype=torch.float64).reshape(-1).expand(nw)  # one per wanted pair
    cap = min(int(max_basis) if max_basis is not None else default_max_basis(dim, k, which), dim)
    cap = max(cap, min(nw + 3, dim))
    eps = torch.finfo(dtype).eps
    # beta below this (relative to the spectrum's scale seen so far) is an invariant subspace
    breakdown_tol = 100.0 * eps * math.sqrt(dim)

    # the start vector before the basis, so that its float64 draw is not held beside the basis
    q = start.to(dtype=dtype, device=device).reshape(dim) if start is not None else None
    del start
    if q is None or not 0.0 < float(operator.norms(q)[0]) < math.inf:
        q = random_block(dim, 1, generator, dtype, device)[:, 0]
    Q = torch.empty(cap + 1, dim, dtype=dtype, device=device)  # basis as rows, and a spare row
    torch.div(q, operator.norms(q)[0], out=Q[0])
    del q

    T = torch.zeros(cap + 1, cap + 1, dtype=torch.float64)  # projected matrix of the basis
    j = 0  # index of the vector to multiply next; Q[:j] have known products
    spent = 0
    scale = 0.0
    theta = S = res = None
    exhausted = False
    while True:
        w = operator.matvec(Q[j])
        spent += 1
        # finite norm <=> finite entries (torch.isfinite would allocate a vector-sized |w|); through
        # operator.norms, so every process of a sharded operator takes the same branch
        if not math.isfinite(float(operator.norms(w)[0])):
            return _failure(dim, nw, dtype, device)
        basis = Q[: j + 1]
        # w -= Q^T h in place (addmv_: no parameter-sized temporary), twice
        h = operator.inner(basis.T, w)[:, 0]
        w.addmv_(basis.T, h, alpha=-1)
        h2 = operator.inner(basis.T, w)[:, 0]
        w.addmv_(basis.T, h2, alpha=-1)
        col = (h + h2).to(torch.float64).cpu()
        T[: j + 1, j] = col
        T[j, : j + 1] = col
        b = float(operator.norms(w)[0])
        m = j + 1

        theta, S = torch.linalg.eigh(T[:m, :m])
        scale = max(scale, float(theta.abs().max()))
        breakdown = b <= breakdown_tol * max(scale, torch.finfo(dtype).tiny)
        exhausted = m == dim
        last_beta = 0.0 if exhausted else b
        res = (last_beta * S[-1, :]).abs()

        if theta.shape[0] >= nw:
            idx = select_ritz(theta, k, which)
            err = res[idx]
            if criterion == "eigenvalue" and gap is not None:
                err = eigenvalue_errors(err, torch.minimum(ritz_gaps(theta, res, idx), gap.to(torch.float64)))
            # tol=0 runs to the budget (a Ritz residual can be exactly 0 by deflation in eigh)
            if float(tol.min()) > 0 and bool((err <= tol * float(theta.abs().max())).all()):
                break
        if exhausted or spent >= max_hvp:
            break
        if breakdown:
            # invariant subspace: continue the basis with a random vector orthogonal to it
            b = 0.0
            for _ in range(5):
                r = random_block(dim, 1, generator, dtype, device)
                r = project_out(operator, project_out(operator, r, [basis.T]), [basis.T])[:, 0]
                nr = float(operator.norms(r)[0])
                if nr > 1e-3 * math.sqrt(dim):
                    break
            w = r / nr
        else:
            w /= b
        if m < cap:
            Q[m] = w
            T[m - 1, m] = T[m, m - 1] = b
            j = m
        else:
            # thick restart: keep n_keep Ritz vectors, then the residual direction w
            n_keep = _keep_count(cap, nw)
            keep = _keep_indices(theta, n_keep, k, which)
            coeff = S[:, keep]
            _combine_rows(Q, m, coeff, scratch=Q[cap])  # Q[cap] is never a basis vector (m <= cap)
            Q[n_keep] = w
            T.zero_()
            T[:n_keep, :n_keep] = torch.diag(theta[keep])
            arrow = b * S[-1, keep]
            T[:n_keep, n_keep] = arrow
            T[n_keep, :n_keep] = arrow
            j = n_keep
        del w
    del w

    assert theta is not None and S is not None and res is not None
    m = theta.shape[0]
    if m < nw:
        # only reachable when max_hvp < n_wanted, which eigenpairs() refuses
        raise ValueError(f"max_hvp={max_hvp} is too small to return {nw} eigenpairs")
    idx = select_ritz(theta, k, which)
    values = theta[idx].clone()
    coeff = S[:, idx].to(dtype=dtype, device=device)
    vectors = Q[:m].T @ coeff
    vectors /= operator.norms(vectors)
    residuals = res[idx].clone()
    gaps = ritz_gaps(theta, res, idx)
    if gap is not None:
        gaps = torch.fmin(gaps, gap.to(torch.float64))
    # the stopping gap needs a Ritz gap too (torch.minimum keeps its NaN: residual rule): with one
    # Ritz value nothing is known of the neighbours, whatever gap was passed in
    errors = residuals
    if criterion == "eigenvalue" and gap is not None:
        errors = eigenvalue_errors(residuals, torch.minimum(ritz_gaps(theta, res, idx), gap.to(torch.float64)))
    threshold = tol * float(theta.abs().max())
    converged = errors <= threshold
    if exhausted:
        converged = torch.ones_like(converged)
    reason = None
    if not bool(converged.all()):
        reason = budget_reason(max_hvp, errors, threshold)
    return SolverOutput(values, vectors, residuals, converged, reason, gaps)


def budget_reason(max_hvp: int, errors: Tensor, threshold: Tensor) -> str:
    """Why a solve stopped unconverged: the pair furthest above its tolerance, relative to it
    (``errors``: the residuals, or the eigenvalue error estimates with ``criterion="eigenvalue"``).
    """
    worst = int(torch.argmax(errors / threshold))
    return (
        f"max_hvp={max_hvp} products reached before the tolerance "
        f"(error {float(errors[worst]):.3g} > tol * max|theta| = {float(threshold[worst]):.3g})"
    )
