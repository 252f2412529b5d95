r"""Checking a Hessian operator against finite differences, and naming the known causes of wrong ones.

PyTorch computes some second derivatives wrongly without an error: ``weight_norm`` (both APIs:
the double backward of ``torch._weight_norm`` fails ``gradgradcheck``), reentrant activation
checkpointing (its backward runs ``torch.autograd.backward`` without a graph), custom
``autograd.Function``\ s whose backward is not itself differentiable (intermediates kept on
``ctx``, ``@once_differentiable`` raises). First-order gradients are right in all these cases, so
one product is checked against a central difference of gradients:

    H v  ~  (g(theta + eps v) - g(theta - eps v)) / (2 eps),

computed by :meth:`HessianOperator.with_backend` ``("finite_difference", dtype=torch.float64)``:
the same snapshot, batches, dropout masks and normalization policy, in float64 (the float32
snapshot is cast exactly). The operator is also checked for symmetry, ``u.Hv`` against ``v.Hu``
(a non-symmetric "Hessian" has no meaningful eigenvalues; this catches finite differences of a
gradient that is not the gradient of any loss).

Tolerances (:data:`TOLERANCE`, on both measures, keyed by the operator's dtype and the
reference's; a float32 finite-difference operator gets the float32 one): the float64 finite-difference reference is accurate to about 1e-8 relative on the
test models and benchmark workloads (docs/models.md), a float32 product to about 1e-6..1e-4; the
faults above are 1e-2 to 1 relative. A symmetry defect of a float64 AD operator is about 1e-15.

Piecewise-smooth losses (ReLU, max-pooling) have gradients that jump where an activation crosses
its kink; a central difference whose step crosses one is off by ``jump / (2 eps)``, however right
the product is. When a comparison fails, it is repeated with a step 10x smaller (at most
``REFERENCE_RETRIES`` times): a kink crossed only by the larger step disappears (``"passed"``); a
wrong second derivative keeps its discrepancy (``"failed"``); a jump grows it ~10x, and when it
still grows at the smallest step the verdict is ``"inconclusive"`` (the point cannot be checked by
differences, and the finite-difference backend is not reliable there either).

Cost (see docs/models.md for the measured times): 2 products of the operator (counted in its
``n_hvp``), 2 gradients of the whole probe loss for the reference (2 more per retry, at most 6;
``Verification.n_gradients``), and, when it does not pass, one forward pass to list
suspects from the autograd graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._functional import graph_nodes, is_reentrant_checkpoint, module_causes
from .hessian import FD_STEP, HessianOperator, coarser

__all__ = ["REFERENCE_RETRIES", "REFERENCE_STEP", "ROUNDING_FACTOR", "TOLERANCE", "Verification", "known_causes", "verify_operator"]

# (operator dtype, reference dtype) -> tolerance on the relative error and on the asymmetry
TOLERANCE = {
    (torch.float64, torch.float64): 1e-6,
    (torch.float32, torch.float64): 1e-3,
    (torch.float32, torch.float32): 3e-2,  # reference in float32 (a model that cannot run in float64)
}
_MAX_GRAPH_NODES = 1_000_000
_DEFAULT_SEED = 0x5EED
# Relative step of the reference, eps = REFERENCE_STEP * (1 + ||theta||) / ||v||, then 10x and 100x
# smaller while the discrepancy grows (REFERENCE_RETRIES). In float64, smaller than the backend's
# FD_STEP so that fewer ReLU / max-pooling kinks are crossed (measured on the benchmark CNN in
# docs/models.md); rounding error about 1e-8 relative at 1e-7, 1e-6 at 1e-9.
REFERENCE_STEP = {torch.float64: 1e-7, torch.float32: FD_STEP[torch.float32]}
REFERENCE_RETRIES = 2
# The rounding error of a central difference at relative step s is about c u / s (u the unit
# roundoff); c = 2.5..6 measured on the benchmark CNN in float64 (docs/models.md). A comparison at
# step s uses the tolerance max(TOLERANCE, ROUNDING_FACTOR u / s).
ROUNDING_FACTOR = 30.0


@dataclass(frozen=True)
class Verification:
    """Result of :func:`verify_operator`.

    Attributes:
        passed: ``verdict == "passed"``.
        verdict: ``"passed"`` (``rel_error <= tolerance`` when measured and ``asymmetry <=
            tolerance``, both finite, no product raised); ``"failed"`` (the operator is wrong:
            switch to the finite-difference backend); ``"inconclusive"`` (the gradient jumps at
            this point, e.g. at ReLU / max-pooling kinks, or the loss comes back in a 16-bit dtype:
            finite differences can check nothing and are not reliable as a backend; keep the AD
            path and flag the measurement).
        rel_error: ``||H v - H_fd v|| / ||H_fd v||`` against the finite-difference reference;
            None when the operator is itself a float64 finite-difference operator (no
            independent reference) or a product failed.
        asymmetry: ``|u.Hv - v.Hu| / max(||u|| ||Hv||, ||v|| ||Hu||)`` (0 for a symmetric
            operator); NaN when a product failed.
        tolerance: the tolerance of the last comparison (``TOLERANCE``, raised to the reference's
            rounding bound ``ROUNDING_FACTOR * u / step`` at the smaller retry steps).
        backend: the operator's path (``"autograd"``, ``"func"``, ``"finite_difference"``).
        reference_dtype: dtype of the finite-difference reference (None when none was used).
        n_hvp: products of the operator spent (also counted in ``operator.n_hvp``).
        n_gradients: gradients of the whole probe loss spent by the reference (2, or 0).
        suspects: when not passed, the known causes of wrong second derivatives found in the
            model and in the autograd graph of its first probe batch's loss (:func:`known_causes`;
            one extra forward pass); empty when passed (not searched).
        reason: why it failed (a product's exception, a non-finite value, a tolerance exceeded);
            None when passed.
        loss_dtype: the dtype the loss came back in when narrower than the reference's (a model
            that computes its loss in float32 whatever its parameters' dtype, as Hugging Face
            models do); the reference then steps and the tolerance is set for that precision, and
            no product of the model can be more precise than it. None otherwise.
    """

    passed: bool
    verdict: str
    rel_error: float | None
    asymmetry: float
    tolerance: float
    backend: str
    reference_dtype: torch.dtype | None
    n_hvp: int
    n_gradients: int
    suspects: tuple[str, ...]
    reason: str | None
    loss_dtype: torch.dtype | None = None


def verify_operator(
    operator: HessianOperator,
    *,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    reference_dtype: torch.dtype = torch.float64,
) -> Verification:
    """Compare one product of ``operator`` with central finite differences of gradients, and check symmetry.

    Args:
        operator: the operator to check (any backend; its ``n_hvp`` grows by 2).
        generator: CPU generator for the two random unit directions ``v``, ``u`` (default: a
            fixed seed; the global RNG is never used, and under DDP every process draws the same
            directions, as the products' reduction requires).
        tol: tolerance on the relative error and on the asymmetry (default: :data:`TOLERANCE`).
        reference_dtype: dtype of the finite-difference reference (float64 by default; if the
            model cannot be evaluated in it, the operator's own dtype is used).

    Returns:
        a :class:`Verification`. A product that raises (e.g. ``@once_differentiable``) gives
        ``passed=False`` with the exception in ``reason``; a ValueError (a programming error in
        the loss) propagates.

    Raises:
        ValueError: ``operator`` is not a HessianOperator, a bad ``tol`` or ``reference_dtype``.
    """
    if not isinstance(operator, HessianOperator):
        raise ValueError(f"verify_operator: operator must be a HessianOperator, got {type(operator).__name__}")  # noqa: TRY004 - ValueError for bad input, as everywhere in the package
    if tol is not None and (isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0)):
        raise ValueError(f"verify_operator: tol must be a positive finite number or None; got {tol!r}")
    if reference_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"verify_operator: reference_dtype must be torch.float32 or torch.float64; got {reference_dtype!r}")
    if generator is None:  # never draw from the global RNG (it would change the training run)
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    V = torch.randn(operator.dim, 2, generator=generator, dtype=torch.float64)
    V = (V / V.norm(dim=0)).to(dtype=operator.dtype, device=operator.device)
    backend = operator.backend
    start = operator.n_hvp
    try:
        HV = operator.matmat(V)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a backward marked @once_differentiable
        return Verification(False, "failed", None, math.nan, _tolerance(operator.dtype, reference_dtype, tol, backend), backend, None,
                            operator.n_hvp - start, 0, _suspects(operator),
                            f"the product raised {type(exc).__name__}: {str(exc)[:300]}")
    n_hvp = operator.n_hvp - start
    # float64 dots; only hv is kept through the reference (4 float64 vectors held before: 8 float32 ones)
    hv, hu = HV[:, 0].double(), HV[:, 1].double()
    asymmetry = float((V[:, 1].double() @ hv - V[:, 0].double() @ hu).abs() / max(float(hv.norm()), float(hu.norm()), 1e-300))
    del hu, HV

    rel_error: float | None = None
    ref_dtype: torch.dtype | None = None
    loss_dtype: torch.dtype | None = operator.loss_dtype
    n_gradients = 0
    tolerance = _tolerance(operator.dtype, torch.float64, tol, backend)
    verdict, reason = "passed", None
    if loss_dtype is not None and coarser(loss_dtype, torch.float32):
        # a 16-bit loss (e.g. an autocast inside the model's forward): its rounding (4e-3 in bfloat16)
        # is above any finite-difference step's reach, and no other backend is more precise
        verdict = "inconclusive"
        reason = (f"the loss comes back in {str(loss_dtype).removeprefix('torch.')} whatever the products' dtype, so "
                  "the products carry its precision and finite differences cannot check them")
    elif not math.isfinite(asymmetry):
        verdict, reason = "failed", "a product is not finite"
    elif asymmetry > tolerance:
        verdict = "failed"
        reason = f"the operator is not symmetric: |u.Hv - v.Hu| relative {asymmetry:.2e} (tolerance {tolerance:.0e})"
    elif not (operator.backend == "finite_difference" and operator.dtype == torch.float64
              and operator.loss_dtype is None):
        ref_dtype = reference_dtype if operator.dtype == torch.float32 else torch.float64
        try:
            ref, narrow = _reference_product(operator, V[:, 0], ref_dtype, 0)
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - the model cannot run in float64: reference in its own dtype
            ref_dtype = operator.dtype
            ref, narrow = _reference_product(operator, V[:, 0], ref_dtype, 0)
        # the reference is only as precise as the loss the model returns: step for that precision
        # (float32 here: a 16-bit loss was already found by the products above)
        step_dtype = ref_dtype
        if narrow is not None and coarser(narrow, ref_dtype):
            loss_dtype = step_dtype = narrow
            ref, _ = _reference_product(operator, V[:, 0], ref_dtype, 0, step_dtype)
        precision = operator.dtype
        if loss_dtype is not None and coarser(loss_dtype, precision):
            precision = torch.float32  # a float64 operator of a float32 loss: float32 products
        tolerance = _tolerance(precision, ref_dtype, tol, backend)
        previous_gap = math.inf
        for k in range(REFERENCE_RETRIES + 1):
            if k > 0:
                ref, _ = _reference_product(operator, V[:, 0], ref_dtype, k, step_dtype)
            n_gradients += 2
            gap = float((hv - ref).norm())
            rel_error = gap / max(float(ref.norm()), 1e-300)
            if not math.isfinite(rel_error):
                verdict, reason = "failed", "a finite-difference reference is not finite"
                break
            # the reference's own rounding error grows like u / step: never ask for less
            tolerance = max(_tolerance(precision, ref_dtype, tol, backend), _rounding_bound(step_dtype, k))
            if rel_error <= tolerance:
                verdict = "passed"
                break
            if gap <= 3 * previous_gap and k > 0:  # the discrepancy does not grow as the step shrinks
                verdict = "failed"
                reason = f"the product differs from finite differences of gradients by {rel_error:.2e} (tolerance {tolerance:.0e})"
                break
            previous_gap = gap
            verdict = "inconclusive"
            reason = (f"finite differences of the gradient grow as the step shrinks (relative difference {rel_error:.2e} "
                      f"at the smallest step): the gradient is not smooth at this point (e.g. ReLU or max-pooling "
                      "kinks), so they cannot check the product; the finite-difference backend is not reliable here either")
    suspects = () if verdict == "passed" else _suspects(operator)
    return Verification(verdict == "passed", verdict, rel_error, asymmetry, tolerance, backend, ref_dtype, n_hvp,
                        n_gradients, suspects, reason, loss_dtype)


def _rounding_bound(dtype: torch.dtype, retry: int) -> float:
    """``ROUNDING_FACTOR * u / step``: a bound on the rounding error of a reference at retry ``retry``."""
    return ROUNDING_FACTOR * torch.finfo(dtype).eps / (REFERENCE_STEP[dtype] / 10**retry)


def _reference_product(
    operator: HessianOperator, v: Tensor, dtype: torch.dtype, retry: int, step_dtype: torch.dtype | None = None
) -> tuple[Tensor, torch.dtype | None]:
    """Finite-difference product in ``dtype`` at relative step ``REFERENCE_STEP[step_dtype] / 10**retry``
    (``step_dtype`` defaults to ``dtype``), and the dtype of the loss when it came back narrower.
    """
    fd_step = REFERENCE_STEP[step_dtype or dtype] / 10**retry
    reference = operator.with_backend("finite_difference", dtype=dtype, fd_step=fd_step)
    return reference.matvec(v.to(dtype)).double(), reference.loss_dtype


def _tolerance(dtype: torch.dtype, reference_dtype: torch.dtype, tol: float | None, backend: str = "") -> float:
    if tol is not None:
        return float(tol)
    if backend == "finite_difference":  # a float32 difference is itself only about 1e-4 accurate
        return TOLERANCE[(dtype, dtype)]
    return TOLERANCE[(dtype, reference_dtype)] if (dtype, reference_dtype) in TOLERANCE else TOLERANCE[(dtype, dtype)]


def _suspects(operator: HessianOperator) -> tuple[str, ...]:
    """:func:`known_causes` of the operator's model and of the graph of its first probe batch's loss."""
    try:
        loss: Tensor | None = operator.loss_graph(0)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - a forward that fails here fails in the products too, with its message
        loss = None
    return known_causes(operator.model, loss)


def known_causes(model: nn.Module, loss: Tensor | None = None) -> tuple[str, ...]:
    """The known causes of wrong or missing second derivatives found in ``model`` (and ``loss``'s graph).

    Looks for, in this order:

    * compiled modules (``torch.compile``: no double backward) and ``nn.EmbeddingBag`` (no
      double backward either);
    * parametrized tensors (``torch.nn.utils.parametrize``; ``weight_norm``'s double backward is
      wrong, other parametrizations are listed because they run user code in the forward);
    * the old ``torch.nn.utils.weight_norm`` / ``spectral_norm`` forward pre-hooks;
    * in the autograd graph of ``loss`` (when given): custom ``autograd.Function`` backward
      nodes, among them reentrant activation checkpointing (``CheckpointFunctionBackward``).

    Returns:
        one plain sentence per cause, naming the module (``model.named_modules()`` name) or the
        Function; empty when none is found.
    """
    found = module_causes(model)
    if loss is not None and loss.grad_fn is not None:
        for node in graph_nodes(loss, _MAX_GRAPH_NODES):
            if is_reentrant_checkpoint(node):
                found.append("reentrant activation checkpointing (torch.utils.checkpoint, use_reentrant=True): "
                             "its backward has no double backward")
            elif isinstance(node, torch.autograd.function.BackwardCFunction):
                found.append(f"custom autograd.Function {type(node).__name__.removesuffix('Backward')}")
    return tuple(dict.fromkeys(found))
