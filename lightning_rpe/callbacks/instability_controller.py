"""InstabilityController: steer the stability ratio by scaling the learning rate, safely.

The controller follows the :class:`~lightning_rpe.callbacks.sharpness_monitor.SharpnessMonitor` in
the same Trainer. After each new measurement it chooses a factor ``f`` (the pure control law in
:mod:`lightning_rpe.control`) so that the ratio of a gauge (the sharpness, or the batch sharpness
under minibatch training) to the optimizer's threshold lands in a band or at a target, and the
optimizer steps with

    effective lr = scheduled lr * f

The multiplication happens only inside ``optimizer.step`` (a torch step pre-hook multiplies the
controlled groups' ``lr``, a post-hook puts the scheduled values back), so learning-rate schedulers,
``LearningRateMonitor`` and checkpoints always see the scheduled rate.

This module holds only what needs Lightning: finding the monitor, the step hooks, the divergence
guard's snapshot and rollback (model and optimizer state kept in host memory), DDP agreement
(rank zero decides and broadcasts; a rollback happens on every rank when any rank sees a bad
loss) and logging. See ``docs/controller.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_rpe import control
from lightning_rpe.callbacks import _logging
from lightning_rpe.callbacks.sharpness_monitor import Measurement, SharpnessMonitor
from lightning_rpe.control import (
    AfterStop,
    Approach,
    BandGoal,
    ControlSettings,
    ControlState,
    Gauge,
)
from lightning_rpe.stability import group_thresholds

__all__ = ["InstabilityController"]

_STATE_ATTRS = tuple(f.name for f in fields(ControlState))


def _host_copy(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples of tensors with every tensor cloned to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _total_steps(trainer: pl.Trainer) -> int | None:
    """The run's optimizer steps (``trainer.estimated_stepping_batches``), or None if unbounded/unknown."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None
    return int(total) if math.isfinite(total) and total > 0 else None


def _loss_of(outputs: Any) -> float | None:
    """The training loss in ``training_step``'s output (a tensor or a dict with ``"loss"``), or None."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    return None


class InstabilityController(Callback):
    r"""Scale the learning rate so a stability ratio stays in a band or at a target; never wreck the run.

    The ratio is a gauge over the threshold of the optimizer in use at the effective lr: with
    ``gauge="sharpness"`` the monitor's ``rpe/stability_ratio`` (``lambda_max * lr / 2`` for plain
    GD, the preconditioned sharpness for the Adam family), with ``gauge="batch_sharpness"`` its
    ``rpe/batch_sharpness_ratio`` (the batch sharpness of Andreyev & Beneventano, arXiv 2412.20553,
    over the same threshold). ``"auto"`` (default) steers the batch sharpness under minibatch SGD
    (with or without momentum) when the monitor measures it, and the sharpness otherwise (full-batch
    GD, the Adam family): :func:`lightning_rpe.control.resolve_gauge`. Without ``target_ratio`` and
    ``band`` the band is the steered gauge's default, :data:`lightning_rpe.control.DEFAULT_BANDS`
    (sharpness ``(1.1, 1.5)``, batch sharpness ``(0.7, 1.1)``).

    Args:
        target_ratio: ratio to steer to after every measurement (> 0).
        band: ``(low, high)`` with ``0 < low < high``; the factor is left alone while the predicted
            ratio is inside (None with ``target_ratio`` None: the gauge's default band).
        band_goal: where a reading outside the band is steered: ``"center"`` (the geometric centre
            ``sqrt(low * high)``), ``"edge"`` (the crossed edge: minimal change), ``"cautious"``
            (the lower edge from below, the centre from above) or ``"auto"`` (default: the steered
            gauge's, :data:`lightning_rpe.control.DEFAULT_BAND_GOALS`: ``"cautious"`` for the batch
            sharpness, ``"center"`` for the sharpness).
        gauge: ``"sharpness"``, ``"batch_sharpness"`` or ``"auto"`` (above). ``"batch_sharpness"``
            needs ``SharpnessMonitor(batch_sharpness=...)``.
        max_change: largest factor change per decision (> 1, default 1.5), except the rises of
            ``approach="jump"``.
        approach: ``"jump"`` (default): a rise whose projected ratio stays at or below the band's
            lower edge (``target_ratio``) is taken in one decision, however large, unless the
            scheduled lr rose since the previous reading (a warm-up); ``"gradual"``:
            every rise is bounded by ``max_change``. At fixed weights the ratio is proportional to the
            lr, so such a rise cannot by itself cross the band.
        max_factor: bound on the total factor, ``1 / max_factor <= f <= max_factor`` (a float >= 1,
            None: unbounded, or ``"auto"``, default: the steered gauge's,
            :data:`lightning_rpe.control.DEFAULT_MAX_FACTORS`: 16 for the batch sharpness under
            plain SGD, 4 for the sharpness, which does not see minibatch SGD's instability, and 4
            under SGD with momentum).
        adam_max_factor: the bound for the Adam family (Adam, AdamW, ClippedAdam; >= 1, default 1:
            the controller only lowers their lr; None: ``max_factor``). Measured: raising Adam's lr
            did not raise its preconditioned ratio (Adam adapts ``P``) but spiked the loss.
        min_lr, max_lr: bounds on every controlled group's effective rate, enforced at every step
            (``max_lr`` wins when they conflict; a scheduled rate of exactly 0 stays 0).
        smoothing: EMA coefficient ``beta`` in ``[0, 1)`` of the measured curvature.
        warmup_steps: optimizer steps after ``start_step`` during which the controller only
            observes (factor 1; default 100).
        start_step: first optimizer step the controller takes part in.
        stop_step: first optimizer step it no longer controls (None: never stops), or a float in
            ``(0, 1)``: that fraction of the run's optimizer steps (``trainer.estimated_stepping_batches``;
            never stops when the run has no known length). ``stop_step=0.9`` with ``after_stop="reset"``
            trains the last 10 % at the scheduled lr (measured: it kept minibatch runs within their
            uncontrolled twins' accuracy, examples/README.md).
        after_stop: ``"reset"`` (factor 1 from ``stop_step`` on, default) or ``"hold"``.
        param_groups: indices of the param groups to scale (None: all). A strict subset steers
            their own stability ratio (``Measurement.controlled_ratio``, ``lambda_max(S_C^1/2 H S_C^1/2)``
            with the other groups' steps set to 0, which the factor scales exactly; with the batch-sharpness
            gauge the joint quotient, with a warning); refused on a sharded model.
        initial_factor: factor at the first controlled step (> 0).
        spike_factor: divergence guard: a training loss above ``spike_factor`` times the median of
            the last ``spike_window`` losses rolls back (> 1, default 4; None: only a non-finite
            loss does).
        spike_window: number of recent losses the spike test compares with (>= 2, default 20).
        rollback_factor: the factor is multiplied by this at a rollback (in (0, 1), default 0.5).
        hold_steps: after a rollback the factor may not rise for this many steps (default 100).
        log: log ``rpe/lr_scale``, ``rpe/lr`` and ``rpe/rollbacks`` every step and
            ``rpe/controller_ratio`` with the goal at every decision.
        enabled: ``False``: the callback registers nothing, keeps no state, and training is
            bit-identical to a run without it.

    Raises:
        ValueError: an invalid option (naming it and the accepted values); at setup, no or several
            monitors, or a batch-sharpness gauge with a monitor that does not measure it.
    """

    def __init__(
        self,
        target_ratio: float | None = None,
        band: tuple[float, float] | None = None,
        *,
        band_goal: BandGoal = "auto",
        approach: Approach = "jump",
        gauge: Gauge = "auto",
        max_change: float = 1.5,
        max_factor: float | Literal["auto"] | None = "auto",
        adam_max_factor: float | None = 1.0,
        min_lr: float | None = None,
        max_lr: float | None = None,
        smoothing: float = 0.0,
        warmup_steps: int = 100,
        start_step: int = 0,
        stop_step: int | float | None = None,
        after_stop: AfterStop = "reset",
        param_groups: Sequence[int] | None = None,
        initial_factor: float = 1.0,
        spike_factor: float | None = 4.0,
        spike_window: int = 20,
        rollback_factor: float = 0.5,
        hold_steps: int = 100,
        log: bool = True,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.settings = ControlSettings(
            target_ratio=target_ratio, band=band, band_goal=band_goal, approach=approach, gauge=gauge,
            max_change=max_change,
            max_factor=max_factor, adam_max_factor=adam_max_factor, min_lr=min_lr, max_lr=max_lr,
            smoothing=smoothing, warmup_steps=warmup_steps,
            start_step=start_step, stop_step=stop_step, after_stop=after_stop,
            param_groups=None if param_groups is None else param_groups,  # type: ignore[arg-type]
            initial_factor=initial_factor, spike_factor=spike_factor, spike_window=spike_window,
            rollback_factor=rollback_factor, hold_steps=hold_steps, enabled=enabled,
        )
        if not isinstance(log, bool):
            raise ValueError(f"InstabilityController: log must be True or False, got {log!r}")  # noqa: TRY004
        self.log = log
        self.state = ControlState(factor=self.settings.initial_factor)
        self._warned_out_of_reach = False
        self._law = self.settings  # the settings for the optimizer in use (see ControlSettings.for_optimizer)
        # runtime only
        self.active_gauge: str | None = None  # what "auto" resolved to at train start
        self.snapshot_bytes: int | None = None  # host memory of the rollback snapshot
        self._snapshot: tuple[dict[str, Any], list[dict[Any, Any]]] | None = None
        self._candidate: tuple[dict[str, Any], list[dict[Any, Any]]] | None = None
        self._snapshot_due = False
        self._monitor: SharpnessMonitor | None = None
        self._trainer: pl.Trainer | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list[RemovableHandle] = []
        self._pending: list[tuple[int, Any, Any]] | None = None
        self._step_factors: list[float] | None = None
        self._applied: tuple[int, float, tuple[float, ...]] | None = None
        self._logged_step: int | None = None
        self._step_at_batch_start: int | None = None
        self._prefix = "rpe/"

    # ------------------------------------------------------------------ options and state
    def __getattr__(self, name: str) -> Any:
        # options read through the settings (controller.band, controller.max_change, ...) and the
        # state's fields (controller.factor, controller.n_decisions, ...)
        if name in ("settings", "state"):
            raise AttributeError(name)
        if name in _STATE_ATTRS:
            return getattr(self.state, name)
        settings = self.__dict__.get("_law") or self.__dict__.get("settings")  # effective settings
        if settings is not None and hasattr(settings, name):
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def enabled(self) -> bool:
        """False: a no-op callback."""
        return self.settings.enabled

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict() if self.enabled else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.enabled and state_dict:
            self.state = ControlState.from_state_dict(state_dict)

    def reset(self) -> None:
        """Forget everything learnt in a previous fit (called at the start of every fresh fit)."""
        self.state = ControlState(factor=self.settings.initial_factor)
        self._warned_out_of_reach = False
        self._snapshot = self._candidate = None
        self._snapshot_due = False
        self.snapshot_bytes = None
        self._applied = self._pending = None
        self._step_factors = None
        self._logged_step = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessMonitor)]  # type: ignore[attr-defined]
        if not monitors:
            raise ValueError(
                "InstabilityController needs a SharpnessMonitor in the same Trainer: add "
                "lightning_rpe.SharpnessMonitor(...) to Trainer(callbacks=[...]) (for example "
                "SharpnessMonitor(every_n_steps=10)), or set InstabilityController(enabled=False)"
            )
        if len(monitors) > 1:
            raise ValueError(
                f"InstabilityController follows exactly one SharpnessMonitor, found {len(monitors)} in "
                "Trainer(callbacks=[...]); keep one SharpnessMonitor when the controller is enabled"
            )
        monitor = monitors[0]
        provider = getattr(monitor, "lr_scale_provider", None)
        if provider is not None and getattr(provider, "__self__", None) is not self:
            raise ValueError(
                "the SharpnessMonitor already has an lr_scale_provider (another InstabilityController?); "
                "use one InstabilityController per Trainer"
            )
        self._monitor = monitor
        self._trainer = trainer
        self._prefix = str(getattr(monitor, "prefix", "rpe/"))
        monitor.lr_scale_provider = self.lr_scales
        listeners = getattr(monitor, "listeners", None)
        if isinstance(listeners, list) and self.on_measurement not in listeners:
            listeners.append(self.on_measurement)
        if trainer.global_step == 0:  # a fresh fit (a checkpoint, if any, is loaded after setup)
            self.reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if self._monitor is None:  # setup not called for "fit" (should not happen)
            self.setup(trainer, pl_module, "fit")
        optimizers = trainer.optimizers
        if not optimizers:
            raise ValueError("InstabilityController needs an optimizer: configure_optimizers returned none")
        if len(optimizers) > 1:
            rank_zero_warn(
                f"InstabilityController controls the first of {len(optimizers)} optimizers only "
                "(the one the SharpnessMonitor's thresholds refer to)"
            )
        optimizer = optimizers[0]
        n_groups = len(optimizer.param_groups)
        groups = self.settings.param_groups
        if groups is not None and max(groups) >= n_groups:
            raise ValueError(
                f"InstabilityController: param_groups must be indices in [0, {n_groups - 1}] for this optimizer "
                f"({n_groups} param groups), got {list(groups)}"
            )
        kinds = group_thresholds(optimizer)
        adam_family = any(g.preconditioned for g in kinds)
        controlled = self.settings.controlled(n_groups)
        assert self._monitor is not None
        # a strict subset: steer the controlled groups' own ratio, which the factor scales exactly
        subset = tuple(sorted(set(controlled))) if set(controlled) != set(range(n_groups)) else None
        if subset is not None and getattr(self._monitor, "sharded", False):
            raise ValueError(
                f"InstabilityController: param_groups={list(subset)} is a subset of the optimizer's "
                f"{n_groups} param groups, whose own stability ratio the monitor does not compute on a sharded "
                "model (docs/sharded.md); control every group (param_groups=None) there"
            )
        self._monitor.controlled_groups = subset
        momentum = any(g.kind in ("heavy_ball", "nesterov") for g in kinds if g.index in controlled)  # per group
        self._law = self.settings.for_optimizer(adam_family, momentum).for_run(_total_steps(trainer))
        if isinstance(self.settings.stop_step, float) and self._law.stop_step is None:
            rank_zero_warn(
                f"InstabilityController: stop_step={self.settings.stop_step:g} is a fraction of the run's optimizer "
                "steps, and this run has no known length (trainer.estimated_stepping_batches is infinite: max_steps=-1 "
                "with max_epochs=-1 or max_time, or a loader without a length), so the controller will not stop; give "
                "stop_step as a step index, or bound the run with max_steps/max_epochs"
            )
        stop, active_from = self._law.stop_step, self._law.start_step + self._law.warmup_steps
        if stop is not None and stop <= active_from:
            rank_zero_warn(
                f"InstabilityController: stop_step is step {stop}, not after the warm-up (start_step + warmup_steps = "
                f"{active_from}), so it will not change the lr in this run; lower warmup_steps or raise stop_step"
            )
        self.active_gauge = None  # chosen once the training data is set up (_choose_gauge)
        if len(self.state.smoothed) != n_groups:
            self.state.smoothed = (self.state.smoothed + [None] * n_groups)[:n_groups]
        self._remove_hooks()
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def _choose_gauge(self, trainer: pl.Trainer) -> None:
        """Resolve ``gauge="auto"`` and the default band, at train start or at the monitor's first
        measurement, whichever comes first (both after the training data is set up).
        """
        if self.active_gauge is not None:
            return
        batches = float(getattr(trainer, "num_training_batches", 0) or 0)
        # one optimizer step per epoch over all the data (also with gradient accumulation)
        full_batch = 0 < batches <= max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        measured = bool(getattr(self._monitor, "measures_batch_sharpness",
                                getattr(self._monitor, "batch_sharpness", False)))
        self.active_gauge = control.resolve_gauge(
            self.settings.gauge, full_batch=full_batch, adam_family=self._law.adam_family,
            batch_sharpness_measured=measured,
        )
        if self.active_gauge == "batch_sharpness" and not measured:
            raise ValueError(
                "InstabilityController(gauge='batch_sharpness') steers the batch sharpness, which this "
                "SharpnessMonitor does not measure (not requested, or a sharded model, where it is not computed): "
                "set SharpnessMonitor(batch_sharpness=True) on an unsharded model, or "
                "InstabilityController(gauge='sharpness')"
            )
        self._law = self._law.with_goal_for(self.active_gauge)
        if (self.active_gauge == "batch_sharpness" and self._monitor is not None
                and getattr(self._monitor, "controlled_groups", None) is not None):
            self._monitor.controlled_groups = None  # not steered: spare the monitor its extra solve
            rank_zero_warn(
                "InstabilityController: param_groups is a subset of the optimizer's groups, and the batch sharpness "
                "is one quotient along the whole step, which the other groups' lrs also set: scaling the controlled "
                "groups moves it less than in proportion, so the band may be out of reach; gauge='sharpness' steers "
                "the controlled groups' own ratio (rpe/controlled_ratio), which the factor scales exactly"
            )
        if self.settings.gauge == "auto" and not (full_batch or self._law.adam_family or measured):
            requested = bool(getattr(getattr(self._monitor, "settings", None), "batch_sharpness", 0))
            rank_zero_info(
                "InstabilityController: minibatch SGD on a sharded model, where the batch sharpness is not computed, "
                "so gauge='auto' steers the sharpness (docs/sharded.md)" if requested else
                "InstabilityController: minibatch SGD without a batch-sharpness measurement, so gauge='auto' "
                "steers the sharpness; SharpnessMonitor(batch_sharpness=True) lets it steer the batch sharpness, "
                "the quantity at the edge under minibatch SGD (docs/controller.md)"
            )
        band, low = self._law.band, self._law.low_goal
        if self.active_gauge == "batch_sharpness" and low is not None and low > 1.0 and not full_batch:
            given = f"band={band}" if band is not None else f"target_ratio={low:g}"
            rank_zero_warn(
                f"InstabilityController: {given} asks the batch sharpness to stay above its stability threshold; "
                "under minibatch SGD it does not rise above it (the edge of stochastic stability), so the controller "
                "will raise the lr to its bound: use a band around 1 (default "
                f"{control.DEFAULT_BANDS['batch_sharpness']} without band/target_ratio), or gauge='sharpness'"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or self._monitor is None:
            return
        self._choose_gauge(trainer)
        self._snapshot_due = True
        if self.log and getattr(self._monitor, "custom_scalars", False):
            _logging.add_custom_scalars(trainer, self.layout())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._cleanup()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        self._restore_pending()
        self._remove_hooks()
        monitor = self._monitor
        if monitor is not None:
            if getattr(monitor.lr_scale_provider, "__self__", None) is self:
                monitor.lr_scale_provider = None
                monitor.controlled_groups = None
            listeners = getattr(monitor, "listeners", None)
            if isinstance(listeners, list) and self.on_measurement in listeners:
                listeners.remove(self.on_measurement)
        self._monitor = None
        self._trainer = None
        self._optimizer = None
        self._snapshot = self._candidate = None

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ factors and step hooks
    def _scheduled(self) -> list[float]:
        assert self._optimizer is not None
        return [float(g["lr"]) for g in self._optimizer.param_groups]

    def lr_scales(self) -> list[float]:
        """Per param group factor the next optimizer step uses (1.0 for groups not controlled).

        This is the ``SharpnessMonitor.lr_scale_provider``: the monitor's thresholds use the
        effective rate ``param_group["lr"] * lr_scales()[i]``.
        """
        if not self.enabled or self._optimizer is None or self._trainer is None:
            optimizer = self._optimizer
            if optimizer is None and self._trainer is not None and self._trainer.optimizers:
                optimizer = self._trainer.optimizers[0]
            return [1.0] * (0 if optimizer is None else len(optimizer.param_groups))
        return control.group_factors(self._law, self.state, self._scheduled(), self._trainer.global_step)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore_pending()  # a previous step raised before its post-hook ran
        assert self._trainer is not None
        step = self._trainer.global_step
        factors = control.group_factors(self._law, self.state, self._scheduled(), step)
        pending: list[tuple[int, Any, Any]] = []
        for i, f in enumerate(factors):
            if f == 1.0:
                continue
            group = optimizer.param_groups[i]
            scheduled = group["lr"]
            effective = scheduled * f
            group["lr"] = effective
            pending.append((i, scheduled, effective))
        self._pending = pending
        self._step_factors = factors  # what the spike test asks: did this step run above the schedule
        self._applied = (step, control.factor_at(self._law, self.state, step),
                         tuple(g["lr"] for g in optimizer.param_groups))

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore_pending()

    def _restore_pending(self) -> None:
        if not self._pending or self._optimizer is None:
            self._pending = None
            return
        for i, scheduled, effective in self._pending:
            group = self._optimizer.param_groups[i]
            if group["lr"] is effective:
                group["lr"] = scheduled
            else:
                rank_zero_warn(
                    f"InstabilityController: param group {i}'s lr changed inside optimizer.step "
                    f"(from {effective!r} to {group['lr']!r}); the controller left it as it is"
                )
        self._pending = None

    # ------------------------------------------------------------------ decisions
    def on_measurement(self, trainer: pl.Trainer, measurement: Measurement) -> None:
        """Decide on a new measurement (the monitor's listener, called before it logs).

        Deciding here, the ratio the monitor then logs is the one at the lr the next step uses.
        """
        if self.enabled:
            self._consider(trainer, measurement)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        self._step_at_batch_start = trainer.global_step
        self._poll(trainer)
        if self._snapshot_due and self._candidate is None:
            self._candidate = self._copy_state(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        stepped = self._step_at_batch_start is not None and trainer.global_step > self._step_at_batch_start
        if stepped:
            self._guard(trainer, pl_module, _loss_of(outputs))
        self._poll(trainer)
        if self.log:
            self._log_step(pl_module)

    def _poll(self, trainer: pl.Trainer) -> None:
        """Use ``monitor.latest`` if it is new (a monitor that does not call its listeners)."""
        if self._monitor is not None and self._monitor.latest is not None:
            self._consider(trainer, self._monitor.latest)

    def _reading(self, m: Measurement) -> control.Reading:
        if self.active_gauge == "batch_sharpness":
            # one exact ratio for all groups (the quotient along the step S g_B): scaling every
            # controlled group by f scales it by f
            bs = getattr(m, "batch_sharpness_ratio", None)
            ratios = (math.nan if bs is None else float(bs),) * len(m.thresholds)
        elif self._monitor is not None and self._monitor.controlled_groups is not None:
            # a subset of the groups: their own ratio (the joint one also moves with the others' lrs,
            # so a factor chasing it could fall to its bound without moving it)
            c = m.controlled_ratio
            ratios = (math.nan if c is None or not math.isfinite(c) else float(c),) * len(m.thresholds)
        elif m.stability_ratio is not None and math.isfinite(m.stability_ratio):
            # the exact ratio of the optimizer in use (lambda_max(S^1/2 H S^1/2): right with per-group
            # learning rates); scaling every controlled group by f scales it by f
            ratios = (float(m.stability_ratio),) * len(m.thresholds)
        else:
            ratios = tuple(m.ratios)
        # the sharpness identifies the measurement: the ratios are restated at the new lr after a
        # decision (monitor.latest), and a key that changed with them would decide twice on one measurement
        value = float(m.sharpness)
        return control.Reading(step=int(m.step), key=(int(m.step), int(m.epoch), value), ratios=ratios,
                               thresholds=tuple(m.thresholds), lrs=tuple(m.lrs))

    def _consider(self, trainer: pl.Trainer, m: Measurement) -> None:
        if self._monitor is None or self._optimizer is None:
            return
        self._choose_gauge(trainer)
        reading = self._reading(m)
        last = self.state.last_key
        if last is not None and last[0] == reading.key[0] and last[1] == reading.key[1] and (
            last[2] == reading.key[2] or (math.isnan(last[2]) and math.isnan(reading.key[2]))
        ):
            return
        # decide on rank zero only, then broadcast the whole new state so that ranks cannot drift
        decision: control.Decision | None = None
        if trainer.is_global_zero:
            decision = control.decide(self._law, self.state, reading, self._scheduled(), trainer.global_step)
        decision = trainer.strategy.broadcast(decision, src=0)
        assert decision is not None
        old_factor = self.state.factor
        # rank zero's state, keyed by this rank's measurement (so that no rank reconsiders it alone)
        self.state = replace(decision.state, last_key=reading.key)
        self._say_if_band_out_of_reach(decision, old_factor)
        if decision.used and decision.ratio is not None:
            if self.log:
                self._log_decision(trainer, reading.step, float(decision.ratio))
            self._snapshot_due = True  # keep the state at the next batch whose loss passes the guard
        # an Adam-family ratio before the first step is NaN by construction (no second moment yet)
        expected = self._law.adam_family and reading.step == 0
        if decision.warning and trainer.is_global_zero and not expected:
            rank_zero_warn(decision.warning)

    def _say_if_band_out_of_reach(self, decision: control.Decision, old_factor: float) -> None:
        """Warn once when the ratio stays below the goal because the factor sits at a bound."""
        low = self._law.low_goal
        if self._warned_out_of_reach or low is None or not decision.used or decision.ratio is None:
            return
        new = decision.state.factor
        predicted = decision.ratio * new / old_factor if old_factor > 0 else decision.ratio
        if not decision.changed and new > 1.0 and predicted < 0.999 * low and control.phase(
            self._law, decision.state.last_key[0] if decision.state.last_key else 0
        ) == "active":
            self._warned_out_of_reach = True
            rank_zero_warn(
                f"InstabilityController: the steered ratio ({predicted:.3g}) stays below the goal ({low:g}) with the "
                f"factor at its bound ({new:.3g}: max_factor={self.max_factor}, adam_max_factor={self.adam_max_factor}, "
                f"max_lr={self.max_lr}); raise the bound to reach the band, or accept the ratio reached"
            )

    # ------------------------------------------------------------------ divergence guard
    def _copy_state(self, pl_module: pl.LightningModule) -> tuple[dict[str, Any], list[dict[Any, Any]]] | None:
        """Host copies of the model's state and of the state of **every** optimizer (a GAN's two
        optimizers both step the restored model; their param groups, with the scheduled lrs, are not
        copied).
        """
        if self._optimizer is None or self._trainer is None:
            return None
        states = [_host_copy(opt.state_dict()["state"]) for opt in self._trainer.optimizers]
        return _host_copy(pl_module.state_dict()), states

    def _commit_snapshot(self) -> None:
        """Make the candidate the state a rollback restores, if all its floating-point values are finite.

        The candidate was taken at the start of a batch whose loss then passed the guard.
        """
        candidate, self._candidate = self._candidate, None
        if candidate is None:
            return
        tensors = [t for part in candidate for t in _tensors(part) if t.is_floating_point()]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            return
        self._snapshot = candidate
        self._snapshot_due = False
        size = _nbytes(candidate)
        if self.snapshot_bytes is None or size > self.snapshot_bytes:
            self.snapshot_bytes = size
            rank_zero_info(
                "InstabilityController: the rollback snapshot (model and optimizer state, host memory) "
                f"takes {size} bytes"
            )

    def _guard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: float | None) -> None:
        """Check the loss of the batch that just stepped; roll back when it is non-finite or spikes."""
        alarm = None
        if control.controls(self._law, trainer.global_step - 1):
            # a finite spike rolls back only if the step that produced it ran some group above its
            # scheduled lr (the factors applied in optimizer.step, lr bounds included; an outlier batch at
            # the scheduled lr is not the controller's doing); a non-finite loss always does. Not the
            # factor now: a decision on this batch's measurement may have changed it already
            above = self._step_factors is not None and max(self._step_factors, default=1.0) > 1.0
            alarm = None if loss is None else control.loss_alarm(self._law, self.state.losses, loss, spikes=above)
            if trainer.world_size > 1:  # every rank rolls back when any rank sees a bad loss
                flag = torch.tensor(0.0 if alarm is None else 1.0, device=pl_module.device)
                flag = trainer.strategy.reduce(flag, reduce_op="sum")
                if float(flag) > 0 and alarm is None:
                    alarm = "a non-finite or spiking training loss on another process"
        if alarm is not None:
            self._candidate = None
            self._rollback(trainer, pl_module, alarm)
            return
        if loss is not None and math.isfinite(loss):
            control.record_loss(self._law, self.state, loss)
        self._commit_snapshot()

    def _rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        old = self.state.factor
        self.state = control.after_rollback(self._law, self.state, trainer.global_step)
        restored = self._snapshot is not None and self._optimizer is not None
        if restored:
            assert self._snapshot is not None and self._optimizer is not None
            model_state, optim_states = self._snapshot
            pl_module.load_state_dict(model_state)
            for optimizer, optim_state in zip(trainer.optimizers, optim_states):
                current = optimizer.state_dict()
                current["state"] = optim_state
                optimizer.load_state_dict(current)  # keeps the scheduled lrs (param_groups) as they are
        rank_zero_warn(
            f"InstabilityController: {reason} at step {trainer.global_step}: "
            + ("rolled the model and optimizer state back to the last good state, " if restored else "")
            + f"factor {old:.4g} -> {self.state.factor:.4g}, no increase before step {self.state.hold_until} "
            f"(rollback {self.state.n_rollbacks})"
        )
        if self.log:
            self._log(pl_module, f"{self._prefix}rollbacks", self.state.n_rollbacks)

    # ------------------------------------------------------------------ logging
    def _log_step(self, pl_module: pl.LightningModule) -> None:
        p = self._prefix
        if self._applied is not None and self._applied[0] != self._logged_step:
            step, factor, lrs = self._applied
            self._logged_step = step
            self._log(pl_module, f"{p}lr_scale", factor)
            self._log(pl_module, f"{p}rollbacks", self.state.n_rollbacks)
            if len(lrs) == 1:
                self._log(pl_module, f"{p}lr", lrs[0])
            else:  # the monitor's per-group suffix: pg1 is param group 0
                for i, lr in enumerate(lrs, start=1):
                    self._log(pl_module, f"{p}lr/pg{i}", lr)

    def _log_decision(self, trainer: pl.Trainer, x: int, ratio: float) -> None:
        """Write one decision's ratio and goal once, at the x of the measurement it decided on.

        Written to the loggers directly (as the monitor writes its measurements): a value given to
        ``pl_module.log(on_step=True)`` is written again at every later logging step of the epoch,
        which drew decisions where none was taken.
        """
        p, law = self._prefix, self._law
        values = {f"{p}controller_ratio": ratio}
        if law.target_ratio is not None:
            values[f"{p}target_ratio"] = law.target_ratio
        elif law.band is not None:
            values[f"{p}band_low"], values[f"{p}band_high"] = law.band
        _logging.publish_callback_metrics(trainer, values)
        _logging.log_to_loggers(trainer, values, step=x)

    @staticmethod
    def _log(pl_module: pl.LightningModule, name: str, value: Any) -> None:
        pl_module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)

    def layout(self) -> dict[str, dict[str, list[str]]]:
        """TensorBoard custom-scalars category of the controller (anchored tag regexes)."""
        p = self._prefix
        return {
            f"{p}controller".rstrip("/"): {
                "stability ratio and its goal": [
                    f"^{re.escape(p)}(batch_sharpness_ratio|stability_ratio|controlled_ratio)$",
                    _logging.tag_regex(f"{p}controller_ratio", f"{p}target_ratio", f"{p}band_low", f"{p}band_high"),
                ],
                "lr scale (controller factor)": [_logging.tag_regex(f"{p}lr_scale", f"{p}rollbacks")],
                "effective lr (inside optimizer.step)": [f"^{re.escape(p)}lr(/pg[0-9]+)?$"],
            }
        }

    def __repr__(self) -> str:
        s, law = self.settings, self._law  # the effective band once a fit resolved the default
        if s.target_ratio is not None:
            goal = f"target_ratio={s.target_ratio}"
        else:
            goal = f"band={law.band}" if law.band is not None else "band=None (the gauge's default)"
        return (f"{type(self).__name__}({goal}, gauge={s.gauge!r}, band_goal={law.band_goal!r}, "
                f"max_change={s.max_change}, max_factor={law.max_factor!r}, enabled={s.enabled})")
