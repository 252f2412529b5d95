"""SharpnessMonitor: measure sharpness, the spectrum and eigenvector rotation during training.

A Lightning callback over the Lightning-free core :mod:`lightning_rpe.measure`. This file holds
Lightning's part only: when to measure, which probe data, the DDP plumbing, checkpoint state and
logging. The measurement (:func:`lightning_rpe.measure.solve`) and the rotation against earlier
measurements (:class:`lightning_rpe.geometry.EigenvectorTracker`) live in the core.

Measuring is invisible to training: the global RNG, gradients, BatchNorm buffers, train/eval flags
and the optimizer are untouched (see ``docs/monitor.md`` for the full list of options, logged
names and their definitions).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lightning_rpe.callbacks import _logging
from lightning_rpe.callbacks._distributed import RankZeroBuffers, all_reduce_sum, broadcast_solve, distributed
from lightning_rpe.callbacks._loss import MutedLogging, resolve_loss
from lightning_rpe.callbacks._probe import ProbeSet, capture_probe_everywhere
from lightning_rpe.callbacks._sharded import check_supported, is_sharded, sharded_operator
from lightning_rpe.callbacks.run_card import write_run_card
from lightning_rpe.curvature._functional import default_batch_size
from lightning_rpe.curvature.eigen import working_vectors
from lightning_rpe.geometry import EigenvectorTracker, PolarityTracker, Rotation
from lightning_rpe.measure import (
    DTYPES,
    Backend,
    BatchNormPolicy,
    Criterion,
    DropoutPolicy,
    DType,
    LossFunctionError,
    Measurement,
    MeasurementSkipped,
    MeasureSettings,
    Solve,
    Solver,
    Verify,
    assemble,
    at_lr_scales,
    measurement_metrics,
    solve,
    solve_sharded,
)
from lightning_rpe.names import MetricNames
from lightning_rpe.validation import check_bool, check_choice, check_int, fail

__all__ = ["Measurement", "SharpnessMonitor"]

_OWNER = "SharpnessMonitor"
_STATE_FORMAT = 1
_BATCH_SHARPNESS_DEFAULT = 16  # mini-batches per batch-sharpness estimate with batch_sharpness=True


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
            ``tol`` costs most of the products; at the default its residual is at most
            ``1e-2 * lambda_max`` (docs/monitor.md has the measured effect).
        max_hvp: product budget per eigen-solve (None = the solver's default ``min(dim, 50 + 30 n)``
            for warm-started solves and twice that for cold ones, e.g. the first measurement of a run).
        max_basis: Lanczos basis cap in parameter vectors (None = the solver's default
            ``max(12, 2 n + 8)``, ``n`` = ``top_k`` plus one with ``lambda_min``); at least ``top_k + 3``
            (``top_k + 4`` with ``lambda_min``). Fewer vectors held, more products (raise ``max_hvp``
            with it); docs/monitor.md, "Memory", has the measured trade-off.
        solver: ``"lanczos"`` (warm start = one start vector built from the previous
            eigenvectors; the default, see docs/monitor.md), ``"block"`` (LOBPCG started from the
            previous eigenvectors) or ``"auto"`` (block when warm-started, Lanczos otherwise).
        dtype: ``"float32"`` or ``"float64"``: precision of the Hessian products.
        batchnorm: ``"batch"`` (the default: batch statistics over each physical probe batch of the
            training batch size, running statistics untouched: the loss training differentiates) or
            ``"eval"`` (running statistics, as in most published research code; a different function).
        dropout: ``"off"`` (every module evaluated as in ``eval()``, normalization layers by
            ``batchnorm``) or ``"on"`` (each module keeps its own train/eval flag; masks fixed per
            probe batch).
        backend: ``"auto"``, ``"func"``, ``"autograd"`` or ``"finite_difference"`` (see HessianOperator).
        verify: check the Hessian-vector products against float64 finite differences of gradients
            at the first measurement of a run (``"first"``), at every one (``"every"``) or never
            (``"off"``). A failed check is warned about (naming the known causes found in the
            model) and, with ``backend="auto"``, switches the run to the finite-difference backend;
            otherwise every later measurement is flagged ``rpe/unverified``.
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
        criterion: stopping rule of the warm solves: ``"residual"`` (every pair to its residual
            tolerance: eigenvalues and vectors accurate), ``"eigenvalue"`` (every warm pair to the
            eigenvalue error ``r^2 / gap <= tol * lambda_max`` with the previous measurement's gap
            estimates: fewer products, eigenvalues at ``tol``, but vectors, and so rotation, polarity,
            gradient alignment and subspace similarities, only to ``asin(sqrt(tol * lambda_max / gap))``)
            or ``"auto"`` (the eigenvalue rule only where the vector feeds no reported number: the
            lambda_min pair and the preconditioned solve). See docs/monitor.md.
        prefix: prefix of every logged name.
        seed: seed of the solver's private random generator (combined with the step).
        custom_scalars: write the TensorBoard custom-scalars layout.
        reference_step: the top-k subspace of the first measurement at or after this optimizer
            step is the reference of ``subspace_similarity_to_first``; None turns that metric off
            and saves its k vectors of state.
        batch_sharpness: also measure the batch sharpness ``E_B[g_B^T H_B g_B / |g_B|^2]`` over
            mini-batches of the training batch size drawn from the probe set (``True``: 16
            mini-batches; an int: that many; ``False``: off). One gradient and one product per
            mini-batch. Logged as ``batch_sharpness``, ``batch_sharpness_se``, ``batch_sharpness_ratio``.
        cache_graphs: keep the probe batches' double-backward graphs during a measurement
            (``True``), rebuild them for every product (``False``: about one gradient more per
            product, no graph held between products: the memory lever on a GPU, where the automatic
            rule, ``None``, caches whenever a quarter of the free memory holds them).

    Raises:
        ValueError: at construction, naming the option and its accepted values.
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
        max_basis: int | None = None,
        solver: Solver = "lanczos",
        dtype: DType = "float32",
        batchnorm: BatchNormPolicy = "batch",
        dropout: DropoutPolicy = "off",
        backend: Backend = "auto",
        verify: Verify = "first",
        probe: Literal["fixed", "batch"] | Iterable[Any] = "fixed",
        probe_size: int = 1000,
        probe_batch_size: int | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        use_training_step: bool = False,
        preconditioned: bool = True,
        grad_alignment: bool = True,
        warm_start: bool = True,
        criterion: Criterion = "auto",
        prefix: str = "rpe/",
        seed: int = 0,
        custom_scalars: bool = True,
        reference_step: int | None = 0,
        batch_sharpness: bool | int = False,
        cache_graphs: bool | None = None,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_int(_OWNER, "every_n_steps", every_n_steps, minimum=1, allow_none=True)
        self.every_n_epochs = check_int(_OWNER, "every_n_epochs", every_n_epochs, minimum=1, allow_none=True)
        if self.every_n_steps is None and self.every_n_epochs is None:
            self.every_n_epochs = 1
        if isinstance(probe, str) and probe not in ("fixed", "batch") or not isinstance(probe, (str, Iterable)):
            shown = probe if isinstance(probe, str) else type(probe).__name__
            raise fail(_OWNER, "probe", "one of 'fixed', 'batch' or an iterable of batches (e.g. a DataLoader)", shown)
        self.probe = probe
        for name, value in (("on_fit_end", on_fit_end), ("use_training_step", use_training_step),
                            ("custom_scalars", custom_scalars)):
            check_bool(_OWNER, name, value)
        check_choice(_OWNER, "on_fit_start", on_fit_start, (None, True, False))
        if on_fit_start is True and probe == "batch":
            raise ValueError(
                "SharpnessMonitor: on_fit_start=True needs a probe set that exists before the first batch; "
                "with probe='batch' use on_fit_start=None or False, or probe='fixed' / a DataLoader"
            )
        self.on_fit_start_measure = (probe != "batch") if on_fit_start is None else on_fit_start
        if isinstance(batch_sharpness, bool):
            n_batch_sharpness = _BATCH_SHARPNESS_DEFAULT if batch_sharpness else 0
        else:
            n_batch_sharpness = check_int(_OWNER, "batch_sharpness", batch_sharpness, minimum=1) or 0
        self.on_fit_end_measure = on_fit_end
        self.settings = MeasureSettings(
            top_k=top_k, lambda_min=lambda_min, trace=trace, trace_hvps=trace_hvps, tol=tol,
            lambda_min_tol=lambda_min_tol, max_hvp=max_hvp, max_basis=max_basis, solver=solver, dtype=dtype, batchnorm=batchnorm,
            dropout=dropout, backend=backend, verify=verify, preconditioned=preconditioned, grad_alignment=grad_alignment,
            warm_start=warm_start, criterion=criterion, seed=seed, batch_sharpness=n_batch_sharpness,
            cache_graphs=cache_graphs, owner=_OWNER,
        )
        self.probe_size = check_int(_OWNER, "probe_size", probe_size, minimum=1)
        self.probe_batch_size = check_int(_OWNER, "probe_batch_size", probe_batch_size, minimum=1, allow_none=True)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("SharpnessMonitor: loss_fn must be a callable loss_fn(pl_module, batch) -> scalar tensor, or None")
        self.loss_fn = loss_fn
        self.use_training_step = use_training_step
        if not isinstance(prefix, str):
            raise fail(_OWNER, "prefix", "a str (e.g. 'rpe/')", prefix)
        self.prefix = prefix
        self.names = MetricNames(prefix)
        self.custom_scalars = custom_scalars
        self.reference_step = check_int(_OWNER, "reference_step", reference_step, minimum=0, allow_none=True)

        #: Set by an InstabilityController: effective lr = param-group lr * scale (per group).
        self.lr_scale_provider: Callable[[], Sequence[float]] | None = None
        #: Set by an InstabilityController that scales a strict subset of the param groups: the
        #: monitor then also measures their own ratio (``Measurement.controlled_ratio``, one more solve).
        self.controlled_groups: tuple[int, ...] | None = None
        #: Called with ``(trainer, measurement)`` for each new measurement before it is logged (an
        #: InstabilityController decides there); afterwards the measurement is restated at the lr
        #: factors then in force (:func:`lightning_rpe.measure.at_lr_scales`).
        self.listeners: list[Callable[[pl.Trainer, Measurement], None]] = []
        #: The last successful measurement.
        self.latest: Measurement | None = None
        self.n_measurements = 0
        self.n_skipped = 0
        self._tracker = EigenvectorTracker(self.reference_step)
        self._last_attempt_step: int | None = None
        self._probe: ProbeSet | None = None
        self._probe_indices: list[int] | None = None
        self._probe_fingerprint: float | None = None
        self._probe_kind: str | None = None
        self._warned: set[str] = set()
        self._loss: Callable[[Any, Any], Tensor] | None = None
        self._uses_training_step = False
        self._step_at_batch_start: int | None = None
        self._last_batch: Any = None
        self._train_batch_size: int | None = None
        self._sharded = False  # the strategy shards parameters: finite-difference products on local shards
        self._verified = False  # a product check was made in this run
        self._settled_backend: str | None = None  # the backend a failed check switched to (Solve.switched_to)
        self._settled_dtype: str | None = None  # and the dtype (Solve.switched_dtype)
        self._unverified = False  # the check failed or was inconclusive and nothing was switched

    def __getattr__(self, name: str) -> Any:
        # the measurement settings read as monitor attributes (monitor.tol, monitor.dtype, ...)
        settings = self.__dict__.get("settings")
        if settings is not None and name in type(settings).__dataclass_fields__ and name != "owner":
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def _prev_top(self) -> Tensor | None:
        return self._tracker.previous_top

    @property
    def _polarity(self) -> PolarityTracker:
        return self._tracker.polarity

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
            **self._tracker.state_dict(),
            "probe_indices": None if self._probe_indices is None else [int(i) for i in self._probe_indices],
            "probe_kind": self._probe_kind,
            "probe_fingerprint": self._probe_fingerprint,
            "n_measurements": int(self.n_measurements),
            "n_skipped": int(self.n_skipped),
            "last_attempt_step": self._last_attempt_step,
            "latest": None if self.latest is None else self.latest.to_state(),
            "warned": sorted(self._warned),
            "verified": self._verified,
            "finite_difference": self._settled_backend == "finite_difference",  # read by older versions
            "settled_backend": self._settled_backend,
            "settled_dtype": self._settled_dtype,
            "unverified": self._unverified,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"SharpnessMonitor: unknown state format {state_dict.get('format')!r}; expected {_STATE_FORMAT}")
        self._tracker.load_state_dict(state_dict)
        self._probe_indices = state_dict["probe_indices"]
        self._probe_kind = state_dict["probe_kind"]
        self._probe_fingerprint = state_dict["probe_fingerprint"]
        self._probe = None
        self.n_measurements = int(state_dict["n_measurements"])
        self.n_skipped = int(state_dict["n_skipped"])
        self._last_attempt_step = state_dict["last_attempt_step"]
        self.latest = None if state_dict["latest"] is None else Measurement.from_state(state_dict["latest"])
        self._warned = set(state_dict.get("warned", []))
        self._verified = bool(state_dict.get("verified", False))
        self._settled_backend = state_dict.get("settled_backend") or (
            "finite_difference" if state_dict.get("finite_difference", False) else None)
        self._settled_dtype = state_dict.get("settled_dtype")
        self._unverified = bool(state_dict.get("unverified", False))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is not self and isinstance(other, SharpnessMonitor) and other.state_key == self.state_key:
                raise ValueError(
                    "SharpnessMonitor: two monitors in one Trainer have the same state_key "
                    f"{self.state_key!r}; give them different prefix values so their logs and checkpoint "
                    "states stay apart"
                )
        self._loss, self._uses_training_step = resolve_loss(pl_module, self.loss_fn, self.use_training_step)
        if self.probe == "fixed" and trainer.world_size > self.probe_size:
            raise ValueError(
                f"SharpnessMonitor: probe_size={self.probe_size} is smaller than the number of processes "
                f"({trainer.world_size}): every process needs at least one probe sample; use probe_size >= "
                f"{trainer.world_size}"
            )
        if trainer.global_step == 0:
            # a fresh fit (a checkpoint, if any, is loaded after setup and restores the state)
            self._reset_state()

    def _reset_state(self) -> None:
        self.latest = None
        self.n_measurements = 0
        self.n_skipped = 0
        self._last_attempt_step = None
        self._tracker.reset()
        self._probe = None
        self._probe_indices = None
        self._probe_fingerprint = None
        self._probe_kind = None
        self._last_batch = None
        self._verified = self._unverified = False
        self._settled_backend = self._settled_dtype = None
        self._warned = set()  # a fresh run says its warnings again (a reused monitor in a sweep loop)

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        self._sharded = is_sharded(strategy)
        if self._sharded:
            try:
                check_supported(strategy)
            except ValueError as exc:
                raise ValueError(
                    f"SharpnessMonitor does not support this {type(strategy).__name__} setup: {exc}. Supported: "
                    "single-device strategies, DDPStrategy, FSDPStrategy and ModelParallelStrategy with "
                    "tensor_parallel_size=1 (docs/sharded.md)."
                ) from exc
            return
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"SharpnessMonitor does not support the {type(strategy).__name__} strategy. Supported: "
                "single-device strategies ('auto' on one device), data parallel DDPStrategy ('ddp', 'ddp_spawn', "
                "'ddp_fork', 'ddp_notebook'), FSDPStrategy and ModelParallelStrategy (docs/sharded.md)."
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loss is None:
            self._loss, self._uses_training_step = resolve_loss(pl_module, self.loss_fn, self.use_training_step)
        if self.custom_scalars:
            _logging.add_custom_scalars(trainer, self.layout())
        write_run_card(trainer, pl_module, self)
        if self.probe != "batch":
            self._capture_probe(trainer, pl_module)
        if self.on_fit_start_measure and trainer.global_step == 0 and self._last_attempt_step != 0:
            n_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            rank_zero_info(
                f"SharpnessMonitor: measuring the Hessian of the initial parameters ({n_params:,} parameters, "
                f"{len(self._probe_indices) if self._probe_indices else self.probe_size} probe samples, top-{self.top_k}{' and lambda_min' if self.lambda_min else ''}); "
                "the first measurement has no warm start and takes longest"
            )
            self._run(trainer, pl_module, self._probe.batches if self._probe else None, "fit_start")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step
        if self.settings.batch_sharpness:
            try:
                self._train_batch_size = default_batch_size(batch)
            except ValueError:
                self._train_batch_size = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.on_fit_end_measure or self._last_attempt_step == trainer.global_step:
            return
        if self.probe == "batch":
            batches = None if self._last_batch is None else [self._last_batch]
        else:
            batches = self._probe.batches if self._probe else None
        self._run(trainer, pl_module, batches, "fit_end")
        self._last_batch = None

    # ------------------------------------------------------------------ probe data
    def _capture_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reduce = all_reduce_sum if distributed(trainer) else None
        rank, world = (trainer.global_rank, trainer.world_size) if reduce is not None else (0, 1)
        # BatchNorm1d under batch statistics cannot evaluate a batch of one (N, C) sample (BatchNorm2d/3d
        # can, over its spatial positions; the skip message explains a failure there)
        batch_stats = self.settings.batchnorm == "batch" and any(
            isinstance(m, nn.BatchNorm1d) for m in pl_module.modules())
        probe, fp, n_samples, dropped = capture_probe_everywhere(
            trainer, pl_module, self.probe, self.probe_size, self.probe_batch_size, self._probe_indices, rank, world,
            reduce, min_batch=2 if batch_stats else 1,
        )
        if self.probe == "fixed" and self._probe_indices is None:
            held = len(probe.indices)
            full = (f" ({n_samples} in full batches: training drops the last incomplete batch, "
                    "drop_last=True, and so does the probe)") if dropped["drop_last"] else ""
            if held < self.probe_size:
                self._warn_once(
                    "probe-truncated",
                    f"SharpnessMonitor: probe_size={self.probe_size} but the training data set holds {held} "
                    f"samples: the probe set is the whole data set{full}",
                )
            elif full:
                self._warn_once("probe-drop-last", f"SharpnessMonitor: the probe set is the whole data set{full}")
            if dropped["one_sample"]:
                where = f" over {world} processes" if world > 1 else ""
                self._warn_once(
                    "probe-one-sample",
                    f"SharpnessMonitor: {dropped['one_sample']} probe sample(s) would form a last batch of one "
                    f"sample{where} ({held} probe samples in batches of {default_batch_size(probe.batches[0])}), "
                    "which BatchNorm1d with batch statistics cannot evaluate: left out, the probe holds "
                    f"{n_samples}. Choose probe_size (or probe_batch_size) so that no probe batch holds a single "
                    "sample, or batchnorm='eval'",
                )
        if self._probe_fingerprint is not None and self._probe_kind == probe.kind and probe.kind != "loader":
            # Rebuilt after a restart: the shares of all ranks must match what was saved.
            if not math.isclose(fp, self._probe_fingerprint, rel_tol=1e-9, abs_tol=1e-12):
                self._warn_once(
                    "probe-changed",
                    "SharpnessMonitor: the probe set rebuilt after resuming differs from the saved one "
                    f"(fingerprint {fp!r} vs {self._probe_fingerprint!r}); measurements before and after the "
                    "restart are not over the same data",
                )
        self._probe = probe
        self._probe_indices = probe.indices if probe.kind != "loader" else None
        self._probe_kind = probe.kind
        self._probe_fingerprint = fp

    @property
    def sharded(self) -> bool:
        """Whether the strategy shards the parameters (known from ``setup``): docs/sharded.md."""
        return self._sharded

    @property
    def measures_batch_sharpness(self) -> bool:
        """Whether measurements carry the batch sharpness: requested, and not on a sharded model
        (known from ``setup``), where it is not computed.
        """
        return bool(self.settings.batch_sharpness) and not self._sharded

    @property
    def probe_batches(self) -> list[Any] | None:
        """This rank's probe batches (fixed / loader modes), or None before fit start."""
        return None if self._probe is None else self._probe.batches

    # ------------------------------------------------------------------ measurement
    def _lr_scales(self) -> list[float] | None:
        return None if self.lr_scale_provider is None else [float(s) for s in self.lr_scale_provider()]

    def _batch_size(self, trainer: pl.Trainer) -> int | None:
        """This process's training batch size for the batch sharpness (None when off or unknown).

        The last training batch seen, else the training DataLoader's ``batch_size`` (at fit start),
        times ``accumulate_grad_batches``: an optimizer step's gradient is the mean over that many
        batches, so that union is the mini-batch whose quotient the step sees.
        """
        if not self.settings.batch_sharpness:
            return None
        size = self._train_batch_size
        if size is None:
            size = getattr(trainer.train_dataloader, "batch_size", None)
            if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
                return None
        return size * max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))

    def _solve(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], step: int) -> Solve:
        optimizer = None
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            if len(trainer.optimizers) > 1:
                self._warn_once(
                    "many-optimizers",
                    f"SharpnessMonitor: the Trainer has {len(trainer.optimizers)} optimizers; thresholds and "
                    "ratios use the param groups of the first one only",
                )
        is_distributed = distributed(trainer)
        assert self._loss is not None
        # under DDP every rank uses rank 0's buffers (BatchNorm running statistics are updated
        # locally by each rank's last forward); the operator snapshots them at construction
        # logging is muted on every loss path: a compute_loss / loss_fn / training_step that calls
        # self.log must not replace the logged training values with probe-batch values
        with isolate_rng(), torch.enable_grad(), RankZeroBuffers(pl_module, enabled=is_distributed), \
                MutedLogging(pl_module):
            if self._sharded:
                op = sharded_operator(trainer, pl_module, self._loss, batches, DTYPES[self.settings.dtype],
                                      batchnorm=self.settings.batchnorm, dropout=self.settings.dropout)
                return solve_sharded(op, self.settings, step=step, optimizer=optimizer, lr_scales=self._lr_scales())
            check = self.settings.verify == "every" or (self.settings.verify == "first" and not self._verified)
            return solve(pl_module, self._loss, batches, self.settings, step=step, optimizer=optimizer,
                         lr_scales=self._lr_scales(), warm=self._tracker,
                         reduce=all_reduce_sum if is_distributed else None, check=check,
                         backend=self._settled_backend, dtype=self._settled_dtype, batch_size=self._batch_size(trainer),
                         controlled_groups=self.controlled_groups)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any] | None, trigger: str) -> None:
        step = trainer.global_step
        self._last_attempt_step = step
        if not batches:
            self._warn_once(f"nodata-{trigger}", f"SharpnessMonitor: no probe data at step {step} ({trigger}); measurement skipped")
            return
        start = time.perf_counter()
        scales_before = self._lr_scales()
        result: Solve | None = None
        error: str | None = None
        mistake: LossFunctionError | None = None
        try:
            result = self._solve(trainer, pl_module, batches, step)
        except MeasurementSkipped as exc:
            error = str(exc)
            for key, message in exc.notes:  # e.g. a failed product check that explains the failure
                self._warn_once(key, f"SharpnessMonitor: {message}")
        except LossFunctionError as exc:  # a programming error: permanent, not numerical
            error, mistake = str(exc), exc
        except Exception as exc:  # a measurement must never stop training
            error = f"{type(exc).__name__}: {exc}"
        flags = torch.tensor([float(error is not None), float(mistake is not None)], dtype=torch.float64)
        if distributed(trainer):
            flags = all_reduce_sum(flags)
            if flags[0] > 0 and error is None:
                error = "the measurement failed on another process"
        if flags[1] > 0 and self.n_measurements == 0:
            # every process raises: the user's loss cannot be measured at all
            raise ValueError(
                f"SharpnessMonitor: the measured loss is wrong ({error if mistake else 'on another process'}). "
                "The loss is loss_fn(pl_module, batch) -> scalar tensor (the mean loss of the batch), else the "
                "module's compute_loss(batch); fix it, or remove the SharpnessMonitor"
            ) from mistake
        if error is not None:
            self.n_skipped += 1
            if "Expected more than 1 value per channel" in error:
                error += (" (a probe batch of one sample, which BatchNorm with batch statistics cannot evaluate: "
                          "choose probe_size / probe_batch_size so that every probe batch holds at least 2 samples, "
                          "or batchnorm='eval')")
            rank_zero_warn(
                f"SharpnessMonitor: measurement at step {step} (epoch {trainer.current_epoch}, {trigger}) skipped: {error}",
                category=UserWarning,
            )
            return
        assert result is not None
        if distributed(trainer) and not self._sharded:  # sharded: every rank holds its own shard of the vectors
            result = broadcast_solve(trainer.strategy, result, pl_module.device)
        for key, message in result.notes:
            self._warn_once(key, f"SharpnessMonitor: {message}")
        if result.verification is not None:
            self._verified = True
            self._settled_backend = result.switched_to or self._settled_backend
            self._settled_dtype = result.switched_dtype or self._settled_dtype
            self._unverified = result.verification != "passed" and result.switched_to is None
        rotation = Rotation() if self._sharded else self._tracker.update(
            step, result.top_vectors, result.min_vector, result.preconditioned_vector, k=len(result.eigenvalues),
            crossed=result.crossed, gaps=result.gaps, preconditioned_gap=result.preconditioned_gap)
        self.n_measurements += 1
        m = assemble(result, rotation, step=step, epoch=int(trainer.current_epoch),
                     seconds=time.perf_counter() - start, trigger=trigger, unverified=self._unverified)
        if self.n_measurements == 1 and not self._sharded:
            self._say_cold_cost(pl_module, m)
        for listener in list(self.listeners):
            listener(trainer, m)
        scales_after = self._lr_scales()
        if scales_before is not None and scales_after is not None:
            # the ratios at the lr the next step uses
            m = at_lr_scales(m, scales_before, scales_after, controlled=self.controlled_groups)
        self.latest = m
        self._publish(trainer, m)

    def _say_cold_cost(self, pl_module: pl.LightningModule, m: Measurement) -> None:
        """Report the first (cold) measurement's products, time and the solver's memory bound, once."""
        dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        which = "both" if self.settings.lambda_min else "largest"
        room = dim - 1 if which == "both" else dim  # the k measure.solve asks for
        vectors = working_vectors(dim, min(self.settings.top_k, room), which, self.settings.solver,
                                  max_basis=self.settings.max_basis)
        dtype = DTYPES[self._settled_dtype or self.settings.dtype]  # float64 after a failed float32 check
        nbytes = vectors * dim * dtype.itemsize
        rank_zero_info(
            f"SharpnessMonitor: first measurement (no warm start): {m.n_hvp} Hessian-vector products, "
            f"{m.seconds:.3g} s; the eigen-solver holds at most {vectors} parameter-sized vectors "
            f"({nbytes / 2**20:.1f} MiB) besides the probe batches' graphs (docs/monitor.md, memory)"
        )

    # ------------------------------------------------------------------ logging
    def metrics(self, m: Measurement) -> dict[str, float]:
        """The logged names and values of a measurement (finite values only)."""
        return measurement_metrics(m, self.names)

    def _publish(self, trainer: pl.Trainer, m: Measurement) -> None:
        values = self.metrics(m)
        _logging.publish_callback_metrics(trainer, values)
        # x = the number of optimizer updates applied to the measured parameters (Measurement.step),
        # the same x at which Lightning logs a training_step's loss computed on those parameters
        _logging.log_to_loggers(trainer, values, step=m.step)

    def layout(self) -> dict[str, dict[str, list[str]]]:
        """TensorBoard custom-scalars categories of this monitor (anchored tag regexes)."""
        return _logging.monitor_layout(self.names)
