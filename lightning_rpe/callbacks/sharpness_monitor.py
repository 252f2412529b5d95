"""SharpnessMonitor: measure sharpness, the spectrum and eigenvector rotation during training.

A Lightning callback. At the chosen optimizer steps it builds a
:class:`~lightning_rpe.curvature.HessianOperator` of the loss over a probe set around the
(unwrapped) LightningModule, solves for the leading eigenpairs (warm-started from the previous
measurement), compares them with the previous eigenvectors (rotation, subspace similarity,
polarity), compares sharpness with the stability threshold of the optimizer in use, and logs
everything to every logger of the Trainer and to ``trainer.callback_metrics``.

Measuring is invisible to training: the global RNG, gradients, BatchNorm buffers, train/eval flags
and the optimizer are untouched (see ``docs/monitor.md`` for the full list of options, logged
names and their definitions).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_rpe.callbacks import _logging
from lightning_rpe.callbacks._probe import ProbeSet, capture_dataset_probe, capture_loader_probe

__all__ = ["Measurement", "SharpnessMonitor"]

_PROBE_MODES = ("fixed", "batch")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_BATCHNORM = ("eval", "batch")
_DROPOUT = ("off", "on")
_BACKENDS = ("auto", "func", "autograd")
_SOLVERS = ("auto", "lanczos", "block")
_STATE_FORMAT = 1


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

    @property
    def stability_ratio(self) -> float | None:
        """Largest finite per-group ratio (the least stable group), or None."""
        finite = [r for r in self.ratios if math.isfinite(r)]
        return max(finite) if finite else None

    def to_state(self) -> dict[str, Any]:
        """Plain-Python form (tuples as lists) for checkpoints."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Measurement":
        names = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in state.items() if k in names}
        return cls(**kwargs)


class _Skip(Exception):
    """A measurement that cannot be trusted (non-finite loss, non-converged solve)."""


def _choice(name: str, value: Any, accepted: Sequence[Any]) -> ValueError:
    return ValueError(f"SharpnessMonitor: {name} must be one of {', '.join(repr(a) for a in accepted)}; got {value!r}")


def _positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SharpnessMonitor: {name} must be a positive int or None; got {value!r}")
    return int(value)


def _all_reduce_sum(t: Tensor) -> Tensor:
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def _distributed(trainer: "pl.Trainer") -> bool:
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


class _rank_zero_buffers:
    """Temporarily give every rank the buffers of rank 0 (restored bit-exactly on exit)."""

    def __init__(self, module: torch.nn.Module, enabled: bool) -> None:
        self.module = module
        self.enabled = enabled
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        if not self.enabled:
            return
        for buf in self.module.buffers():
            self.saved.append((buf, buf.detach().clone()))
            with torch.no_grad():
                torch.distributed.broadcast(buf.data, src=0)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.data.copy_(value)
        self.saved = []


class _MutedLogging:
    """Temporarily replace ``pl_module.log`` / ``log_dict`` by no-ops (training_step re-calls)."""

    def __init__(self, module: "pl.LightningModule") -> None:
        self.module = module

    def __enter__(self) -> None:
        noop = lambda *args, **kwargs: None  # noqa: E731
        self.module.__dict__["log"] = noop
        self.module.__dict__["log_dict"] = noop

    def __exit__(self, *exc: Any) -> None:
        self.module.__dict__.pop("log", None)
        self.module.__dict__.pop("log_dict", None)


def _training_step_loss(module: Any, batch: Any) -> Tensor:
    out = module.training_step(batch, 0)
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("loss"), Tensor):
        return out["loss"]
    raise ValueError(
        "SharpnessMonitor: training_step must return the loss tensor or a dict with a 'loss' tensor "
        f"to be used as the measured loss; got {type(out).__name__}"
    )


class SharpnessMonitor(Callback):
    """Measure Hessian sharpness, the top-k spectrum, lambda_min and eigenvector rotation.

    See ``docs/monitor.md`` for the meaning of every option and of every logged name.

    Args:
        every_n_steps: measure after every n-th optimizer step (``global_step % n == 0``).
        every_n_epochs: measure after the optimizer step of the last batch of every n-th epoch.
            When both are None, ``every_n_epochs=1``.
        on_fit_start: measure the initial parameters before the first step (fresh runs only);
            None = True unless ``probe="batch"`` (no batch exists yet).
        on_fit_end: measure the final parameters after the last step (unless just measured).
        top_k: number of leading eigenvalues (``eig_1..eig_k``) and of eigenvectors tracked.
        lambda_min: also compute the most negative eigenvalue (same Lanczos run).
        trace: also estimate ``tr(H)`` with Hutch++ (``trace_hvps`` products).
        trace_hvps: product budget of the trace estimate.
        tol: relative residual tolerance of the eigen-solver: ``||H v - lambda v|| <= tol * lambda_max``
            for the top-k pairs.
        lambda_min_tol: the same tolerance for the lambda_min pair (None = ``10 * tol``).
            lambda_min usually sits in a cluster of small eigenvalues far below lambda_max, where
            ``tol`` costs most of the products; at the defaults (1e-2) its residual is at most
            ``1e-2 * lambda_max`` (measured on the digits MLP: within 4% of the ``1e-3`` value).
        max_hvp: product budget per eigen-solve (None = the solver's default).
        solver: ``"lanczos"`` (warm start = one start vector built from the previous
            eigenvectors; the default, measured cheaper than the block solver on the digits MLP
            benchmark, see docs/monitor.md), ``"block"`` (LOBPCG started from the previous
            eigenvectors) or ``"auto"`` (block when warm-started, Lanczos otherwise).
        dtype: ``"float32"`` or ``"float64"``: precision of the Hessian products.
        batchnorm: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics).
        dropout: ``"off"`` or ``"on"`` (fixed masks per probe batch).
        backend: ``"auto"``, ``"func"`` or ``"autograd"`` (see HessianOperator).
        probe: ``"fixed"`` (first ``probe_size`` training samples, captured once), ``"batch"``
            (the current training batch) or a user iterable of batches (read once at fit start).
        probe_size: number of samples of the fixed probe set (or taken from a user loader).
        probe_batch_size: physical batch size of the probe set (None = the training loader's).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` mean loss of a batch.
        use_training_step: opt-in: without ``loss_fn`` and ``compute_loss``, re-call
            ``training_step`` with logging muted (refused under manual optimization).
        preconditioned: for Adam-family groups, compute ``lambda_max(P^-1/2 H P^-1/2)``.
        grad_alignment: compute the probe gradient and its alignment with ``v_1``.
        warm_start: start the solver from the previous eigenvectors.
        prefix: prefix of every logged name.
        seed: seed of the solver's private random generator (combined with the step).
        custom_scalars: write the TensorBoard custom-scalars layout.
        reference_step: the top-k subspace of the first measurement at or after this optimizer
            step is the reference of ``subspace_similarity_to_first``; None turns that metric off
            and saves its k vectors of state.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_fit_start: bool | None = None,
        on_fit_end: bool = True,
        top_k: int = 1,
        lambda_min: bool = True,
        trace: bool = False,
        trace_hvps: int = 60,
        tol: float = 1e-3,
        lambda_min_tol: float | None = None,
        max_hvp: int | None = None,
        solver: str = "lanczos",
        dtype: str = "float32",
        batchnorm: str = "eval",
        dropout: str = "off",
        backend: str = "auto",
        probe: str | Iterable[Any] = "fixed",
        probe_size: int = 1000,
        probe_batch_size: int | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        use_training_step: bool = False,
        preconditioned: bool = True,
        grad_alignment: bool = True,
        warm_start: bool = True,
        prefix: str = "rpe/",
        seed: int = 0,
        custom_scalars: bool = True,
        reference_step: int | None = 0,
    ) -> None:
        super().__init__()
        self.every_n_steps = _positive_int_or_none("every_n_steps", every_n_steps)
        self.every_n_epochs = _positive_int_or_none("every_n_epochs", every_n_epochs)
        if self.every_n_steps is None and self.every_n_epochs is None:
            self.every_n_epochs = 1
        if isinstance(probe, str):
            if probe not in _PROBE_MODES:
                raise ValueError(
                    f"SharpnessMonitor: probe must be one of 'fixed', 'batch' or an iterable of batches "
                    f"(e.g. a DataLoader); got {probe!r}"
                )
        elif not isinstance(probe, Iterable):
            raise ValueError(
                f"SharpnessMonitor: probe must be one of 'fixed', 'batch' or an iterable of batches "
                f"(e.g. a DataLoader); got {type(probe).__name__}"
            )
        self.probe = probe
        for name, value in (("on_fit_end", on_fit_end), ("lambda_min", lambda_min), ("trace", trace),
                            ("use_training_step", use_training_step), ("preconditioned", preconditioned),
                            ("grad_alignment", grad_alignment), ("warm_start", warm_start),
                            ("custom_scalars", custom_scalars)):
            if not isinstance(value, bool):
                raise ValueError(f"SharpnessMonitor: {name} must be True or False; got {value!r}")
        if on_fit_start not in (None, True, False):
            raise _choice("on_fit_start", on_fit_start, (None, True, False))
        if on_fit_start is True and probe == "batch":
            raise ValueError(
                "SharpnessMonitor: on_fit_start=True needs a probe set that exists before the first batch; "
                "with probe='batch' use on_fit_start=None or False, or probe='fixed' / a DataLoader"
            )
        self.on_fit_start_measure = (probe != "batch") if on_fit_start is None else on_fit_start
        self.on_fit_end_measure = on_fit_end
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"SharpnessMonitor: top_k must be an int >= 1; got {top_k!r}")
        self.top_k = top_k
        self.lambda_min = lambda_min
        self.trace = trace
        if isinstance(trace_hvps, bool) or not isinstance(trace_hvps, int) or trace_hvps < 3:
            raise ValueError(f"SharpnessMonitor: trace_hvps must be an int >= 3; got {trace_hvps!r}")
        self.trace_hvps = trace_hvps
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"SharpnessMonitor: tol must be a finite float >= 0; got {tol!r}")
        self.tol = float(tol)
        if lambda_min_tol is not None and (
            isinstance(lambda_min_tol, bool) or not isinstance(lambda_min_tol, (int, float))
            or not math.isfinite(lambda_min_tol) or lambda_min_tol < 0
        ):
            raise ValueError(f"SharpnessMonitor: lambda_min_tol must be a finite float >= 0 or None; got {lambda_min_tol!r}")
        self.lambda_min_tol = 10.0 * self.tol if lambda_min_tol is None else float(lambda_min_tol)
        if max_hvp is not None and (isinstance(max_hvp, bool) or not isinstance(max_hvp, int) or max_hvp < 1):
            raise ValueError(f"SharpnessMonitor: max_hvp must be a positive int or None; got {max_hvp!r}")
        self.max_hvp = max_hvp
        if solver not in _SOLVERS:
            raise _choice("solver", solver, _SOLVERS)
        self.solver = solver
        if isinstance(dtype, torch.dtype):
            dtype = {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))
        if dtype not in _DTYPES:
            raise _choice("dtype", dtype, tuple(_DTYPES))
        self.dtype = dtype
        if batchnorm not in _BATCHNORM:
            raise _choice("batchnorm", batchnorm, _BATCHNORM)
        self.batchnorm = batchnorm
        if dropout not in _DROPOUT:
            raise _choice("dropout", dropout, _DROPOUT)
        self.dropout = dropout
        if backend not in _BACKENDS:
            raise _choice("backend", backend, _BACKENDS)
        self.backend = backend
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"SharpnessMonitor: probe_size must be an int >= 1; got {probe_size!r}")
        self.probe_size = probe_size
        self.probe_batch_size = _positive_int_or_none("probe_batch_size", probe_batch_size)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("SharpnessMonitor: loss_fn must be a callable loss_fn(pl_module, batch) -> scalar tensor, or None")
        self.loss_fn = loss_fn
        self.use_training_step = use_training_step
        self.preconditioned = preconditioned
        self.grad_alignment = grad_alignment
        self.warm_start = warm_start
        if not isinstance(prefix, str):
            raise ValueError(f"SharpnessMonitor: prefix must be a str (e.g. 'rpe/'); got {prefix!r}")
        self.prefix = prefix
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SharpnessMonitor: seed must be an int >= 0; got {seed!r}")
        self.seed = seed
        self.custom_scalars = custom_scalars
        if reference_step is not None and (
            isinstance(reference_step, bool) or not isinstance(reference_step, int) or reference_step < 0
        ):
            raise ValueError(f"SharpnessMonitor: reference_step must be an int >= 0 or None; got {reference_step!r}")
        self.reference_step = reference_step

        #: Set by an InstabilityController: effective lr = param-group lr * scale (per group).
        self.lr_scale_provider: Callable[[], Sequence[float]] | None = None
        #: The last successful measurement.
        self.latest: Measurement | None = None
        self.n_measurements = 0
        self.n_skipped = 0
        self._last_attempt_step: int | None = None
        self._prev_top: Tensor | None = None
        self._first_top: Tensor | None = None
        self._prev_min: Tensor | None = None
        self._prev_pre: Tensor | None = None
        self._probe: ProbeSet | None = None
        self._probe_indices: list[int] | None = None
        self._probe_fingerprint: float | None = None
        self._probe_kind: str | None = None
        self._warned: set[str] = set()
        self._loss: Callable[[Any, Any], Tensor] | None = None
        self._uses_training_step = False
        self._step_at_batch_start: int | None = None
        self._last_batch: Any = None
        from lightning_rpe.geometry import PolarityTracker

        self._polarity = PolarityTracker()

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        probe = self.probe if isinstance(self.probe, str) else "loader"
        return self._generate_state_key(
            prefix=self.prefix, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs,
            top_k=self.top_k, probe=probe,
        )

    def state_dict(self) -> dict[str, Any]:
        """Only tensors and plain Python types (loads with ``torch.load(weights_only=True)``)."""
        return {
            "format": _STATE_FORMAT,
            "prev_top": None if self._prev_top is None else self._prev_top.detach().cpu().clone(),
            "first_top": None if self._first_top is None else self._first_top.detach().cpu().clone(),
            "prev_min": None if self._prev_min is None else self._prev_min.detach().cpu().clone(),
            "prev_pre": None if self._prev_pre is None else self._prev_pre.detach().cpu().clone(),
            "polarity": self._polarity_state(),
            "probe_indices": None if self._probe_indices is None else [int(i) for i in self._probe_indices],
            "probe_kind": self._probe_kind,
            "probe_fingerprint": self._probe_fingerprint,
            "n_measurements": int(self.n_measurements),
            "n_skipped": int(self.n_skipped),
            "last_attempt_step": self._last_attempt_step,
            "latest": None if self.latest is None else self.latest.to_state(),
            "warned": sorted(self._warned),
        }

    def _polarity_state(self) -> dict[str, Any]:
        state = {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in self._polarity.state_dict().items()}
        ref, top = state.get("reference"), self._prev_top
        if isinstance(ref, Tensor) and top is not None and ref.shape == top[:, 0].shape and ref.dtype == top.dtype:
            for sign in (1, -1):
                if torch.equal(ref, top[:, 0] * sign):
                    state["reference"] = None
                    state["reference_is_prev_top"] = sign
                    break
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"SharpnessMonitor: unknown state format {state_dict.get('format')!r}; expected {_STATE_FORMAT}")
        self._prev_top = state_dict["prev_top"]
        self._first_top = state_dict.get("first_top")
        self._prev_min = state_dict["prev_min"]
        self._prev_pre = state_dict["prev_pre"]
        polarity = dict(state_dict["polarity"])
        sign = polarity.pop("reference_is_prev_top", None)
        if sign is not None:
            # the reference was stored as +-prev_top[:, 0] (bit-exact) to save one vector of state
            polarity["reference"] = self._prev_top[:, 0].clone() * sign
        self._polarity.load_state_dict(polarity)
        self._probe_indices = state_dict["probe_indices"]
        self._probe_kind = state_dict["probe_kind"]
        self._probe_fingerprint = state_dict["probe_fingerprint"]
        self._probe = None
        self.n_measurements = int(state_dict["n_measurements"])
        self.n_skipped = int(state_dict["n_skipped"])
        self._last_attempt_step = state_dict["last_attempt_step"]
        self.latest = None if state_dict["latest"] is None else Measurement.from_state(state_dict["latest"])
        self._warned = set(state_dict.get("warned", []))

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        for other in trainer.callbacks:
            if other is not self and isinstance(other, SharpnessMonitor) and other.state_key == self.state_key:
                raise ValueError(
                    "SharpnessMonitor: two monitors in one Trainer have the same state_key "
                    f"{self.state_key!r}; give them different prefix values so their logs and checkpoint "
                    "states stay apart"
                )
        self._loss = self._resolve_loss(pl_module)
        if trainer.global_step == 0:
            # a fresh fit (a checkpoint, if any, is loaded after setup and restores the state)
            self._reset_state()

    def _reset_state(self) -> None:
        self.latest = None
        self.n_measurements = 0
        self.n_skipped = 0
        self._last_attempt_step = None
        self._prev_top = self._first_top = self._prev_min = self._prev_pre = None
        self._probe = None
        self._probe_indices = None
        self._probe_fingerprint = None
        self._probe_kind = None
        self._polarity.reset()
        self._last_batch = None

    @staticmethod
    def _check_strategy(trainer: "pl.Trainer") -> None:
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        sharded = (FSDPStrategy, DeepSpeedStrategy)
        try:
            from lightning.pytorch.strategies import ModelParallelStrategy

            sharded = sharded + (ModelParallelStrategy,)
        except ImportError:  # pragma: no cover - older Lightning
            pass
        if isinstance(strategy, sharded) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"SharpnessMonitor does not support the {type(strategy).__name__} strategy: it needs every "
                "process to hold all parameters. Supported: single-device strategies ('auto' on one device) "
                "and data parallel DDPStrategy ('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook')."
            )

    def _resolve_loss(self, pl_module: "pl.LightningModule") -> Callable[[Any, Any], Tensor]:
        self._uses_training_step = False
        if self.loss_fn is not None:
            user = self.loss_fn
            return lambda model, batch: user(model, batch)
        if callable(getattr(pl_module, "compute_loss", None)):
            return lambda model, batch: model.compute_loss(batch)
        if self.use_training_step:
            if not pl_module.automatic_optimization:
                raise ValueError(
                    "SharpnessMonitor: use_training_step=True is refused under manual optimization "
                    "(training_step would step the optimizer); pass loss_fn=... or define compute_loss(batch)"
                )
            self._uses_training_step = True
            return _training_step_loss
        raise ValueError(
            f"SharpnessMonitor: no loss for {type(pl_module).__name__}: pass loss_fn=callable(pl_module, batch), "
            "define a compute_loss(batch) method on the LightningModule, or opt in with use_training_step=True"
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._loss is None:
            self._loss = self._resolve_loss(pl_module)
        if self.custom_scalars:
            _logging.add_custom_scalars(trainer, self.layout())
        if self.probe != "batch":
            self._capture_probe(trainer, pl_module)
        if self.on_fit_start_measure and trainer.global_step == 0 and self._last_attempt_step != 0:
            self._run(trainer, pl_module, self._probe.batches if self._probe else None, "fit_start")

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = self._step_at_batch_start is not None and trainer.global_step > self._step_at_batch_start
        if self.probe == "batch":
            self._last_batch = batch
        if not stepped:
            return
        step = trainer.global_step
        trigger = None
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            trigger = "step"
        if trigger is None and self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            loop = trainer.fit_loop.epoch_loop
            last = bool(loop.batch_progress.is_last_batch) or loop.batch_progress.current.ready == trainer.num_training_batches
            if last:
                trigger = "epoch"
        if trigger is None or self._last_attempt_step == step:
            return
        batches = [batch] if self.probe == "batch" else (self._probe.batches if self._probe else None)
        self._run(trainer, pl_module, batches, trigger)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.on_fit_end_measure or self._last_attempt_step == trainer.global_step:
            return
        if self.probe == "batch":
            batches = None if self._last_batch is None else [self._last_batch]
        else:
            batches = self._probe.batches if self._probe else None
        self._run(trainer, pl_module, batches, "fit_end")
        self._last_batch = None

    # ------------------------------------------------------------------ probe data
    def _physical_batch_size(self, loader: Any) -> int:
        if self.probe_batch_size is not None:
            return self.probe_batch_size
        size = getattr(loader, "batch_size", None)
        if size is None:
            sampler = getattr(loader, "batch_sampler", None)
            size = getattr(sampler, "batch_size", None)
        return int(size) if isinstance(size, int) and size > 0 else 256

    def _capture_probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        device = pl_module.device

        def transfer(batch: Any) -> Any:
            batch = pl_module.on_before_batch_transfer(batch, 0)
            batch = pl_module.transfer_batch_to_device(batch, device, 0)
            return pl_module.on_after_batch_transfer(batch, 0)

        if self.probe == "fixed":
            loader = trainer.train_dataloader
            if not isinstance(loader, torch.utils.data.DataLoader):
                raise ValueError(
                    "SharpnessMonitor: probe='fixed' reads the data set of the training DataLoader, but the "
                    f"train dataloader is a {type(loader).__name__}; pass probe=<a DataLoader of probe batches> "
                    "or probe='batch'"
                )
            rank, world = (trainer.global_rank, trainer.world_size) if _distributed(trainer) else (0, 1)
            probe = capture_dataset_probe(
                loader, self.probe_size, self._physical_batch_size(loader), rank, world,
                indices=self._probe_indices, transfer=transfer,
            )
        else:
            from lightning_rpe.curvature._functional import default_batch_size

            probe = capture_loader_probe(self.probe, self.probe_size, transfer=transfer, count=default_batch_size)
        if self._probe_fingerprint is not None and self._probe_kind == probe.kind and probe.kind != "loader":
            # Rebuilt after a restart: the shares of all ranks must match what was saved.
            total = probe.fingerprint
            if _distributed(trainer):
                total = float(_all_reduce_sum(torch.tensor(total, dtype=torch.float64)))
            if not math.isclose(total, self._probe_fingerprint, rel_tol=1e-9, abs_tol=1e-12):
                self._warn_once(
                    "probe-changed",
                    "SharpnessMonitor: the probe set rebuilt after resuming differs from the saved one "
                    f"(fingerprint {total!r} vs {self._probe_fingerprint!r}); measurements before and after the "
                    "restart are not over the same data",
                )
        fp = probe.fingerprint
        if _distributed(trainer):
            fp = float(_all_reduce_sum(torch.tensor(fp, dtype=torch.float64)))
        self._probe = probe
        self._probe_indices = probe.indices if probe.kind != "loader" else None
        self._probe_kind = probe.kind
        self._probe_fingerprint = fp

    @property
    def probe_batches(self) -> list[Any] | None:
        """This rank's probe batches (fixed / loader modes), or None before fit start."""
        return None if self._probe is None else self._probe.batches

    # ------------------------------------------------------------------ measurement
    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))

    def _run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batches: list[Any] | None, trigger: str) -> None:
        step = trainer.global_step
        self._last_attempt_step = step
        if not batches:
            self._warn_once(f"nodata-{trigger}", f"SharpnessMonitor: no probe data at step {step} ({trigger}); measurement skipped")
            return
        start = time.perf_counter()
        pending: dict[str, Any] | None = None
        error: str | None = None
        try:
            with isolate_rng(), torch.enable_grad():
                if self._uses_training_step:
                    with _MutedLogging(pl_module):
                        pending = self._compute(trainer, pl_module, batches, step)
                else:
                    pending = self._compute(trainer, pl_module, batches, step)
        except _Skip as exc:
            error = str(exc)
        except Exception as exc:  # a measurement must never stop training
            error = f"{type(exc).__name__}: {exc}"
        if _distributed(trainer):
            ok = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)
            if float(_all_reduce_sum(ok)) > 0 and error is None:
                error = "the measurement failed on another process"
        if error is not None:
            self.n_skipped += 1
            rank_zero_warn(
                f"SharpnessMonitor: measurement at step {step} (epoch {trainer.current_epoch}, {trigger}) skipped: {error}",
                category=UserWarning,
            )
            return
        assert pending is not None
        if _distributed(trainer):
            pending = trainer.strategy.broadcast(pending, src=0)
        measurement = self._commit(trainer, pending, step, trigger, time.perf_counter() - start)
        self._publish(trainer, measurement)

    def _compute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batches: list[Any], step: int) -> dict[str, Any]:
        from lightning_rpe.curvature import HessianOperator, PreconditionedOperator, eigenpairs
        from lightning_rpe.stability import stability_ratio

        reduce = _all_reduce_sum if _distributed(trainer) else None
        assert self._loss is not None
        with _rank_zero_buffers(pl_module, enabled=reduce is not None):
            # the operator snapshots parameters and buffers here; under DDP every rank uses rank 0's
            # buffers (BatchNorm running statistics are updated locally by each rank's last forward)
            op = HessianOperator(
                pl_module, self._loss, batches, dtype=_DTYPES[self.dtype], backend=self.backend,
                batchnorm=self.batchnorm, dropout=self.dropout, reduce=reduce,
            )
        # raises ValueError on a non-finite probe loss: reported and skipped by the caller
        loss, grad = op.loss_and_gradient() if self.grad_alignment else (None, None)
        which = "both" if self.lambda_min else "largest"
        k = min(self.top_k, op.dim - 1 if which == "both" else op.dim)
        init = None
        if self.warm_start and self._prev_top is not None and self._prev_top.shape[0] == op.dim:
            cols = [self._prev_top]
            if self._prev_min is not None and which == "both":
                cols.append(self._prev_min.reshape(-1, 1))
            init = torch.cat(cols, dim=1).to(device=op.device, dtype=op.dtype)
        gen = self._generator(step)
        res = eigenpairs(op, k=k, which=which, tol=self.tol, max_hvp=self.max_hvp, init=init, generator=gen,
                         method=self.solver, tol_smallest=self.lambda_min_tol if which == "both" else None)
        if not bool(torch.isfinite(res.eigenvalues).all()):
            raise _Skip(res.reason or "non-finite eigenvalues (non-finite loss or Hessian-vector product)")
        if not res.all_converged:
            raise _Skip(
                f"the eigen-solver did not converge ({res.reason or 'not converged'}; residuals "
                f"{[float(r) for r in res.residuals]}, tol={self.tol}, {res.n_hvp} products)"
            )
        top_vals = [float(v) for v in res.eigenvalues[:k]]
        top_vecs = res.eigenvectors[:, :k].detach().clone()
        lam_min = float(res.eigenvalues[k]) if which == "both" else None
        min_vec = res.eigenvectors[:, k].detach().clone() if which == "both" else None

        tr = None
        if self.trace:
            from lightning_rpe.curvature.trace import trace as trace_estimate

            tr = float(trace_estimate(op, n_hvp=self.trace_hvps, method="hutch++", generator=gen).estimate)

        groups, optimizer = self._thresholds(trainer)
        pre_val, pre_vec = None, None
        if self.preconditioned and optimizer is not None and any(g.preconditioned for g in groups):
            pre = self._preconditioner(op, optimizer)
            if pre is not None:
                pop = PreconditionedOperator(op, pre)
                pinit = None
                if self.warm_start and self._prev_pre is not None and self._prev_pre.shape[0] == op.dim:
                    pinit = self._prev_pre.reshape(-1, 1).to(device=op.device, dtype=op.dtype)
                pres = eigenpairs(pop, k=1, which="largest", tol=self.tol, max_hvp=self.max_hvp, init=pinit,
                                  generator=gen, method=self.solver)
                if not pres.all_converged:
                    raise _Skip(f"the preconditioned eigen-solve did not converge ({pres.reason or 'not converged'})")
                pre_val = float(pres.eigenvalues[0])
                pre_vec = pres.eigenvectors[:, 0].detach().clone()

        sharp = top_vals[0]
        ratios = []
        for g in groups:
            if g.preconditioned:
                value = pre_val if pre_val is not None else float("nan")
            else:
                value = sharp
            ratios.append(stability_ratio(value, g.threshold))

        align = None
        if grad is not None:
            a = _safe(lambda: _geometry().gradient_alignment(grad, top_vecs[:, 0]))
            align = a if a is not None and math.isfinite(a) else None

        return {
            "epoch": int(trainer.current_epoch),
            "eigenvalues": top_vals,
            "lambda_min": lam_min,
            "trace": tr,
            "pre": pre_val,
            "thresholds": [float(g.threshold) for g in groups],
            "ratios": ratios,
            "lrs": [float(g.lr) for g in groups],
            "kinds": [str(g.kind) for g in groups],
            "n_hvp": int(op.n_hvp),
            "loss": loss,
            "align": align,
            "top_vecs": top_vecs.cpu(),
            "min_vec": None if min_vec is None else min_vec.cpu(),
            "pre_vec": None if pre_vec is None else pre_vec.cpu(),
        }

    def _thresholds(self, trainer: "pl.Trainer") -> tuple[list[Any], Any]:
        from lightning_rpe.stability import group_thresholds

        if not trainer.optimizers:
            return [], None
        if len(trainer.optimizers) > 1:
            self._warn_once(
                "many-optimizers",
                f"SharpnessMonitor: the Trainer has {len(trainer.optimizers)} optimizers; thresholds and ratios "
                "use the param groups of the first one only",
            )
        optimizer = trainer.optimizers[0]
        scales = None
        if self.lr_scale_provider is not None:
            scales = [float(s) for s in self.lr_scale_provider()]
        groups = list(group_thresholds(optimizer, scales))
        unknown = [g.index for g in groups if g.kind == "unknown"]
        if unknown:
            self._warn_once(
                "unknown-optimizer",
                f"SharpnessMonitor: no stability threshold is known for {type(optimizer).__name__} "
                f"(param groups {unknown}); assuming plain gradient descent, threshold = 2 / lr on the "
                "unpreconditioned sharpness. Supported: SGD (plain, heavy-ball momentum, Nesterov), Adam, AdamW, "
                "ClippedAdam.",
            )
        return groups, optimizer

    def _preconditioner(self, op: Any, optimizer: Any) -> Tensor | None:
        from lightning_rpe.stability import adam_preconditioner

        pre = adam_preconditioner(optimizer)
        if pre is None:
            return None
        try:
            flat = op.flatten(pre)
        except ValueError as exc:
            self._warn_once(
                "precond-missing",
                f"SharpnessMonitor: the Adam preconditioner does not cover every trainable parameter ({exc}); "
                "preconditioned sharpness is not computed",
            )
            return None
        if not bool(torch.isfinite(flat).all()) or bool((flat <= 0).any()):
            self._warn_once(
                "precond-invalid",
                "SharpnessMonitor: the Adam preconditioner has zero or non-finite entries (eps=0?); "
                "preconditioned sharpness is not computed",
            )
            return None
        return flat

    def _commit(self, trainer: "pl.Trainer", p: dict[str, Any], step: int, trigger: str, seconds: float) -> Measurement:
        geometry = _geometry()
        top = p["top_vecs"]
        v1 = top[:, 0]
        rot_cos = rot_angle = sub_sim = sub_first = polarity = None
        flips = None
        prev = self._prev_top
        if prev is not None and prev.shape[0] == top.shape[0]:
            prev = prev.to(top)
            rot_cos = _safe(lambda: geometry.abs_cosine(v1, prev[:, 0]))
            rot_angle = _safe(lambda: geometry.rotation_angle(prev[:, 0], v1))
            sub_sim = _safe(lambda: geometry.subspace_similarity(top, prev))
        first = self._first_top
        if self.reference_step is not None and (first is None or first.shape != top.shape) and step >= self.reference_step:
            self._first_top = first = top
        if first is not None and first.shape == top.shape:
            sub_first = _safe(lambda: geometry.subspace_similarity(top, first.to(top)))
        ref = self._polarity.reference
        if ref is not None and ref.numel() != v1.numel():
            self._polarity.reset()
        pstep = _safe(lambda: self._polarity.update(v1))
        if pstep is not None:
            polarity, flips = float(pstep.polarity), int(pstep.flips)
        self._prev_top = top
        self._prev_min = p["min_vec"]
        if p["pre_vec"] is not None:
            self._prev_pre = p["pre_vec"]
        self.n_measurements += 1
        m = Measurement(
            step=step,
            epoch=p["epoch"],
            sharpness=p["eigenvalues"][0],
            eigenvalues=tuple(p["eigenvalues"]),
            lambda_min=p["lambda_min"],
            trace=p["trace"],
            preconditioned_sharpness=p["pre"],
            thresholds=tuple(p["thresholds"]),
            ratios=tuple(p["ratios"]),
            lrs=tuple(p["lrs"]),
            n_hvp=p["n_hvp"],
            seconds=float(seconds),
            rotation_cos=rot_cos,
            rotation_angle=rot_angle,
            subspace_similarity=sub_sim,
            subspace_similarity_to_first=sub_first,
            polarity=polarity,
            polarity_flips=flips,
            grad_alignment=p["align"],
            probe_loss=p["loss"],
            kinds=tuple(p["kinds"]),
            trigger=trigger,
        )
        self.latest = m
        return m

    # ------------------------------------------------------------------ logging
    def metrics(self, m: Measurement) -> dict[str, float]:
        """The logged names and values of a measurement (finite values only)."""
        p = self.prefix
        out: dict[str, float | None] = {f"{p}sharpness": m.sharpness, f"{p}lambda_min": m.lambda_min}
        for i, value in enumerate(m.eigenvalues, start=1):
            out[f"{p}eig_{i}"] = value
        if m.thresholds:
            finite_ratios = [r for r in m.ratios if math.isfinite(r)]
            out[f"{p}threshold"] = min(m.thresholds)
            out[f"{p}stability_ratio"] = max(finite_ratios) if finite_ratios else None
            if len(set(m.thresholds)) > 1:
                for i, (th, r) in enumerate(zip(m.thresholds, m.ratios), start=1):
                    out[f"{p}threshold/pg{i}"] = th
                    out[f"{p}stability_ratio/pg{i}"] = r
        out[f"{p}preconditioned_sharpness"] = m.preconditioned_sharpness
        out[f"{p}trace"] = m.trace
        out[f"{p}rotation_cos"] = m.rotation_cos
        out[f"{p}rotation_angle"] = m.rotation_angle
        out[f"{p}subspace_similarity"] = m.subspace_similarity
        out[f"{p}subspace_similarity_to_first"] = m.subspace_similarity_to_first
        out[f"{p}polarity"] = m.polarity
        out[f"{p}polarity_flips"] = None if m.polarity_flips is None else float(m.polarity_flips)
        out[f"{p}grad_alignment"] = m.grad_alignment
        out[f"{p}probe_loss"] = m.probe_loss
        out[f"{p}hvps"] = float(m.n_hvp)
        out[f"{p}measure_seconds"] = m.seconds
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    def _publish(self, trainer: "pl.Trainer", m: Measurement) -> None:
        values = self.metrics(m)
        _logging.publish_callback_metrics(trainer, values)
        _logging.log_to_loggers(trainer, values, step=_logging.batches_that_stepped(trainer))

    def layout(self) -> dict[str, dict[str, list[str]]]:
        """TensorBoard custom-scalars categories of this monitor (anchored tag regexes)."""
        p = self.prefix
        esc = re.escape
        return {
            f"{p}curvature".rstrip("/"): {
                "sharpness vs stability threshold": [
                    _logging.tag_regex(f"{p}sharpness", f"{p}preconditioned_sharpness"),
                    f"^{esc(p)}threshold(/.*)?$",
                ],
                "spectrum: top-k and lambda_min": [f"^{esc(p)}eig_[0-9]+$", _logging.tag_regex(f"{p}lambda_min")],
                "stability ratio": [f"^{esc(p)}stability_ratio(/.*)?$"],
                "rotation and polarity (degrees)": [_logging.tag_regex(f"{p}rotation_angle", f"{p}polarity")],
                "rotation cosines and alignment": [
                    _logging.tag_regex(
                        f"{p}rotation_cos", f"{p}subspace_similarity", f"{p}subspace_similarity_to_first",
                        f"{p}grad_alignment",
                    )
                ],
            }
        }


def _geometry():
    from lightning_rpe import geometry

    return geometry


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ValueError:
        return None
