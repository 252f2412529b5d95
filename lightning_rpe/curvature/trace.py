"""Stochastic trace estimation: Hutchinson and Hutch++ with a standard error.

Hutchinson (1989): for Rademacher probes ``g`` (entries +-1), ``E[g^T A g] = tr(A)``; the estimate
is the mean of ``z_i = g_i^T A g_i`` over the probes, with ``Var[z] = 2 (||A||_F^2 - sum_i A_ii^2)``.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021) splits a budget of ``m`` products into

1. ``s = m // 3`` products ``Y = A S`` on Rademacher probes ``S`` and an orthonormal basis ``Q``
   of ``range(Y)`` (Gram-Schmidt with SVQB through the operator's inner product), which captures the dominant eigenspace,
2. ``s`` products for the exact part ``tr(Q^T A Q)``,
3. the remaining ``m - 2 s`` products for Hutchinson on the deflated operator
   ``(I - Q Q^T) A (I - Q Q^T)``, whose Frobenius norm (hence variance) is much smaller when the
   spectrum decays, as Hessian spectra do.

The estimate is unbiased for any ``Q`` independent of the Hutchinson probes. ``std_error`` is the
standard error of the stochastic part given the sketch: ``std(z) / sqrt(n_z)`` with the sample
standard deviation (``n_z - 1`` in the denominator) over the ``n_z`` Hutchinson probes; NaN when
``n_z < 2``, 0 when the sketch spans the whole space (the estimate is then exact). Products are
issued in blocks through :meth:`CurvatureOperator.matmat`; every reduction over the parameter
dimension goes through :meth:`CurvatureOperator.inner`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .eigen import DEFAULT_SEED
from .operator import CurvatureOperator
from .orthogonal import orthonormalize, project_out

__all__ = ["TraceResult", "trace", "DEFAULT_SEED"]

_METHODS = ("hutch++", "hutchinson")
_CHUNK = 32  # columns per matmat call


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate in the operator's units (loss / parameter^2 for a Hessian).

    Attributes:
        estimate: the estimate of ``tr(A)`` (NaN after a non-finite product).
        std_error: standard error of the stochastic part (see module docstring).
        n_hvp: products spent.
        method: ``"hutch++"`` or ``"hutchinson"``.
    """

    estimate: float
    std_error: float
    n_hvp: int
    method: str


def _rademacher(dim: int, b: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    bits = torch.randint(0, 2, (dim, b), generator=generator, device=generator.device, dtype=torch.int8)
    return (bits.to(dtype=dtype) * 2 - 1).to(device=device)


def _matmat(operator: CurvatureOperator, V: Tensor) -> Tensor | None:
    """A @ V in chunks of columns; None when a product is not finite."""
    out = []
    for i in range(0, V.shape[1], _CHUNK):
        part = operator.matmat(V[:, i : i + _CHUNK])
        if not bool(torch.isfinite(part).all()):
            return None
        out.append(part)
    return torch.cat(out, dim=1)


def _hutchinson_samples(operator: CurvatureOperator, G: Tensor) -> Tensor | None:
    AG = _matmat(operator, G)
    if AG is None:
        return None
    return operator.inner(G, AG, columnwise=True).to(torch.float64).cpu()


def _mean_and_stderr(z: Tensor) -> tuple[float, float]:
    n = z.shape[0]
    if n == 0:
        return 0.0, 0.0
    mean = float(z.mean())
    if n < 2:
        return mean, math.nan
    return mean, float(z.std(unbiased=True)) / math.sqrt(n)


def trace(
    operator: CurvatureOperator,
    n_hvp: int = 60,
    method: str = "hutch++",
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` of a symmetric operator from ``n_hvp`` products.

    Args:
        operator: a :class:`CurvatureOperator`.
        n_hvp: product budget; ``>= 3`` for Hutch++ (one each for sketch, exact part and
            deflated probes), ``>= 1`` for Hutchinson (``>= 2`` for a finite standard error).
        method: ``"hutch++"`` (default; far lower variance when a few eigenvalues dominate) or
            ``"hutchinson"``.
        generator: source of the Rademacher probes; default a private generator seeded with
            :data:`DEFAULT_SEED`. The global RNG is never used.

    Returns:
        :class:`TraceResult`; a non-finite product gives NaN estimate and standard error.
    """
    if not isinstance(operator, CurvatureOperator):
        raise ValueError(f"operator must be a CurvatureOperator, got {type(operator).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    minimum = 3 if method == "hutch++" else 1
    if isinstance(n_hvp, bool) or not isinstance(n_hvp, int) or n_hvp < minimum:
        raise ValueError(f"n_hvp must be an int >= {minimum} for method={method!r}, got {n_hvp!r}")
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(DEFAULT_SEED)
    elif not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    dim, dtype, device = operator.dim, operator.dtype, operator.device
    start = operator.n_hvp
    # Hutchinson: probes and products of all n_hvp columns; Hutch++: sketch, its basis and products
    # (s columns each) and the deflated probes with their products
    operator.reserve(2 * n_hvp if method == "hutchinson" else 4 * min(n_hvp // 3, dim) + 2 * (n_hvp - 2 * (n_hvp // 3)))
    nan = TraceResult(math.nan, math.nan, 0, method)
    with torch.no_grad():
        if method == "hutchinson":
            z = _hutchinson_samples(operator, _rademacher(dim, n_hvp, generator, dtype, device))
            if z is None:
                return TraceResult(math.nan, math.nan, operator.n_hvp - start, method)
            est, se = _mean_and_stderr(z)
            return TraceResult(est, se, operator.n_hvp - start, method)

        s = min(n_hvp // 3, dim)
        Y = _matmat(operator, _rademacher(dim, s, generator, dtype, device))
        if Y is None:
            return TraceResult(nan.estimate, nan.std_error, operator.n_hvp - start, method)
        Q = orthonormalize(operator, Y, [])
        del Y
        if Q.shape[1] < s:  # rank-deficient sketch: pad with random orthonormal directions (still unbiased)
            pad = orthonormalize(operator, _rademacher(dim, s - Q.shape[1], generator, dtype, device), [Q])
            Q = torch.cat([Q, pad], dim=1)
        AQ = _matmat(operator, Q)
        if AQ is None:
            return TraceResult(nan.estimate, nan.std_error, operator.n_hvp - start, method)
        exact = float(operator.inner(Q, AQ, columnwise=True).to(torch.float64).sum())
        if Q.shape[1] >= dim:
            # the sketch spans the whole space: tr(Q^T A Q) is the trace
            return TraceResult(exact, 0.0, operator.n_hvp - start, method)
        n_probe = n_hvp - 2 * s
        G = _rademacher(dim, n_probe, generator, dtype, device)
        G = project_out(operator, G, [Q])
        z = _hutchinson_samples(operator, G)
        if z is None:
            return TraceResult(nan.estimate, nan.std_error, operator.n_hvp - start, method)
        mean, se = _mean_and_stderr(z)
        return TraceResult(exact + mean, se, operator.n_hvp - start, method)
