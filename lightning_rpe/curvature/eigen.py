"""Extreme eigenpairs of a curvature operator: :class:`EigenResult` and :func:`eigenpairs`.

Two solvers sit behind one call:

- ``"lanczos"`` (:mod:`.lanczos`): thick-restart Lanczos with full re-orthogonalisation from a
  random start, on a basis of at most ``max_basis`` vectors. One product per iteration; the best
  choice without prior information.
- ``"block"`` (:mod:`.block`): LOBPCG with soft locking, started from ``init`` (the previous
  eigenvectors) and padded with random columns. One batched product per iteration on the
  still-unconverged residuals; the best choice on a slowly moving Hessian.

``method="auto"`` picks the block solver when ``init`` is given and Lanczos otherwise.

Working memory is bounded by design, independent of the product budget ``max_hvp``: Lanczos keeps
``max_basis + 1 + max(1, n)`` parameter-sized vectors, the block solver ``10 b + n`` (``n`` pairs wanted,
``b`` its block size), each on top of what one product of the operator holds. Every reduction
over the parameter dimension goes through :meth:`CurvatureOperator.inner`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .block import block_size, lobpcg
from .lanczos import (
    NONFINITE_REASON,
    default_max_basis,
    lanczos,
    n_wanted,
    random_block,
)
from .operator import CurvatureOperator
from .orthogonal import orthonormalize

__all__ = ["DEFAULT_SEED", "EigenResult", "default_max_basis", "default_max_hvp", "eigenpairs"]

DEFAULT_SEED = 0
_WHICH = ("largest", "smallest", "both")
_METHODS = ("auto", "lanczos", "block")
_CRITERIA = ("residual", "eigenvalue")


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator ``A`` with their quality.

    Ordering: ``"largest"``: k pairs, descending; ``"smallest"``: k pairs, ascending (most
    negative first); ``"both"``: the k largest (descending) followed by the smallest (k + 1 pairs).

    Attributes:
        eigenvalues: ``(m,)`` float64 on the CPU, in the operator's units (loss / parameter^2
            for a Hessian).
        eigenvectors: ``(dim, m)`` unit columns in the operator's dtype and device.
        residuals: ``(m,)`` float64, ``||A v - lambda v||`` of the returned pairs.
        converged: ``(m,)`` bool, ``residual <= tol * max|theta|`` over the Ritz values.
        n_hvp: products this call spent.
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        reason: why some pair did not converge or the solve failed; ``None`` when all converged.
        gaps: ``(m,)`` float64, the estimated distance of each eigenvalue to the rest of the
            spectrum (Lanczos: from its Ritz values, capped by the ``gap`` passed in; block solver:
            the ``gap`` passed in); NaN where unknown. Pass it as ``gap=`` to the next warm solve.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    n_hvp: int
    which: str
    reason: str | None
    gaps: Tensor | None = None

    @property
    def lambda_max(self) -> float | None:
        """Largest eigenvalue, or ``None`` when ``which="smallest"``."""
        if self.which == "smallest":
            return None
        return float(self.eigenvalues[0])

    @property
    def lambda_min(self) -> float | None:
        """Smallest (most negative) eigenvalue, or ``None`` when ``which="largest"``."""
        if self.which == "largest":
            return None
        return float(self.eigenvalues[-1] if self.which == "both" else self.eigenvalues[0])

    @property
    def top(self) -> Tensor | None:
        """The k largest eigenvalues (descending), or ``None`` when ``which="smallest"``."""
        if self.which == "smallest":
            return None
        return self.eigenvalues[:-1] if self.which == "both" else self.eigenvalues

    @property
    def all_converged(self) -> bool:
        """True when every returned pair met the tolerance."""
        return bool(self.converged.all())


def default_max_hvp(dim: int, k: int, which: str) -> int:
    """Default product budget: ``min(dim, 50 + 30 * n)`` with ``n`` pairs wanted (k, or k + 1).

    Lanczos on network Hessians reaches ``tol=1e-3`` for lambda_max in roughly 15-40 products
    and needs a few tens more per additional well-separated pair; 50 + 30 n leaves room for
    moderately clustered spectra (the basis memory is capped separately, ``max_basis``). With
    ``dim`` products the Krylov space is the whole space, so more is never needed.
    """
    return min(int(dim), 50 + 30 * n_wanted(k, which))


def working_vectors(
    dim: int, k: int, which: str, method: str, init: Tensor | None = None, max_basis: int | None = None
) -> int:
    """Upper bound on the parameter-sized vectors a solve holds besides the operator's own memory.

    Lanczos: ``max_basis + 1 + max(1, n)`` (basis and a spare row for restarts, then the product or, at
    the end, the returned vectors); block solver: ``10 b + n`` (``[X, P, W]`` and their products in two ``3 b``-row buffers,
    the residual block, orthonormalisation temporaries, returned vectors). ``n``: pairs wanted,
    ``b``: :func:`~lightning_rpe.curvature.block.block_size`. Checked by counting live vectors in
    tests/test_bounded_memory.py.
    """
    nw = n_wanted(k, which)
    if method == "block":
        return 10 * block_size(dim, k, which, init) + nw
    basis = default_max_basis(dim, k, which) if max_basis is None else min(int(max_basis), dim)
    return basis + 1 + max(1, nw)


def _check_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator(device="cpu").manual_seed(DEFAULT_SEED)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_init(init: Tensor | None, dim: int) -> Tensor | None:
    if init is None:
        return None
    if not isinstance(init, Tensor):
        raise ValueError(f"init must be a tensor of shape (dim={dim}, j) or None, got {type(init).__name__}")
    if init.ndim == 1:
        init = init.unsqueeze(1)
    if init.ndim != 2 or init.shape[0] != dim or not 1 <= init.shape[1] <= dim:
        raise ValueError(
            f"init must have shape (dim={dim}, j) with 1 <= j <= {dim} (previous eigenvectors as columns), "
            f"got {tuple(init.shape)}"
        )
    if not bool(torch.isfinite(init).all()):
        raise ValueError("init must be finite")
    return init


def _check_gap(gap: Any, nw: int) -> Tensor | None:
    if gap is None:
        return None
    try:
        out = torch.as_tensor(gap, dtype=torch.float64).reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError):
        out = None
    if out is None or out.shape[0] not in (1, nw):
        raise ValueError(f"eigenpairs: gap must be None, a float or a tensor of {nw} gap estimates (one per pair), got {gap!r}")
    return out.expand(nw).clone()


def _check_tol(name: str, value: Any, alternatives: str = "") -> float:
    # a number, not a bool (True would be a tolerance of 1) nor a string that float() happens to parse
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a finite float >= 0{alternatives}, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a finite float >= 0{alternatives}, got {value!r}")
    return out


def eigenpairs(
    operator: CurvatureOperator,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-3,
    max_hvp: int | None = None,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    method: str = "auto",
    tol_smallest: float | None = None,
    max_basis: int | None = None,
    criterion: str = "residual",
    gap: Tensor | None = None,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator, stopped on residuals.

    A pair ``(theta, v)`` has converged when ``err <= tol * max|theta|``, the max over all current
    Ritz values (a relative tolerance on the operator's scale). With ``criterion="residual"``
    (default) ``err = ||A v - theta v||``; by the Bauer-Fike / Kato-Temple bounds the eigenvalue
    error is then at most the residual, and at most ``residual^2 / gap`` when the eigenvalue is
    separated from the rest by ``gap``. ``criterion="eigenvalue"`` stops on that second bound,
    ``err = min(r, r^2 / gap)``, for when the eigenvalue and not the vector is what is reported: the
    vectors then meet only ``r <= sqrt(tol * max|theta| * gap)``. The gap is the ``gap`` argument
    (Lanczos: capped by its Ritz gaps, each Ritz value less its residual); without it the residual
    is used. A gap estimate exceeds the true gap when an eigenvalue next to the wanted one is
    missing from the subspace, and the solve may then stop on that neighbour, so the gap must come
    from a solve that ran to the residual tolerance: pass a cold Lanczos result's ``gaps`` to the
    warm solves that follow.

    Args:
        operator: a :class:`CurvatureOperator` (products are counted on it).
        k: number of largest (or smallest) pairs, ``1 <= k <= dim`` (``k + 1 <= dim`` for "both").
        which: ``"largest"`` | ``"smallest"`` | ``"both"`` (k largest plus the smallest, one run).
        tol: relative residual tolerance, finite and ``>= 0`` (``0`` runs to the budget).
        max_hvp: product budget; default :func:`default_max_hvp`, ``min(dim, 50 + 30 n)``.
        init: ``(dim, j)`` previous eigenvectors (warm start), e.g. ``previous.eigenvectors``.
            Lanczos starts from their sum with 10 % of a random vector mixed in; the block solver
            searches the span of ``init`` and its residual directions, so an ``init`` that spans an
            invariant subspace (exact eigenvectors other than the wanted ones) converges to those
            (a review: ``init`` = the second eigenvector gave the second eigenvalue as lambda_max,
            "converged"). A multiple eigenvalue is returned once by Lanczos (the next values are the
            following distinct ones); the block solver resolves multiplicities up to its block size.
        generator: source of the random start vectors; default a private generator seeded with
            :data:`DEFAULT_SEED`, so repeated calls are reproducible. The global RNG is never used.
        method: ``"auto"`` (block when ``init`` is given, else Lanczos) | ``"lanczos"`` | ``"block"``
            (the monitor uses ``"lanczos"`` unless told otherwise).
        tol_smallest: with ``which="both"``, the tolerance of the smallest pair (default ``tol``).
            Its residual is still measured against ``max|theta|``: when ``lambda_min`` sits in a
            cluster near 0 far below ``lambda_max``, a looser value here saves most of the products
            while the top pairs keep ``tol``.
        max_basis: Lanczos basis cap in vectors (thick restart when full; default
            :func:`default_max_basis`, ``min(dim, max(12, 2 n + 8))``); ``>= n + 3``. Ignored by the
            block solver, whose memory is set by its block size.
        criterion: ``"residual"`` | ``"eigenvalue"`` (see above).
        gap: ``(m,)`` gap estimates of the wanted pairs in result order, e.g. ``previous.gaps``
            (NaN entries ignored), or None. Only used with ``criterion="eigenvalue"``.

    Returns:
        :class:`EigenResult`. A non-finite product returns NaN values, ``converged`` all false and
        ``reason="non-finite Hessian-vector product"`` instead of raising.
    """
    if not isinstance(operator, CurvatureOperator):
        raise ValueError(f"operator must be a CurvatureOperator, got {type(operator).__name__}")
    dim = operator.dim
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int with 1 <= k <= dim={dim}, got {k!r}")
    kmax = dim - 1 if which == "both" else dim
    if not 1 <= k <= kmax:
        extra = " (which='both' also returns the smallest, so k + 1 <= dim)" if which == "both" else ""
        raise ValueError(f"k must satisfy 1 <= k <= {kmax} for dim={dim}{extra}, got k={k}")
    tol = _check_tol("tol", tol)
    if tol_smallest is not None:
        if which != "both":
            raise ValueError(f"tol_smallest applies to which='both' only; got which={which!r}")
        tol_smallest = _check_tol("tol_smallest", tol_smallest, " or None")
    init = _check_init(init, dim)
    generator = _check_generator(generator)
    if method == "auto":
        method = "block" if init is not None else "lanczos"
    if criterion not in _CRITERIA:
        raise ValueError(f"eigenpairs: criterion must be one of {_CRITERIA}, got {criterion!r}")

    nw = n_wanted(k, which)
    if max_basis is not None and (
        isinstance(max_basis, bool) or not isinstance(max_basis, int) or max_basis < min(nw + 3, dim)
    ):
        raise ValueError(f"eigenpairs: max_basis must be an int >= {min(nw + 3, dim)} or None, got {max_basis!r}")
    gap = _check_gap(gap, nw)
    if method == "block":
        needed = block_size(dim, k, which, init)
    else:
        needed = nw
    if max_hvp is None:
        max_hvp = max(default_max_hvp(dim, k, which), needed)
    if isinstance(max_hvp, bool) or not isinstance(max_hvp, int):
        raise ValueError(f"max_hvp must be an int >= {needed} or None, got {max_hvp!r}")
    if max_hvp < needed:
        raise ValueError(
            f"max_hvp must be >= {needed} (the {method} solver needs that many products to return "
            f"{nw} pairs), got max_hvp={max_hvp}"
        )

    tols = torch.full((nw,), tol, dtype=torch.float64)
    if tol_smallest is not None:
        tols[-1] = tol_smallest  # "both": the smallest pair comes last
    start_count = operator.n_hvp
    operator.reserve(working_vectors(dim, k, which, method, init, max_basis))
    with torch.no_grad():
        if method == "block":
            out = lobpcg(operator, k=k, which=which, tol=tols, max_hvp=max_hvp, generator=generator, init=init,
                         criterion=criterion, gap=gap)
        else:
            # the start vector is passed without a name, so lanczos can drop it once in its basis; the
            # warm block itself is released here (a caller that passed its only reference frees it)
            starts = [] if init is None else [_warm_start_vector(init, generator, operator)]
            init = None
            out = lanczos(operator, k=k, which=which, tol=tols, max_hvp=max_hvp, generator=generator,
                          start=starts.pop() if starts else None,
                          max_basis=max_basis, criterion=criterion, gap=gap)
    return EigenResult(
        eigenvalues=out.values,
        eigenvectors=out.vectors,
        residuals=out.residuals,
        converged=out.converged,
        n_hvp=operator.n_hvp - start_count,
        which=which,
        reason=out.reason,
        gaps=out.gaps,
    )


def _warm_start_vector(init: Tensor, generator: torch.Generator, operator: CurvatureOperator) -> Tensor:
    """Lanczos start from previous eigenvectors: the sum of their orthonormalised columns plus a
    random part of relative weight 0.1, so directions absent from ``init`` are still reached.
    """
    Qx = orthonormalize(operator, init.to(dtype=operator.dtype, device=operator.device), [])
    u = Qx.sum(dim=1)
    u = u / operator.norms(u)[0]
    r = random_block(operator.dim, 1, generator, operator.dtype, operator.device)[:, 0]
    return u + 0.1 * r / operator.norms(r)[0]


__all__ += ["NONFINITE_REASON"]
