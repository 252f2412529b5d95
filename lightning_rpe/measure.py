"""The measurement itself, without Lightning: settings in, a frozen :class:`Measurement` out.

:func:`solve` builds a :class:`~lightning_rpe.curvature.HessianOperator` of a loss over probe
batches, computes the top-k eigenvalues, lambda_min, the trace, the preconditioned sharpness of the
Adam family and the stability ratio of every param group of the optimizer in use, and returns a
typed :class:`Solve` (eigenvectors included). :func:`assemble` combines a solve with the
:class:`~lightning_rpe.geometry.Rotation` an :class:`~lightning_rpe.geometry.EigenvectorTracker`
computed from it into the public :class:`Measurement`.

The split lets a distributed caller compute on every process, agree on success, broadcast one
process's :class:`Solve`, and update the tracker identically everywhere; the SharpnessMonitor does
exactly that. Definitions of every quantity: ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_rpe.curvature import (
    HessianOperator,
    ScaledOperator,
    batch_sharpness,
    eigenpairs,
    known_causes,
    sample_minibatches,
    verify_operator,
)
from lightning_rpe.curvature._functional import default_batch_size
from lightning_rpe.curvature.eigen import default_max_hvp, working_vectors
from lightning_rpe.curvature.hessian import coarser
from lightning_rpe.curvature.sharded import ShardedHessianOperator, sharded_eigenpairs
from lightning_rpe.curvature.trace import trace as trace_estimate
from lightning_rpe.geometry import Rotation, gradient_alignment
from lightning_rpe.names import CLIP_FRACTION, CLIP_LEVEL, STABILITY_RATIO, THRESHOLD, MetricNames
from lightning_rpe.optim import ClippedAdam
from lightning_rpe.stability import (
    GroupThreshold,
    StepScales,
    dimensionless_threshold,
    group_thresholds,
    stability_ratio,
    step_scales,
)
from lightning_rpe.validation import check_bool, check_choice, check_float, check_int, fail

__all__ = [
    "LossFunctionError",
    "Measurement",
    "MeasureSettings",
    "MeasurementSkipped",
    "Solve",
    "assemble",
    "at_lr_scales",
    "checked_loss",
    "measurement_metrics",
    "previous_still_eigenvector",
    "solve",
    "solve_sharded",
    "stopping_rule",
]

Solver = Literal["auto", "lanczos", "block"]
DType = Literal["float32", "float64"]
BatchNormPolicy = Literal["eval", "batch"]
DropoutPolicy = Literal["off", "on"]
Backend = Literal["auto", "func", "autograd", "finite_difference"]
Verify = Literal["first", "every", "off"]
Criterion = Literal["residual", "eigenvalue", "auto"]

SOLVERS: tuple[Solver, ...] = ("auto", "lanczos", "block")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
BATCHNORM_POLICIES: tuple[BatchNormPolicy, ...] = ("eval", "batch")
DROPOUT_POLICIES: tuple[DropoutPolicy, ...] = ("off", "on")
BACKENDS: tuple[Backend, ...] = ("auto", "func", "autograd", "finite_difference")
VERIFY: tuple[Verify, ...] = ("first", "every", "off")
CRITERIA: tuple[Criterion, ...] = ("residual", "eigenvalue", "auto")


class MeasurementSkipped(Exception):
    """A measurement that cannot be trusted (non-finite loss or eigenvalues, a solve that did not converge).

    ``notes`` carries the ``(key, message)`` warnings gathered before the failure (e.g. a failed product
    check, which explains a solve that cannot converge on a non-symmetric operator).
    """

    notes: tuple[tuple[str, str], ...] = ()


class LossFunctionError(TypeError):
    """The loss function is wrong: a programming error, not a numerical failure.

    It raised a TypeError, AttributeError, KeyError, IndexError or NameError, or returned no scalar tensor.
    """


_PROGRAMMING_ERRORS = (TypeError, AttributeError, KeyError, IndexError, NameError)


def checked_loss(loss_fn: Callable[[nn.Module, Any], Tensor]) -> Callable[[nn.Module, Any], Tensor]:
    """``loss_fn`` that raises :class:`LossFunctionError` for programming errors (see that class)."""

    def loss(model: nn.Module, batch: Any) -> Tensor:
        try:
            out = loss_fn(model, batch)
        except LossFunctionError:
            raise
        except _PROGRAMMING_ERRORS as exc:
            raise LossFunctionError(f"the loss raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, Tensor):
            raise LossFunctionError(f"the loss returned a {type(out).__name__}, not a scalar tensor")
        if out.numel() != 1:
            raise LossFunctionError(f"the loss returned a tensor of shape {tuple(out.shape)}, not a scalar (reduce it to the mean)")
        return out

    return loss


@dataclass(frozen=True)
class MeasureSettings:
    """What one measurement computes and how (validated on construction).

    Attributes:
        top_k: number of leading eigenpairs (>= 1).
        lambda_min: also compute the most negative eigenvalue (same Lanczos run).
        trace: also estimate ``tr(H)`` with Hutch++ using ``trace_hvps`` (>= 3) products.
        tol: relative residual tolerance of the top-k pairs, ``||H v - lambda v|| <= tol * lambda_max``.
        lambda_min_tol: the same for the lambda_min pair (None: ``10 * tol``).
        max_hvp: product budget per eigen-solve (None: the solver's default, twice that for a cold
            solve; see :meth:`budget`).
        max_basis: Lanczos basis cap in parameter vectors (None: the solver's default
            ``max(12, 2 n + 8)``, ``n`` the pairs wanted); at least ``top_k + 3`` (``top_k + 4`` with
            ``lambda_min``). A smaller cap holds fewer vectors and needs more products (thick restarts):
            raise ``max_hvp`` with it (measured trade-off in docs/monitor.md, "Memory").
        solver: ``"lanczos"``, ``"block"`` or ``"auto"``.
        dtype: ``"float32"`` or ``"float64"``, precision of the products.
        batchnorm, dropout, backend: the :class:`~lightning_rpe.curvature.HessianOperator` policies.
        verify: check the Hessian-vector products against float64 finite differences of gradients
            (:func:`~lightning_rpe.curvature.verify_operator`) at the first measurement of a run
            (``"first"``), at every one (``"every"``) or never (``"off"``).
        preconditioned: compute ``lambda_max(P^-1/2 H P^-1/2)`` for Adam-family groups.
        grad_alignment: compute the probe gradient and ``|cos(g, v_1)|``.
        warm_start: start each solve from the previous eigenvectors.
        criterion: stopping rule of the warm solves (see :func:`stopping_rule`): ``"residual"``
            (every pair to ``||H v - theta v|| <= tol * lambda_max``), ``"eigenvalue"`` (every warm
            pair to the eigenvalue error ``r^2 / gap <= tol * lambda_max`` with the previous
            measurement's gaps: eigenvalues at ``tol``, vectors only to ``sqrt(tol * lambda_max / gap)``)
            or ``"auto"`` (the eigenvalue rule only for the pairs whose vector feeds no reported
            number: the lambda_min pair and the preconditioned solve).
        seed: seed of the solver's private generator (combined with the step), >= 0.
        batch_sharpness: number of mini-batches of the training batch size the batch sharpness is
            averaged over (0: not measured).
        cache_graphs: keep the probe batches' double-backward graphs for the whole measurement
            (True), rebuild them for every product (False: one gradient more per product, no graph
            held between products), or decide from the free memory (None, the default; see
            :class:`~lightning_rpe.curvature.HessianOperator`).
        owner: class name used in error messages.

    Raises:
        ValueError: naming ``owner``, the option and its accepted values.
    """

    top_k: int = 1
    lambda_min: bool = True
    trace: bool = False
    trace_hvps: int = 60
    tol: float = 1e-3
    lambda_min_tol: float | None = None
    max_hvp: int | None = None
    max_basis: int | None = None
    solver: Solver = "lanczos"
    dtype: DType = "float32"
    batchnorm: BatchNormPolicy = "batch"
    dropout: DropoutPolicy = "off"
    backend: Backend = "auto"
    verify: Verify = "first"
    preconditioned: bool = True
    grad_alignment: bool = True
    warm_start: bool = True
    criterion: Criterion = "auto"
    seed: int = 0
    batch_sharpness: int = 0
    cache_graphs: bool | None = None
    owner: str = "SharpnessMonitor"

    def __post_init__(self) -> None:
        o = self.owner
        check_int(o, "top_k", self.top_k, minimum=1)
        for name in ("lambda_min", "trace", "preconditioned", "grad_alignment", "warm_start"):
            check_bool(o, name, getattr(self, name))
        check_int(o, "trace_hvps", self.trace_hvps, minimum=3)
        object.__setattr__(self, "tol", check_float(o, "tol", self.tol, minimum=0.0, inclusive=False))
        tol_min = check_float(o, "lambda_min_tol", self.lambda_min_tol, minimum=0.0, inclusive=False, allow_none=True)
        object.__setattr__(self, "lambda_min_tol", 10.0 * self.tol if tol_min is None else tol_min)
        check_int(o, "max_hvp", self.max_hvp, minimum=1, allow_none=True)
        least = self.top_k + 3 + int(self.lambda_min)
        if self.max_basis is not None and (isinstance(self.max_basis, bool) or not isinstance(self.max_basis, int)
                                           or self.max_basis < least):
            raise fail(o, "max_basis", f"an int >= {least} (top_k + 3, plus 1 with lambda_min=True) or None",
                       self.max_basis)
        check_choice(o, "solver", self.solver, SOLVERS)
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", {v: k for k, v in DTYPES.items()}.get(self.dtype, str(self.dtype)))
        check_choice(o, "dtype", self.dtype, tuple(DTYPES))
        check_choice(o, "batchnorm", self.batchnorm, BATCHNORM_POLICIES)
        check_choice(o, "dropout", self.dropout, DROPOUT_POLICIES)
        check_choice(o, "backend", self.backend, BACKENDS)
        check_choice(o, "verify", self.verify, VERIFY)
        check_choice(o, "criterion", self.criterion, CRITERIA)
        check_int(o, "seed", self.seed, minimum=0)
        check_int(o, "batch_sharpness", self.batch_sharpness, minimum=0)
        check_choice(o, "cache_graphs", self.cache_graphs, (None, True, False))

    def budget(self, dim: int, k: int, which: str, warm: bool) -> int | None:
        """The product budget of one eigen-solve: ``max_hvp`` when set; otherwise None (the solver's
        :func:`~lightning_rpe.curvature.eigen.default_max_hvp`) for a warm-started solve and twice that
        default for a cold one (no previous eigenvectors: the first measurement of a run), whose
        products on a clustered spectrum come close to the default (102 of 110 on a 5.38M-parameter
        MLP, 174-230+ of 230 with ``top_k=5``: docs/benchmarks.md) and which is skipped when it runs out.
        """
        if self.max_hvp is not None or warm:
            return self.max_hvp
        return min(int(dim), 2 * default_max_hvp(dim, k, which))

    def generator(self, step: int, device: torch.device | str | None = None) -> torch.Generator:
        """The solver's private generator for a measurement at ``step`` (reproducible, global RNG untouched).

        On the CPU unless ``device`` is a CUDA device: then a generator of that device with the same
        seed, so that start vectors are drawn where the operator lives (a float64 draw of 124M numbers
        on the host took 3.2 s, more than a GPT-2-small warm solve's products; docs/benchmarks.md). The
        numbers then differ from the CPU's, reproducibly on that device.
        """
        where = torch.device(device) if device is not None else torch.device("cpu")
        return torch.Generator(device=where if where.type == "cuda" else "cpu").manual_seed(
            (self.seed * 1_000_003 + step) % (2**63 - 1))

    def minibatch_generator(self, step: int) -> torch.Generator:
        """The private CPU generator that draws the batch-sharpness mini-batches at ``step``."""
        return torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + step + 0x5EED) % (2**63 - 1))


@dataclass(frozen=True)
class Solve:
    """What one process computes at one step, before the geometry against earlier measurements.

    Attributes:
        eigenvalues: top-k eigenvalues of ``H``, descending (loss units per parameter unit squared).
        lambda_min: most negative eigenvalue, or None when not requested.
        trace: Hutch++ estimate of ``tr(H)``, or None.
        preconditioned_sharpness: ``lambda_max(P^-1/2 H P^-1/2)``, or None.
        groups: the stability threshold of every param group at its effective lr.
        ratios: per group ``(preconditioned) sharpness / threshold`` (NaN where unavailable).
        stability_ratio: ``lambda_max(S^1/2 H S^1/2)`` with ``S`` the per-coordinate step sizes of
            :func:`~lightning_rpe.stability.step_scales` (exact for any set of groups sharing an
            update rule), or None without an optimizer or preconditioner.
        n_hvp: products spent (solvers and trace).
        residuals: ``||H v_i - lambda_i v_i||`` of the top-k pairs (same units as the eigenvalues; by
            the Bauer-Fike theorem each eigenvalue is within its residual of an exact eigenvalue).
        lambda_min_residual: the same for the lambda_min pair, or None.
        probe_loss: mean probe loss, or None when ``grad_alignment`` is off.
        grad_alignment: ``|cos(g, v_1)|``, or None.
        top_vectors: ``(dim, k)`` unit eigenvectors on the operator's device (the model's); with
            ``k = 1`` a crossing is told from a rotation by one product instead (``crossed``);
            ``min_vector``, ``preconditioned_vector``: ``(dim,)`` or None.
        notes: ``(key, message)`` pairs a caller should warn about once per key.
        batch_sharpness, batch_sharpness_se: mean and standard error of the batch sharpness (the
            preconditioned one for the Adam family), or None (not requested, several learning
            rates: see ``batch_sharpness_ratio``, or no usable mini-batch).
        batch_sharpness_ratio, batch_sharpness_ratio_se: the dimensionless batch-sharpness ratio
            ``E_B[(S g_B)^T H_B (S g_B) / g_B^T S g_B]`` with the step scales ``S`` of the optimizer
            (above 1: the average mini-batch step raises its own loss), and its standard error; None
            without an optimizer.
        batch_sharpness_batches: mini-batches the estimate used.
        backend: the product path that produced the numbers (``"autograd"``, ``"func"``,
            ``"finite_difference"``).
        verification: the verdict of this solve's product check (``"passed"``, ``"failed"``,
            ``"inconclusive"``), or None when none was made.
        verify_error: relative error of the checked product against finite differences, or None.
        switched_to: the backend the solve fell back to after a failed check (None: no switch):
            ``"autograd"`` when the ``torch.func`` products failed and double backward passed, or
            when float32 products failed and float64 ones passed (``switched_dtype="float64"``),
            else ``"finite_difference"``.
        clip_fractions, clip_levels: per param group of a ClippedAdam, the fraction of coordinates
            whose denominator the clip replaced at the last step and the level used (NaN while a
            relative clip warms up); empty for other optimizers.
        crossed: with one tracked eigenvector, True when the previous ``v_1`` is still an eigenvector
            and the new ``v_1`` is another one (a crossing, not a rotation); None when not checked.
        gaps: the solver's estimate of each returned pair's distance to the rest of the spectrum
            (top-k, then lambda_min; :attr:`~lightning_rpe.curvature.EigenResult.gaps`), for the
            eigenvalue rule of the next warm solve; empty when unknown.
        preconditioned_gap: the same for the preconditioned pair, or None.
    """

    eigenvalues: tuple[float, ...]
    lambda_min: float | None
    trace: float | None
    preconditioned_sharpness: float | None
    groups: tuple[GroupThreshold, ...]
    ratios: tuple[float, ...]
    stability_ratio: float | None
    n_hvp: int
    residuals: tuple[float, ...]
    lambda_min_residual: float | None
    probe_loss: float | None
    grad_alignment: float | None
    top_vectors: Tensor
    min_vector: Tensor | None
    preconditioned_vector: Tensor | None
    notes: tuple[tuple[str, str], ...] = ()
    batch_sharpness: float | None = None
    batch_sharpness_se: float | None = None
    batch_sharpness_ratio: float | None = None
    batch_sharpness_ratio_se: float | None = None
    batch_sharpness_batches: int = 0
    backend: str = "autograd"
    verification: str | None = None
    verify_error: float | None = None
    switched_to: str | None = None
    switched_dtype: str | None = None
    clip_fractions: tuple[float, ...] = ()
    clip_levels: tuple[float, ...] = ()
    crossed: bool | None = None
    gaps: tuple[float, ...] = ()
    preconditioned_gap: float | None = None
    controlled_ratio: float | None = None
    trace_se: float | None = None

    def vectors_to(self, device: torch.device | str) -> Solve:
        """The same result with its eigenvectors on ``device`` (e.g. ``"meta"``: shape-only placeholders
        for a broadcast of the scalars between processes, the vectors then sent as tensors).
        """

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, top_vectors=self.top_vectors.to(device), min_vector=move(self.min_vector),
                       preconditioned_vector=move(self.preconditioned_vector))


@dataclass(frozen=True)
class Measurement:
    """One successful measurement (all floats in the loss's units per parameter^2 unless noted).

    Attributes:
        step: ``trainer.global_step`` at measurement (optimizer steps completed): the parameters
            measured are those after ``step`` optimizer steps.
        epoch: ``trainer.current_epoch``.
        sharpness: ``lambda_max(H)`` of the probe loss.
        eigenvalues: top-k eigenvalues of ``H``, descending.
        lambda_min: smallest (most negative) eigenvalue of ``H``, or None when not requested.
        trace: Hutch++ estimate of ``tr(H)``, or None when not requested.
        preconditioned_sharpness: ``lambda_max(P^-1/2 H P^-1/2)`` with Adam's preconditioner
            (Adam family only, None otherwise or before the optimizer's first step).
        thresholds: stability threshold per param group at its effective lr (1 / lr units).
        ratios: per param group ``(preconditioned) sharpness / threshold`` (NaN when the
            preconditioned sharpness is unavailable for a preconditioned group).
        lrs: effective lr per group (param-group lr times the ``lr_scale_provider`` factor).
        n_hvp: Hessian-vector products spent (solver, preconditioned solver and trace).
        seconds: wall time of the measurement.
        rotation_cos: ``|cos(v_1, v_1_prev)|`` of the leading eigenvector vs the previous
            measurement (None at the first measurement).
        rotation_angle: the same rotation as an angle in degrees, in [0, 90].
        subspace_similarity: principal-angle similarity of the top-k subspaces, in [0, 1].
        subspace_similarity_to_first: the same similarity between the current top-k subspace and
            the reference one: the first measured at or after ``reference_step`` (below 0.7: the
            subspace "rotated", as in the paper). None before the reference exists.
        polarity: signed rotation angle of the leading eigenvector in degrees (see
            :class:`lightning_rpe.geometry.PolarityTracker`).
        polarity_flips: cumulative number of polarity sign changes.
        grad_alignment: ``|cos(g, v_1)|`` between the probe-loss gradient and the leading eigenvector.
        probe_loss: mean loss over the probe set at the measured parameters.
        kinds: optimizer kind per param group (``"gd"``, ``"heavy_ball"``, ``"nesterov"``,
            ``"adam"``, ``"clipped_adam"``, ``"unknown"``).
        trigger: what caused the measurement: ``"fit_start"``, ``"step"``, ``"epoch"``, ``"fit_end"``.
        residuals: ``||H v_i - lambda_i v_i||`` of the top-k pairs: each reported eigenvalue is within
            its residual of an eigenvalue of ``H`` (Bauer-Fike); the error bars of the report.
        lambda_min_residual: the same for lambda_min, or None.
        stability_ratio: the exact stability ratio ``lambda_max(S^1/2 H S^1/2)`` of the optimizer
            in use (``S``: each coordinate's lr over its rule's dimensionless threshold, divided by
            ``P`` for the Adam family; see :func:`lightning_rpe.stability.step_scales`); with one
            learning rate it equals the largest of ``ratios``. Above 1 the step is unstable. None
            after a controller's decision that changed the groups' lrs by different factors (no
            closed form at the new lrs).
        trace_se: standard error of ``trace`` (Hutch++'s stochastic part; the error stayed within 2
            standard errors in 50 of 51 runs of a review), or None.
        controlled_ratio: with an InstabilityController scaling a strict subset ``C`` of the param
            groups, ``lambda_max(S_C^1/2 H S_C^1/2)`` (the other groups' step sizes set to 0): the
            ratio the controller steers, which scaling ``C``'s lrs by ``f`` scales by ``f``; else None.
        eigenvalue_crossings: cumulative number of measurements at which the leading eigenvalues
            changed order (eigenvectors matched by overlap; see
            :func:`lightning_rpe.geometry.match_eigenvectors`). ``rotation_cos`` and ``polarity`` follow
            the matched vector, so a crossing is not reported as a rotation.
        batch_sharpness: ``E_B[g_B^T H_B g_B / |g_B|^2]`` over mini-batches of the training batch size
            (Andreyev & Beneventano, arXiv 2412.20553; preconditioned for the Adam family), or None.
        batch_sharpness_se: its standard error over the mini-batches, or None.
        batch_sharpness_ratio: the batch sharpness over the optimizer's threshold (exactly: the
            quotient along ``S g_B`` of the step-scaled Hessian, see :class:`Solve`), or None.
        backend: the product path that produced the numbers (``"finite_difference"`` after a
            failed check, see ``verify``).
        verify_error: relative error of the product check made at this measurement, or None.
        unverified: True when a product check of this run failed (or could not decide) and the
            numbers still come from the unchecked path (an explicit ``backend``, or an
            inconclusive check): they may be wrong.
        clip_fractions, clip_levels: ClippedAdam only, per param group: fraction of coordinates
            clipped at the last step, in [0, 1], and the clip level (gradient units; NaN while a
            relative clip warms up).
    """

    step: int
    epoch: int
    sharpness: float
    eigenvalues: tuple[float, ...]
    lambda_min: float | None
    trace: float | None
    preconditioned_sharpness: float | None
    thresholds: tuple[float, ...]
    ratios: tuple[float, ...]
    lrs: tuple[float, ...]
    n_hvp: int
    seconds: float
    rotation_cos: float | None = None
    rotation_angle: float | None = None
    subspace_similarity: float | None = None
    subspace_similarity_to_first: float | None = None
    polarity: float | None = None
    polarity_flips: int | None = None
    grad_alignment: float | None = None
    probe_loss: float | None = None
    kinds: tuple[str, ...] = ()
    trigger: str = "step"
    residuals: tuple[float, ...] = ()
    lambda_min_residual: float | None = None
    stability_ratio: float | None = None
    eigenvalue_crossings: int | None = None
    batch_sharpness: float | None = None
    batch_sharpness_se: float | None = None
    batch_sharpness_ratio: float | None = None
    backend: str = "autograd"
    verify_error: float | None = None
    unverified: bool = False
    controlled_ratio: float | None = None
    trace_se: float | None = None
    clip_fractions: tuple[float, ...] = ()
    clip_levels: tuple[float, ...] = ()

    def to_state(self) -> dict[str, Any]:
        """Plain-Python form (tuples as lists) for checkpoints."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Measurement:
        """Inverse of :meth:`to_state` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in state.items() if k in names}
        return cls(**kwargs)


@dataclass(frozen=True)
class _Checked:
    """One product check: its verdict, relative error, product-equivalents of the reference, the note to
    warn (key, message) or None, and the reason and known causes the note was written from.
    """

    verdict: str
    error: float | None
    extra: int
    note: tuple[str, str] | None
    reason: str | None
    suspects: tuple[str, ...]


def _check(op: HessianOperator) -> _Checked:
    """Verify ``op`` (:func:`~lightning_rpe.curvature.verify_operator`)."""
    try:
        v = verify_operator(op)
    except LossFunctionError:
        raise
    except Exception as exc:  # e.g. no double backward at all (a compiled model)
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        suspects = tuple(known_causes(op.model))
        return _Checked("failed", None, 0, ("verify-failed", _verify_message("failed", reason, suspects, op.backend)),
                        reason, suspects)
    extra = math.ceil(v.n_gradients / 2)  # a product costs about two gradients
    note = None
    if not v.passed:
        sixteen_bit = v.loss_dtype is not None and coarser(v.loss_dtype, torch.float32)
        what = _LOW_PRECISION_WHAT if v.verdict == "inconclusive" and sixteen_bit else None
        note = ("verify-" + v.verdict, _verify_message(v.verdict, v.reason, v.suspects, v.backend, what))
    elif v.loss_dtype is not None and coarser(v.loss_dtype, op.dtype):
        note = ("loss-dtype", f"dtype={str(op.dtype).removeprefix('torch.')!r} was asked for, but the loss comes back in "
                f"{str(v.loss_dtype).removeprefix('torch.')} (the model computes it in that precision, as Hugging Face "
                "models do): the products carry its precision, not the requested one")
    return _Checked(v.verdict, v.rel_error, extra, note, v.reason, tuple(v.suspects))


_FINITE_DIFFERENCE_WHAT = ("With backend='auto' this run uses the finite-difference backend from now on (2 gradients "
                           "per product); with an explicit backend every measurement is flagged rpe/unverified.")
_KINK_WHAT = ("The loss is not smooth here (ReLU / max-pooling kinks): finite differences cannot check the products, "
              "which stay on the AD path; measurements are flagged rpe/unverified.")
_LOW_PRECISION_WHAT = "The products stay on the AD path at that precision; measurements are flagged rpe/unverified."


def _verify_message(verdict: str, reason: str | None, suspects: Sequence[str], backend: str,
                    what: str | None = None) -> str:
    """The warning of a check that did not pass; ``what`` says what the run does about it (default: by verdict)."""
    causes = f" Known causes found in the model: {', '.join(suspects)}." if suspects else ""
    if what is None:
        what = _FINITE_DIFFERENCE_WHAT if verdict == "failed" else _KINK_WHAT
    return (f"the Hessian-vector products ({backend}) do not match float64 finite differences of gradients "
            f"({verdict}: {reason}).{causes} {what}")


def _alternatives(op: HessianOperator) -> list[tuple[HessianOperator, str]]:
    """The operators a failed check of ``op`` tries before finite differences, with what the warning says
    when one passes: double backward after ``torch.func`` (seen failing: a ResNet with BatchNorm on a
    GPU, 2e-3 off), then double backward in float64 after float32 (right formulas, float32 rounding:
    BatchNorm with batch statistics on a GPU, 2e-3 off in float32, 4e-8 in float64).
    """
    out = []
    if op.backend == "func":
        out.append((op.with_backend("autograd"),
                    "The double-backward products (autograd) passed the same check: this run uses them from now on."))
    if op.dtype == torch.float32:
        out.append((op.with_backend("autograd", dtype=torch.float64),
                    "The same double-backward products pass the check in float64 (float32 rounding, e.g. BatchNorm "
                    "with batch statistics on a GPU): this run computes its products in float64 from now on (twice "
                    "the memory per vector)."))
    return out


def _clip_statistics(optimizer: torch.optim.Optimizer | None) -> dict[str, tuple[float, ...]]:
    if not isinstance(optimizer, ClippedAdam):
        return {}
    stats = optimizer.clip_statistics()
    return {
        "clip_fractions": tuple(float(st.fraction) for st in stats),
        "clip_levels": tuple(float(st.level) if st.active else math.nan for st in stats),
    }


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.training for m in model.modules())


def previous_still_eigenvector(op: Any, previous: Tensor, v1: Tensor, lam1: float, tol: float) -> bool:
    """Whether the previous leading eigenvector is still an eigenvector while the new ``v_1`` is another one.

    One product ``H p`` with the previous ``p = v_1'``: ``p`` is still an eigenvector when its residual
    ``||H p - q p|| / ||p||`` (``q`` its Rayleigh quotient) is at most ``10 * tol * |lambda_1|`` (the
    solver's tolerance, loosened tenfold); the new ``v_1`` is another eigenvector when
    ``|cos(v_1, p)| < 0.5``. Both together mean that two eigenvalues crossed: the old ``v_1`` did not
    rotate away, it was overtaken (Bauer-Fike: a small residual means ``p`` lies near an eigenspace).
    """
    p = previous.to(device=op.device, dtype=op.dtype).reshape(-1)
    v = v1.to(device=op.device, dtype=op.dtype).reshape(-1)
    pp = float(op.inner(p.reshape(-1, 1), p.reshape(-1, 1)))
    vv = float(op.inner(v.reshape(-1, 1), v.reshape(-1, 1)))
    if pp <= 0 or vv <= 0:
        return False
    cos = abs(float(op.inner(p.reshape(-1, 1), v.reshape(-1, 1)))) / math.sqrt(pp * vv)
    if cos >= 0.5:
        return False
    hp = op.matvec(p)
    q = float(op.inner(p.reshape(-1, 1), hp.reshape(-1, 1))) / pp
    r = hp - q * p
    residual = math.sqrt(max(float(op.inner(r.reshape(-1, 1), r.reshape(-1, 1))), 0.0) / pp)
    return residual <= 10.0 * tol * abs(lam1)


def _skip(reason: str, notes: list[tuple[str, str]]) -> MeasurementSkipped:
    exc = MeasurementSkipped(reason)
    exc.notes = tuple(notes)
    return exc


def stopping_rule(criterion: str, previous: Sequence[float] | None, n: int, reported: int) -> tuple[str, Tensor | None]:
    """The ``(criterion, gap)`` arguments of a warm :func:`~lightning_rpe.curvature.eigenpairs` call.

    Args:
        criterion: ``"residual"``, ``"eigenvalue"`` or ``"auto"`` (:class:`MeasureSettings`).
        previous: the previous measurement's gap estimates of the ``n`` pairs in result order
            (:attr:`Solve.gaps`), or None.
        n: pairs the solve returns.
        reported: the leading pairs whose vectors feed reported numbers (rotation, polarity,
            gradient alignment, subspace similarities); with ``"auto"`` they keep the residual rule.

    Returns:
        ``("residual", None)`` when no pair can use the eigenvalue rule (``"residual"``, no or
        mismatched previous gaps, none positive); else ``("eigenvalue", gap)`` with ``gap`` a
        float64 ``(n,)`` tensor. A pair with gap 0 (unknown, non-finite, not positive, or a
        reported pair under ``"auto"``) stops on its residual in both solvers.

    The rule (:func:`~lightning_rpe.curvature.lanczos.eigenvalue_errors`): a pair with residual ``r``
    and gap ``g`` has converged when ``r^2 / g <= tol * max|theta|`` (Kato-Temple), used only where
    ``r <= g / 4``. Its eigenvalue is then within ``tol * max|theta|`` of an eigenvalue; its vector
    within the angle ``asin(r / g) <= asin(sqrt(tol * max|theta| / g))`` of the eigenvector (Davis-Kahan),
    against ``asin(tol * max|theta| / g)`` under the residual rule.
    """
    if criterion == "residual" or previous is None or len(previous) != n:
        return "residual", None
    gap = torch.nan_to_num(torch.tensor([float(g) for g in previous], dtype=torch.float64),
                           nan=0.0, posinf=0.0).clamp_min(0.0)
    if criterion == "auto":
        gap[:reported] = 0.0
    if not bool((gap > 0).any()):
        return "residual", None
    return "eigenvalue", gap


def _fresh_gaps(res: Any, settings: MeasureSettings, warm: bool) -> tuple[float, ...]:
    """The gap estimates of a solve to carry to the next one: Lanczos' (its Ritz gaps, capped by the
    gaps passed in), or none after a warm block solve, whose ``gaps`` only repeat the ones passed in
    and would never follow a gap that shrinks.
    """
    block = settings.solver == "block" or (settings.solver == "auto" and warm)
    if block or res.gaps is None:
        return ()
    return tuple(float(g) for g in res.gaps)


def _top_eigenpair(op: Any, settings: MeasureSettings, gen: torch.Generator, init: Tensor | None, what: str,
                   gap: float | None = None) -> Any:
    """The converged top eigenpair of ``op`` or :class:`MeasurementSkipped` (``gap``: the previous
    one's gap estimate, for :func:`stopping_rule` when its vector feeds no reported number).
    """
    criterion, gaps = "residual", None
    budget = settings.budget(op.dim, 1, "largest", init is not None)
    if init is not None:
        init = init.to(device=op.device, dtype=op.dtype)
        criterion, gaps = stopping_rule(settings.criterion, None if gap is None else [gap], 1, 0)
    res = eigenpairs(op, k=1, which="largest", tol=settings.tol, max_hvp=budget, init=init,
                     generator=gen, method=settings.solver, criterion=criterion, gap=gaps, max_basis=settings.max_basis)
    if not res.all_converged or not bool(torch.isfinite(res.eigenvalues).all()):
        raise MeasurementSkipped(f"the {what} eigen-solve did not converge ({res.reason or 'not converged'})")
    return res


def _controlled_ratio(op: HessianOperator, optimizer: torch.optim.Optimizer | None, scales: StepScales,
                      controlled: Sequence[int] | None, settings: MeasureSettings, gen: torch.Generator) -> float | None:
    """``lambda_max(S_C^1/2 H S_C^1/2)``: the step sizes of the groups outside ``controlled`` set to 0.

    None unless ``controlled`` is a strict, non-empty subset of the optimizer's param groups. Scaling the
    controlled groups' lrs by ``f`` scales this ratio by exactly ``f`` (the joint ratio, which the
    other groups also set, does not move in proportion; the same derivation as ``stability_ratio``,
    restricted to the coordinates that move with the factor).
    """
    if optimizer is None or controlled is None:
        return None
    n_groups = len(optimizer.param_groups)
    chosen = {int(i) for i in controlled}
    if not chosen or chosen >= set(range(n_groups)):
        return None
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    masked = [s if group_of.get(id(p)) in chosen else torch.zeros_like(s)
              for p, s in zip(op.parameters, scales.scales)]
    flat = op.flatten(masked)  # type: ignore[arg-type]
    if not bool((flat != 0).any()):
        return 0.0
    return float(_top_eigenpair(ScaledOperator(op, flat), settings, gen, None, "controlled-groups").eigenvalues[0])


def _frozen_note(scales: StepScales, dim: int) -> tuple[str, str]:
    missing = f" (no optimizer state for {', '.join(scales.no_state[:5])}{', ...' if len(scales.no_state) > 5 else ''})"
    return (
        "frozen-coordinates",
        f"{scales.frozen} of {dim} coordinates take no optimizer step{missing if scales.no_state else ''} "
        "(not in the optimizer, lr 0, no optimizer state or a zero second moment): they are left out of the "
        "preconditioned operator and of the stability ratio",
    )


def solve(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    settings: MeasureSettings,
    *,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scales: Sequence[float] | None = None,
    warm: Any = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    batch_size: int | None = None,
    check: bool = False,
    backend: str | None = None,
    dtype: str | None = None,
    controlled_groups: Sequence[int] | None = None,
) -> Solve:
    """Measure the Hessian of ``loss_fn`` over ``batches`` at the model's current parameters.

    Args:
        model: the network (never modified: see :class:`~lightning_rpe.curvature.HessianOperator`).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of a batch.
        batches: the probe batches of this process.
        settings: what to compute.
        step: optimizer step (seeds the solver's generator).
        optimizer: the optimizer in use (thresholds, Adam preconditioner); None: no thresholds.
        lr_scales: per param group factor on the lr (e.g. an InstabilityController's), or None.
        controlled_groups: the param groups an InstabilityController scales, when they are a strict
            subset: ``controlled_ratio`` is then ``lambda_max(S_C^1/2 H S_C^1/2)`` with the other
            groups' step sizes set to 0 (one more solve), the ratio that scaling those groups by
            ``f`` scales by exactly ``f``.
        warm: an :class:`~lightning_rpe.geometry.EigenvectorTracker` whose previous vectors start
            the solves (used only with ``settings.warm_start``), or None.
        reduce: SUM across processes of every product (None: one process).
        batch_size: this process's training batch size; with ``settings.batch_sharpness`` the batch
            sharpness is averaged over that many mini-batches of this size drawn from ``batches``
            (:func:`~lightning_rpe.curvature.sample_minibatches`; under DDP each mini-batch is the
            union of the processes' draws, as the SGD step is). None: not measured.
        check: verify one product against finite differences first (every process must pass the
            same value: the check's products are collective); on failure with ``backend="auto"``
            the solve switches to the first of double backward, float64 double backward
            (:func:`_alternatives`) and finite differences that passes (``Solve.switched_to``).
        backend: the product path an earlier check of this run settled on (``Solve.switched_to``,
            e.g. ``"finite_difference"``), used instead of ``settings.backend``; None: ``settings.backend``.
        dtype: the product dtype an earlier check settled on (``Solve.switched_dtype``), used
            instead of ``settings.dtype``; None: ``settings.dtype``.

    Raises:
        MeasurementSkipped: non-finite loss or eigenvalues, or a solve that did not converge.
        LossFunctionError: the loss function is wrong (wrong signature, no scalar tensor).
    """
    notes: list[tuple[str, str]] = []
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        op = HessianOperator(
            model, checked_loss(loss_fn), batches, dtype=DTYPES[dtype or settings.dtype],
            backend=backend or settings.backend,
            batchnorm=settings.batchnorm, dropout=settings.dropout, reduce=reduce,
            copy_parameters=False,  # the parameters stand still during a measurement: no snapshot copy
            cache_graphs=settings.cache_graphs,
        )
    for w in said:  # the engine's notes (e.g. auto picked finite differences) are warned once per run
        notes.append(("operator-" + str(w.message)[:40], str(w.message)))
    verdict, verify_error, switched_to, switched_dtype, extra = None, None, None, None, 0
    which = "both" if settings.lambda_min else "largest"
    room = op.dim - 1 if which == "both" else op.dim
    k = min(settings.top_k, room)
    # with k >= 2 the tracker matches the k vectors by overlap; with k = 1 a crossing is told from a
    # rotation by one product with the previous v_1 (see previous_still_eigenvector)
    use_warm = settings.warm_start and warm is not None
    init = warm.warm_start(op.dim, which == "both") if use_warm else None
    # the solver's working vectors, declared before the first graph is built (its cache decision)
    op.reserve(working_vectors(op.dim, k, which, settings.solver, init, settings.max_basis))
    if check and op.backend != "finite_difference":
        first = _check(op)
        verdict, verify_error, extra, note = first.verdict, first.error, first.extra, first.note
        if verdict == "failed" and settings.backend == "auto":
            for alt, what in _alternatives(op):
                checked = _check(alt)
                extra += checked.extra
                if checked.verdict != "passed":
                    extra += alt.n_hvp  # the products of its check
                    continue
                extra += op.n_hvp  # the products of the first check
                note = ("verify-failed", _verify_message("failed", first.reason, first.suspects, op.backend, what))
                switched_to = "autograd"
                switched_dtype = "float64" if alt.dtype != op.dtype else None
                op, verdict, verify_error = alt, checked.verdict, checked.error
                break
        if note is not None:
            notes.append(note)
        if verdict == "failed" and settings.backend == "auto":
            extra += op.n_hvp  # the products of the check, spent before the switch
            op, switched_to = op.with_backend("finite_difference"), "finite_difference"
    loss, grad = None, None
    if settings.grad_alignment:
        try:
            loss, grad = op.loss_and_gradient()
        except ValueError as exc:  # non-finite loss: numerical, skipped
            raise MeasurementSkipped(str(exc)) from exc
    if init is not None:
        init = init.to(device=op.device, dtype=op.dtype)
    gen = settings.generator(step, op.device)
    criterion, gap = "residual", None
    warm_started = init is not None
    if init is not None:
        criterion, gap = stopping_rule(settings.criterion, warm.previous_gaps, k + int(which == "both"), k)
    # the warm block goes to the solver as its only reference, so the Lanczos path frees it (k + 1
    # parameter vectors) once its start vector is built
    inits = [init]
    del init
    res = eigenpairs(op, k=k, which=which, tol=settings.tol, max_hvp=settings.budget(op.dim, k, which, warm_started),
                     init=inits.pop(),
                     generator=gen, method=settings.solver, max_basis=settings.max_basis,
                     tol_smallest=settings.lambda_min_tol if which == "both" else None, criterion=criterion, gap=gap)
    if not bool(torch.isfinite(res.eigenvalues).all()):
        raise _skip(res.reason or "non-finite eigenvalues (non-finite loss or Hessian-vector product)", notes)
    if not res.all_converged:
        raise _skip(
            f"the eigen-solver did not converge ({res.reason or 'not converged'}; residuals "
            f"{[float(r) for r in res.residuals]}, tol={settings.tol}, {res.n_hvp} products)", notes
        )
    if bool((res.eigenvalues == 0).all()) and (grad is None or not bool(grad.any())):
        raise LossFunctionError(
            "every eigenvalue and the gradient are exactly 0: the loss does not depend on the parameters (a "
            "loss computed under torch.no_grad(), .detach()ed or turned into a Python number?)"
        )
    main_gaps = _fresh_gaps(res, settings, warm_started)
    top_vals = tuple(float(v) for v in res.eigenvalues[:k])
    top_vecs = res.eigenvectors[:, :k].detach().clone()
    crossed = None
    if k == 1 and use_warm and warm.previous_top is not None and warm.previous_top.shape[0] == op.dim:
        crossed = previous_still_eigenvector(op, warm.previous_top[:, 0], top_vecs[:, 0], top_vals[0], settings.tol)
    lam_min = float(res.eigenvalues[k]) if which == "both" else None
    min_vec = res.eigenvectors[:, k].detach().clone() if which == "both" else None

    tr = tr_se = None
    if settings.trace:
        estimate = trace_estimate(op, n_hvp=settings.trace_hvps, method="hutch++", generator=gen)
        tr = float(estimate.estimate)
        tr_se = float(estimate.std_error) if math.isfinite(estimate.std_error) else None

    groups: list[GroupThreshold] = []
    if optimizer is not None:
        groups = list(group_thresholds(optimizer, None if lr_scales is None else [float(s) for s in lr_scales]))
        # the sentence stability.group_thresholds writes for an optimizer it does not know (once per run)
        notes.extend(("unknown-optimizer", g.note) for g in groups[:1] if g.note is not None)
    pre_val, pre_vec, ratio = None, None, None
    pre_gap: float | None = None
    controlled: float | None = None
    scales = None if optimizer is None else step_scales(optimizer, op.parameters, groups, op.names)
    if scales is not None:
        if scales.no_state or scales.frozen:
            notes.append(_frozen_note(scales, op.dim))
        preconditioned = scales.inverse_preconditioner is not None
        if preconditioned and settings.batchnorm == "eval" and _has_batchnorm(model):
            notes.append((
                "eval-batchnorm-adam",
                "batchnorm='eval' measures the loss with running statistics, which training does not "
                "differentiate; with an Adam-family optimizer a parameter whose training gradient is 0 (a bias "
                "followed by BatchNorm) has P ~ eps and can dominate the preconditioned sharpness. The default "
                "batchnorm='batch' measures the loss training differentiates.",
            ))
        if preconditioned and settings.preconditioned:
            inverse = op.flatten(list(scales.inverse_preconditioner))  # type: ignore[arg-type]
            pre_init = warm.preconditioned_warm_start(op.dim) if use_warm else None
            pres = _top_eigenpair(ScaledOperator(op, inverse), settings, gen, pre_init, "preconditioned",
                                  warm.previous_preconditioned_gap if use_warm else None)
            pre_val, pre_vec = float(pres.eigenvalues[0]), pres.eigenvectors[:, 0].detach().clone()
            fresh = _fresh_gaps(pres, settings, pre_init is not None)
            pre_gap = fresh[0] if fresh else None
        if scales.uniform is not None:
            base = pre_val if preconditioned else top_vals[0]
            ratio = None if base is None else scales.uniform * base
        else:  # several learning rates or rules: the lr-scaled operator has a spectrum of its own
            flat = op.flatten(list(scales.scales))
            init = None if pre_vec is None else pre_vec.reshape(-1, 1)
            ratio = float(_top_eigenpair(ScaledOperator(op, flat), settings, gen, init, "lr-scaled").eigenvalues[0])
        controlled = _controlled_ratio(op, optimizer, scales, controlled_groups, settings, gen)

    bs, bs_note = _batch_sharpness(model, loss_fn, batches, settings, step, batch_size, reduce, scales, op)
    if bs_note is not None:
        notes.append(bs_note)

    sharp = top_vals[0]
    ratios = tuple(
        stability_ratio((pre_val if pre_val is not None else math.nan) if g.preconditioned else sharp, g.threshold)
        for g in groups
    )
    align = None
    if grad is not None:
        try:
            align = gradient_alignment(grad, top_vecs[:, 0])
        except ValueError:
            align = None
        if align is not None and not math.isfinite(align):
            align = None
    return Solve(
        eigenvalues=top_vals, lambda_min=lam_min, trace=tr, preconditioned_sharpness=pre_val, groups=tuple(groups),
        ratios=ratios, stability_ratio=ratio, controlled_ratio=controlled, trace_se=tr_se, n_hvp=int(op.n_hvp) + extra,
        residuals=tuple(float(r) for r in res.residuals[:k]),
        lambda_min_residual=float(res.residuals[k]) if which == "both" else None, probe_loss=loss, grad_alignment=align, top_vectors=top_vecs,
        min_vector=min_vec, preconditioned_vector=pre_vec, notes=tuple(notes),
        backend=op.backend, verification=verdict, verify_error=verify_error, switched_to=switched_to, switched_dtype=switched_dtype, crossed=crossed,
        gaps=main_gaps, preconditioned_gap=pre_gap,
        **{**_clip_statistics(optimizer), **bs},
    )


def _batch_sharpness(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    settings: MeasureSettings,
    step: int,
    batch_size: int | None,
    reduce: Callable[[Tensor], Tensor] | None,
    scales: StepScales | None,
    op: HessianOperator,
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The batch-sharpness fields of :class:`Solve` and a note.

    The fields are empty when not requested; the ``(key, message)`` note is set when no mini-batch
    was usable.
    """
    if not settings.batch_sharpness or batch_size is None:
        return {}, None
    # every process must run the same number of reduced products: when any process holds more probe
    # examples than a mini-batch, all draw settings.batch_sharpness mini-batches (a process with fewer
    # uses all its examples in each); one mini-batch only when every process holds at most one
    sampled = torch.tensor([float(sum(default_batch_size(b) for b in batches) > batch_size)], dtype=torch.float64,
                           device=op.device)
    if reduce is not None:
        sampled = reduce(sampled)
    minibatches = sample_minibatches(batches, batch_size, settings.batch_sharpness,
                                     settings.minibatch_generator(step), always=bool(sampled[0] > 0))
    flat = None if scales is None else op.flatten(list(scales.scales))
    try:
        with warnings.catch_warnings():  # the operator's notes were collected for the probe operator already
            warnings.simplefilter("ignore")
            res = batch_sharpness(model, checked_loss(loss_fn), minibatches, dtype=op.dtype,
                                  backend=op.backend, batchnorm=settings.batchnorm, dropout=settings.dropout,
                                  reduce=reduce, scales=flat)
    except ValueError as exc:  # no usable mini-batch (decided on reduced values: the same on every process)
        return {}, ("batch-sharpness", f"batch sharpness not measured at step {step}: {exc}")
    se = None if math.isnan(res.std_error) else res.std_error
    if scales is None:  # no optimizer: the plain quotient, no ratio
        return {"batch_sharpness": res.mean, "batch_sharpness_se": se, "batch_sharpness_batches": res.n_batches}, None
    out: dict[str, Any] = {"batch_sharpness_ratio": res.mean, "batch_sharpness_ratio_se": se,
                           "batch_sharpness_batches": res.n_batches}
    if scales.uniform is not None and scales.uniform > 0:  # S = c * 1 or c * P^-1: the quotient is c times BS
        out["batch_sharpness"] = res.mean / scales.uniform
        out["batch_sharpness_se"] = None if se is None else se / scales.uniform
    return out, None


def solve_sharded(
    op: ShardedHessianOperator,
    settings: MeasureSettings,
    *,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scales: Sequence[float] | None = None,
) -> Solve:
    """Measure a sharded model through its :class:`~lightning_rpe.curvature.sharded.ShardedHessianOperator`.

    Every process calls this with its own shards (the products and inner products are collective)
    and gets the same eigenvalues. Available: the top-k eigenvalues, lambda_min, residuals, the
    probe loss and gradient alignment, thresholds, and the stability ratio when every param group
    shares one ``lr / K`` and the optimizer is not preconditioned. Not available on sharded vectors
    (left out, with a note): the preconditioned sharpness, the trace, and the eigenvector geometry
    (the returned vectors are empty ``(0, m)`` blocks: each process holds only its shard).

    Raises:
        MeasurementSkipped: non-finite values or a solve that did not converge.
    """
    notes: list[tuple[str, str]] = []
    loss, align = None, None
    which = "both" if settings.lambda_min else "largest"
    room = op.total_dim - 1 if which == "both" else op.total_dim
    k = min(settings.top_k, room)
    # no warm start on shards: every sharded solve is a cold one
    res = sharded_eigenpairs(op, k=k, which=which, tol=settings.tol, max_hvp=settings.budget(op.total_dim, k, which, False),
                             generator=settings.generator(step))
    if not bool(torch.isfinite(res.eigenvalues).all()):
        raise MeasurementSkipped(res.reason or "non-finite eigenvalues (non-finite loss or Hessian-vector product)")
    if not res.all_converged:
        raise MeasurementSkipped(f"the eigen-solver did not converge ({res.reason or 'not converged'}; {res.n_hvp} products)")
    if settings.grad_alignment:
        try:
            loss, grad = op.loss_and_gradient()
        except ValueError as exc:
            raise MeasurementSkipped(str(exc)) from exc
        v1 = res.eigenvectors[:, :1].to(grad)
        g = grad.reshape(-1, 1)
        dot, gg = float(op.inner(g, v1)), float(op.inner(g, g))
        align = abs(dot) / math.sqrt(gg) if gg > 0 else None
    top_vals = tuple(float(v) for v in res.eigenvalues[:k])
    groups: list[GroupThreshold] = [] if optimizer is None else list(group_thresholds(optimizer, lr_scales))
    notes.extend(("unknown-optimizer", g.note) for g in groups[:1] if g.note is not None)
    ratio = None
    if groups:
        per = {g.lr / dimensionless_threshold(g) for g in groups if dimensionless_threshold(g) > 0}
        if not any(g.preconditioned for g in groups) and len(per) == 1:
            ratio = per.pop() * top_vals[0]
        else:
            notes.append(("sharded-ratio", "on a sharded model the stability ratio is computed only for a "
                          "non-preconditioned optimizer whose param groups share one lr / K (docs/sharded.md)"))
    missing = [name for name, asked in (
        ("the trace", settings.trace),
        ("the preconditioned sharpness", settings.preconditioned and any(g.preconditioned for g in groups)),
        ("the batch sharpness", bool(settings.batch_sharpness)),
    ) if asked]
    if missing:
        notes.append(("sharded-unavailable", f"on a sharded model {', '.join(missing)} "
                      f"{'is' if len(missing) == 1 else 'are'} not computed (docs/sharded.md)"))
    empty = torch.zeros(0, max(k, 1))
    return Solve(
        eigenvalues=top_vals, lambda_min=float(res.eigenvalues[k]) if which == "both" else None, trace=None,
        preconditioned_sharpness=None, groups=tuple(groups),
        ratios=tuple(stability_ratio(math.nan if g.preconditioned else top_vals[0], g.threshold) for g in groups),
        stability_ratio=ratio, n_hvp=int(op.n_hvp), residuals=tuple(float(r) for r in res.residuals[:k]),
        lambda_min_residual=float(res.residuals[k]) if which == "both" else None, probe_loss=loss,
        grad_alignment=align, top_vectors=empty, min_vector=None, preconditioned_vector=None, notes=tuple(notes),
        backend="finite_difference",
    )


def assemble(
    s: Solve, rotation: Rotation, *, step: int, epoch: int, seconds: float, trigger: str, unverified: bool = False
) -> Measurement:
    """The public :class:`Measurement` of a solve and its rotation against earlier measurements."""
    return Measurement(
        step=step,
        epoch=epoch,
        sharpness=s.eigenvalues[0],
        eigenvalues=s.eigenvalues,
        lambda_min=s.lambda_min,
        trace=s.trace,
        preconditioned_sharpness=s.preconditioned_sharpness,
        thresholds=tuple(float(g.threshold) for g in s.groups),
        ratios=s.ratios,
        lrs=tuple(float(g.lr) for g in s.groups),
        n_hvp=s.n_hvp,
        seconds=float(seconds),
        rotation_cos=rotation.rotation_cos,
        rotation_angle=rotation.rotation_angle,
        subspace_similarity=rotation.subspace_similarity,
        subspace_similarity_to_first=rotation.subspace_similarity_to_first,
        polarity=rotation.polarity,
        polarity_flips=rotation.polarity_flips,
        grad_alignment=s.grad_alignment,
        probe_loss=s.probe_loss,
        kinds=tuple(str(g.kind) for g in s.groups),
        trigger=trigger,
        residuals=s.residuals,
        lambda_min_residual=s.lambda_min_residual,
        stability_ratio=s.stability_ratio,
        eigenvalue_crossings=rotation.crossings,
        backend=s.backend,
        verify_error=s.verify_error,
        unverified=unverified,
        clip_fractions=s.clip_fractions,
        clip_levels=s.clip_levels,
        batch_sharpness=s.batch_sharpness,
        batch_sharpness_se=s.batch_sharpness_se,
        batch_sharpness_ratio=s.batch_sharpness_ratio,
        controlled_ratio=s.controlled_ratio,
        trace_se=s.trace_se,
    )


def at_lr_scales(m: Measurement, before: Sequence[float], after: Sequence[float],
                 controlled: Sequence[int] | None = None) -> Measurement:
    """``m`` restated at other lr factors: its ratios at the effective lrs ``lr_i * after_i / before_i``.

    Every threshold is proportional to ``1 / lr``, so per group the lr and the ratio scale by
    ``c_i = after_i / before_i`` and the threshold by ``1 / c_i`` (curvatures unchanged). The joint
    ratios (``stability_ratio``, ``batch_sharpness_ratio``) scale by ``c`` when every group changes by
    the same ``c``; when the groups change differently (an InstabilityController scaling a subset of
    groups, or per-group lr bounds) they have no closed form at the new lrs and are left out (None:
    not logged at this step; the next measurement has them). ``controlled_ratio`` depends only on
    the ``controlled`` groups: it scales by their common ``c``, and is left out when their changes
    differ (a per-group lr bound). Groups with
    ``before_i <= 0`` keep their values. Used by the monitor so that the ratios it logs after a
    controller's decision are the ones at the lr the next step uses.
    """
    if len(before) != len(m.lrs) or len(after) != len(m.lrs):
        return m
    change = [a / b if b > 0 else 1.0 for a, b in zip(after, before)]
    if all(c == 1.0 for c in change):
        return m
    common = change[0] if len(set(change)) == 1 else None
    inside = {change[i] for i in controlled if 0 <= i < len(change)} if controlled is not None else set(change)
    return replace(
        m,
        lrs=tuple(lr * c for lr, c in zip(m.lrs, change)),
        thresholds=tuple(t / c for t, c in zip(m.thresholds, change)),
        ratios=tuple(r * c for r, c in zip(m.ratios, change)),
        stability_ratio=None if m.stability_ratio is None or common is None else m.stability_ratio * common,
        batch_sharpness_ratio=(None if m.batch_sharpness_ratio is None or common is None
                               else m.batch_sharpness_ratio * common),
        controlled_ratio=(None if m.controlled_ratio is None or len(inside) != 1
                          else m.controlled_ratio * inside.pop()),
    )


def measurement_metrics(m: Measurement, names: MetricNames) -> dict[str, float]:
    """The logged tags and values of a measurement (finite values only; tags from ``names``)."""
    out: dict[str, float | None] = {names.sharpness: m.sharpness, names.lambda_min: m.lambda_min}
    for i, value in enumerate(m.eigenvalues, start=1):
        out[names.eig(i)] = value
    if m.thresholds:
        out[names.threshold] = min(m.thresholds)
        out[names.stability_ratio] = m.stability_ratio
        out[names.controlled_ratio] = m.controlled_ratio
        if len(set(m.thresholds)) > 1:
            for i, (th, r) in enumerate(zip(m.thresholds, m.ratios), start=1):
                out[names.group(THRESHOLD, i)] = th
                out[names.group(STABILITY_RATIO, i)] = r
    out[names.preconditioned_sharpness] = m.preconditioned_sharpness
    out[names.trace] = m.trace
    out[names.trace_se] = m.trace_se
    out[names.rotation_cos] = m.rotation_cos
    out[names.rotation_angle] = m.rotation_angle
    out[names.subspace_similarity] = m.subspace_similarity
    out[names.subspace_similarity_to_first] = m.subspace_similarity_to_first
    out[names.polarity] = m.polarity
    out[names.polarity_flips] = None if m.polarity_flips is None else float(m.polarity_flips)
    out[names.eigenvalue_crossings] = None if m.eigenvalue_crossings is None else float(m.eigenvalue_crossings)
    out[names.grad_alignment] = m.grad_alignment
    out[names.probe_loss] = m.probe_loss
    out[names.sharpness_residual] = m.residuals[0] if m.residuals else None
    out[names.lambda_min_residual] = m.lambda_min_residual
    out[names.batch_sharpness] = m.batch_sharpness
    out[names.batch_sharpness_se] = m.batch_sharpness_se
    out[names.batch_sharpness_ratio] = m.batch_sharpness_ratio
    out[names.finite_difference] = float(m.backend == "finite_difference")
    out[names.verify_error] = m.verify_error
    out[names.unverified] = 1.0 if m.unverified else None
    for values, name in ((m.clip_fractions, CLIP_FRACTION), (m.clip_levels, CLIP_LEVEL)):
        for i, value in enumerate(values, start=1):
            out[names.tag(name) if len(values) == 1 else names.group(name, i)] = value
    out[names.hvps] = float(m.n_hvp)
    out[names.measure_seconds] = m.seconds
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}
