"""The InstabilityController's control law: settings, state and one pure decision per measurement.

Nothing here imports Lightning: :class:`ControlSettings` validates the options,
:class:`ControlState` holds what changes during training (and round-trips through a checkpoint as
plain Python types), :func:`decide` maps ``(settings, state, reading, scheduled lrs, step)`` to a
:class:`Decision` carrying the new state, and :func:`loss_alarm` / :func:`after_rollback` are the
divergence guard's law. The callback (:mod:`lightning_rpe.callbacks.instability_controller`) only
applies decisions: it scales the lr inside ``optimizer.step``, keeps the snapshot to roll back to,
and does the DDP plumbing.

Update rule (derivation). For each controlled param group ``i`` a reading gives the ratio ``r_i``
of the gauge (a curvature ``c_i``) to the threshold ``T_i`` of the optimizer at the effective rate
``lr_i`` it used. Every supported threshold is proportional to ``1 / lr`` (``2 / lr`` for GD,
``(2 + 2 beta) / lr`` for heavy ball, ``(2 + 2 beta1) / ((1 - beta1) lr)`` for Adam; see
:mod:`lightning_rpe.stability`), so ``c_i = r_i T_i`` and ``K_i = T_i lr_i`` is a constant of the
optimizer. With ``c_i`` smoothed by an exponential moving average and ``s_i`` the scheduled rate
now, the ratio at factor 1 is ``rho_i = c_i s_i / K_i``; at factor ``f`` it is ``f rho`` with
``rho = max_i rho_i`` (the least stable controlled group). Then

    f <- f * clamp(goal / (rho f), 1 / max_change, max_change)

followed by ``1 / max_factor <= f <= max_factor`` and ``min_lr <= s_i f <= max_lr`` (``max_lr``
wins). ``goal`` is ``target_ratio``; in band mode there is no change while
``low <= rho f <= high``, else the band's geometric centre (``band_goal="center"``), the crossed
edge (``"edge"``), or the lower edge from below and the centre from above (``"cautious"``). With
``approach="jump"`` the upper clamp ``max_change`` is lifted to ``low / (rho f)`` when
that is larger: a rise that puts the ratio at or below the lower edge (``target_ratio``) is taken
in one decision. At fixed weights the ratio is proportional to the lr, so such a rise cannot by
itself cross the band; bounding it would only spend measurements on the way up (five at 1.5 per
decision from a ratio of 0.1 to 0.7). A scheduled lr that rose since the previous reading (a
warm-up) would carry such a rise past the band before the next reading, so then every rise is
bounded by ``max_change``. For ``hold_steps`` steps after a rollback the factor may fall
but not rise, and after a rollback it never rises above one ``max_change`` below the factor that
diverged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from lightning_rpe.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    fail,
)

__all__ = [
    "AfterStop",
    "Approach",
    "BandGoal",
    "ControlSettings",
    "ControlState",
    "DEFAULT_BANDS",
    "DEFAULT_BAND_GOALS",
    "DEFAULT_MAX_FACTORS",
    "Decision",
    "Gauge",
    "Phase",
    "Reading",
    "after_rollback",
    "controls",
    "decide",
    "factor_at",
    "group_factors",
    "loss_alarm",
    "phase",
    "record_loss",
    "resolve_gauge",
]

Gauge = Literal["sharpness", "batch_sharpness", "auto"]
BandGoal = Literal["center", "edge", "cautious", "auto"]
Approach = Literal["jump", "gradual"]
AfterStop = Literal["reset", "hold"]
Phase = Literal["before", "warmup", "active", "after"]

_OWNER = "InstabilityController"

DEFAULT_BANDS: dict[str, tuple[float, float]] = {"sharpness": (1.1, 1.5), "batch_sharpness": (0.7, 1.1)}
"""The band used when neither ``target_ratio`` nor ``band`` is given, per gauge steered (chosen by
measurement: examples/README.md, "Controller under minibatch SGD, momentum and Adam").
``"sharpness"``: just above the edge of stability of full-batch GD, where ``lambda_max lr / 2``
settles at 1.0-1.1 by itself; ``"batch_sharpness"``: at the edge of stochastic stability
(``BS lr / 2 = 1``, Andreyev & Beneventano, arXiv 2412.20553), which the batch sharpness does not
exceed under minibatch SGD: with the lr raised it levelled off at 0.76-0.92 of it on the digits MLP."""

DEFAULT_BAND_GOALS: dict[str, BandGoal] = {"sharpness": "center", "batch_sharpness": "cautious"}
"""``band_goal="auto"`` per gauge steered (measured as :data:`DEFAULT_BANDS`). The batch sharpness
stops following the lr just inside its band and then jumps (a raise to the band's centre from just
below it diverged at batch 16), so below the band it is raised only to the lower edge
(``"cautious"``); the sharpness under full-batch GD settles near 1.0-1.1 whatever the lr, so it
is steered to the centre (``"cautious"`` held it in ``(1.1, 1.5)`` 59-82 % of the time, the centre
82-94 %)."""

DEFAULT_MAX_FACTORS: dict[str, float] = {"sharpness": 4.0, "batch_sharpness": 16.0, "momentum": 4.0}
"""``max_factor="auto"``: the bound for the steered gauge (``"sharpness"``, ``"batch_sharpness"``),
and ``"momentum"`` for any gauge under SGD with momentum (and for the Adam family, whose rises
``max_factor`` bounds only with ``adam_max_factor=None``). The batch sharpness sees plain minibatch
SGD's instability (it reaches its threshold at the edge), so its bound only has to let a scheduled
lr far below the edge reach it (factors 8-15 on the digits MLP at lr 0.025-0.05). Where the gauge
does not see the instability the bound is what protects the run: the sharpness under minibatch SGD
(``lambda_max`` stays below ``2 / lr`` at small batches while SGD diverges) and SGD with momentum
0.9 (the loss spiked at 16x with the batch-sharpness ratio at 0.3-0.5 of its heavy-ball threshold;
stable at 4x and 10.7x)."""

STATE_VERSION = 2


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{_OWNER}: {message}")


@dataclass(frozen=True)
class ControlSettings:
    """Validated options of the control law (see :class:`~lightning_rpe.InstabilityController`).

    Raises ``ValueError`` naming ``InstabilityController``, the option and the accepted values.
    ``band`` is stored as a tuple of floats and ``param_groups`` as a tuple of ints (lists, as YAML
    gives them, are accepted). ``adam_family`` and ``momentum`` are not options: :meth:`for_optimizer` sets them for
    the optimizer in use.
    """

    target_ratio: float | None = None
    band: tuple[float, float] | None = None
    band_goal: BandGoal = "auto"
    approach: Approach = "jump"
    gauge: Gauge = "auto"
    max_change: float = 1.5
    max_factor: float | Literal["auto"] | None = "auto"
    adam_max_factor: float | None = 1.0
    min_lr: float | None = None
    max_lr: float | None = None
    smoothing: float = 0.0
    warmup_steps: int = 100
    start_step: int = 0
    stop_step: int | float | None = None
    after_stop: AfterStop = "reset"
    param_groups: tuple[int, ...] | None = None
    initial_factor: float = 1.0
    spike_factor: float | None = 4.0
    spike_window: int = 20
    rollback_factor: float = 0.5
    hold_steps: int = 100
    enabled: bool = True
    adam_family: bool = False
    momentum: bool = False

    def __post_init__(self) -> None:
        o, put = _OWNER, object.__setattr__
        check_bool(o, "enabled", self.enabled)
        _check(
            self.target_ratio is None or self.band is None,
            "give either target_ratio (a float > 0) or band ((low, high)), not both",
        )
        put(self, "target_ratio", check_float(o, "target_ratio", self.target_ratio, minimum=0.0, inclusive=False,
                                              allow_none=True))
        if self.band is not None:
            try:
                low, high = self.band
                band = (check_float(o, "band", low, minimum=0.0, inclusive=False),
                        check_float(o, "band", high, minimum=0.0, inclusive=False))
            except (TypeError, ValueError):
                band = None
            if band is None or not band[0] < band[1]:  # type: ignore[operator]
                raise fail(o, "band", "(low, high) with 0 < low < high", self.band)
            put(self, "band", band)
        check_choice(o, "band_goal", self.band_goal, get_args(BandGoal))
        check_choice(o, "approach", self.approach, get_args(Approach))
        check_choice(o, "gauge", self.gauge, get_args(Gauge))
        check_choice(o, "after_stop", self.after_stop, get_args(AfterStop))
        put(self, "max_change", check_float(o, "max_change", self.max_change, minimum=1.0, inclusive=False))
        if self.max_factor != "auto":
            try:
                put(self, "max_factor", check_float(o, "max_factor", self.max_factor, minimum=1.0, allow_none=True))
            except ValueError:
                raise fail(o, "max_factor", '"auto", None (unbounded) or a float >= 1', self.max_factor) from None
        put(self, "adam_max_factor", check_float(o, "adam_max_factor", self.adam_max_factor, minimum=1.0,
                                                 allow_none=True))
        for name in ("min_lr", "max_lr"):
            put(self, name, check_float(o, name, getattr(self, name), minimum=0.0, allow_none=True))
        if self.min_lr is not None and self.max_lr is not None:
            _check(
                self.min_lr <= self.max_lr,
                f"min_lr must be <= max_lr, got min_lr={self.min_lr!r}, max_lr={self.max_lr!r}",
            )
        smoothing = check_float(o, "smoothing", self.smoothing, minimum=0.0, maximum=1.0)
        if smoothing == 1.0:
            raise fail(o, "smoothing", "a float in [0, 1)", self.smoothing)
        put(self, "smoothing", smoothing)
        for name in ("warmup_steps", "start_step", "hold_steps"):
            check_int(o, name, getattr(self, name), minimum=0)
        stop = self.stop_step
        if not (stop is None or (isinstance(stop, float) and math.isfinite(stop) and 0.0 < stop < 1.0)
                or (isinstance(stop, int) and not isinstance(stop, bool) and stop > self.start_step)):
            raise fail(o, "stop_step", f"None, an int > start_step ({self.start_step}), or a float in (0, 1) (a "
                       "fraction of the run's optimizer steps)", stop)
        if self.param_groups is not None:
            try:
                groups = tuple(self.param_groups)
            except TypeError:
                groups = ()
            if not (groups and all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in groups)
                    and len(set(groups)) == len(groups)):
                raise fail(o, "param_groups", "None (all groups) or a non-empty list of distinct group indices >= 0",
                           self.param_groups)
            put(self, "param_groups", groups)
        put(self, "initial_factor", check_float(o, "initial_factor", self.initial_factor, minimum=0.0, inclusive=False))
        put(self, "spike_factor", check_float(o, "spike_factor", self.spike_factor, minimum=1.0, inclusive=False,
                                              allow_none=True))
        check_int(o, "spike_window", self.spike_window, minimum=2)
        check_bool(o, "adam_family", self.adam_family)
        check_bool(o, "momentum", self.momentum)
        put(self, "rollback_factor", check_float(o, "rollback_factor", self.rollback_factor, minimum=0.0, maximum=1.0,
                                                 inclusive=False))

    def for_optimizer(self, adam_family: bool, momentum: bool = False) -> ControlSettings:
        """The settings the law uses for an optimizer (``adam_family``: Adam, AdamW, ClippedAdam;
        ``momentum``: SGD with momentum or Nesterov in a controlled group).

        For the Adam family the factor may not rise above ``adam_max_factor`` (the lower bound
        stays ``1 / max_factor``); with momentum ``max_factor="auto"`` resolves to
        ``DEFAULT_MAX_FACTORS["momentum"]``.
        """
        if (adam_family, momentum) == (self.adam_family, self.momentum):
            return self
        return replace(self, adam_family=adam_family, momentum=momentum)

    def for_run(self, total_steps: int | None) -> ControlSettings:
        """The settings with a fractional ``stop_step`` turned into a step index.

        ``stop_step = f`` in (0, 1) becomes ``max(start_step + 1, round(f * total_steps))``; without a
        known length (``total_steps`` None or not finite) the controller never stops. An int
        ``stop_step`` is returned unchanged.
        """
        if not isinstance(self.stop_step, float):
            return self
        if total_steps is None or total_steps <= 0:
            return replace(self, stop_step=None)
        return replace(self, stop_step=max(self.start_step + 1, round(self.stop_step * total_steps)))

    def with_goal_for(self, gauge: Literal["sharpness", "batch_sharpness"]) -> ControlSettings:
        """The settings with the defaults of the steered ``gauge`` filled in: the band
        (:data:`DEFAULT_BANDS`, when neither ``target_ratio`` nor ``band`` was given), ``band_goal="auto"``
        (:data:`DEFAULT_BAND_GOALS`) and ``max_factor="auto"`` (:data:`DEFAULT_MAX_FACTORS`: the
        gauge's, or ``"momentum"`` when :meth:`for_optimizer` saw momentum or the Adam family).
        """
        out = self
        if out.target_ratio is None and out.band is None:
            out = replace(out, band=DEFAULT_BANDS[gauge])
        if out.band_goal == "auto":
            out = replace(out, band_goal=DEFAULT_BAND_GOALS[gauge])
        if out.max_factor == "auto":
            # 16 is for plain SGD only: the Adam family (with adam_max_factor=None) takes the bound of momentum
            plain = not (out.momentum or out.adam_family)
            out = replace(out, max_factor=DEFAULT_MAX_FACTORS[gauge if plain else "momentum"])
        return out

    def _resolved(self) -> None:
        if self.max_factor == "auto" or self.band_goal == "auto":
            raise ValueError(f"{_OWNER}: max_factor/band_goal 'auto' must be resolved with "
                             "ControlSettings.with_goal_for(gauge) first")

    @property
    def low_goal(self) -> float | None:
        """The lowest ratio the goal accepts: the band's lower edge, or ``target_ratio`` (None if neither)."""
        return self.band[0] if self.band is not None else self.target_ratio

    def factor_bounds(self) -> tuple[float, float]:
        """``(lowest, highest)`` total factor.

        ``1 / max_factor`` and ``max_factor``, the latter at most ``adam_max_factor`` for the Adam
        family (0 and inf when unbounded).

        Raises:
            ValueError: ``max_factor="auto"`` not yet resolved (:meth:`with_goal_for`).
        """
        self._resolved()
        bound = self.max_factor
        assert not isinstance(bound, str)
        lo = 0.0 if bound is None else 1.0 / bound
        hi = math.inf if bound is None else bound
        if self.adam_family and self.adam_max_factor is not None:
            hi = min(hi, self.adam_max_factor)
        return lo, hi

    def controlled(self, n_groups: int) -> tuple[int, ...]:
        """Indices of the controlled param groups of an optimizer with ``n_groups`` groups."""
        return tuple(range(n_groups)) if self.param_groups is None else self.param_groups


@dataclass
class ControlState:
    """What the control law changes during training (checkpointed as plain Python types).

    Attributes:
        factor: the lr factor of the controlled phase.
        smoothed: per param group the (EMA of the) curvature ``c_i`` (1 / lr units), or None.
        n_measurements, n_decisions, n_skipped, n_rollbacks: counters (readings used, readings
            that changed the factor, readings skipped, rollbacks).
        last_ratio: the predicted ratio at the last used reading, before its decision.
        last_key: identity ``(step, epoch, value)`` of the last reading considered.
        hold_until: no factor increase before this optimizer step (set by a rollback).
        ceiling: the factor never rises above this again (set by a rollback: one ``max_change``
            below the factor that diverged), or None.
        losses: the recent finite training losses (at most ``spike_window``).
        last_scheduled: per param group the scheduled lr at the last used reading (None before
            one): a schedule that rose since then (a warm-up) takes no ``approach="jump"`` rise.
    """

    factor: float = 1.0
    smoothed: list[float | None] = field(default_factory=list)
    n_measurements: int = 0
    n_decisions: int = 0
    n_skipped: int = 0
    n_rollbacks: int = 0
    last_ratio: float | None = None
    last_key: tuple[int, int, float] | None = None
    hold_until: int = -1
    ceiling: float | None = None
    losses: list[float] = field(default_factory=list)
    last_scheduled: list[float] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "version": STATE_VERSION,
            "factor": float(self.factor),
            "smoothed": [None if c is None else float(c) for c in self.smoothed],
            "n_measurements": int(self.n_measurements),
            "n_decisions": int(self.n_decisions),
            "n_skipped": int(self.n_skipped),
            "n_rollbacks": int(self.n_rollbacks),
            "last_ratio": None if self.last_ratio is None else float(self.last_ratio),
            "last_key": None if self.last_key is None else list(self.last_key),
            "hold_until": int(self.hold_until),
            "ceiling": None if self.ceiling is None else float(self.ceiling),
            "losses": [float(x) for x in self.losses],
            "last_scheduled": None if self.last_scheduled is None else [float(x) for x in self.last_scheduled],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ControlState:
        """Inverse of :meth:`state_dict`; version-1 states (no rollback fields) load too."""
        ratio = state.get("last_ratio")
        key = state.get("last_key")
        return cls(
            factor=float(state["factor"]),
            smoothed=[None if c is None else float(c) for c in state["smoothed"]],
            n_measurements=int(state["n_measurements"]),
            n_decisions=int(state["n_decisions"]),
            n_skipped=int(state["n_skipped"]),
            n_rollbacks=int(state.get("n_rollbacks", 0)),
            last_ratio=None if ratio is None else float(ratio),
            last_key=None if key is None else (int(key[0]), int(key[1]), float(key[2])),
            hold_until=int(state.get("hold_until", -1)),
            ceiling=None if state.get("ceiling") is None else float(state["ceiling"]),
            losses=[float(x) for x in state.get("losses", [])],
            last_scheduled=None if state.get("last_scheduled") is None else [float(x) for x in state["last_scheduled"]],
        )


@dataclass(frozen=True)
class Reading:
    """One gauge reading per param group, as the monitor reports it.

    Attributes:
        step: optimizer steps completed when it was measured.
        key: identity of the measurement (so that it is used once).
        ratios: per group gauge / threshold at the effective lr ``lrs[i]`` (dimensionless).
        thresholds: per group stability threshold at ``lrs[i]`` (1 / lr units).
        lrs: per group effective lr the ratio was computed at.
    """

    step: int
    key: tuple[int, int, float]
    ratios: tuple[float, ...]
    thresholds: tuple[float, ...]
    lrs: tuple[float, ...]


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide`: the new state and what happened.

    Attributes:
        state: the new :class:`ControlState` (the input state is not modified).
        used: the reading gave a usable ratio (the EMA was updated).
        changed: the factor changed.
        ratio: the predicted ratio before the decision (None when not used).
        warning: a message to show (an unusable reading), or None.
    """

    state: ControlState
    used: bool
    changed: bool
    ratio: float | None
    warning: str | None = None


def phase(settings: ControlSettings, step: int) -> Phase:
    """``"before"``, ``"warmup"``, ``"active"`` or ``"after"`` for the optimizer step index ``step``."""
    if step < settings.start_step:
        return "before"
    if isinstance(settings.stop_step, float):
        raise ValueError(f"{_OWNER}: a fractional stop_step must be resolved with ControlSettings.for_run first")
    if settings.stop_step is not None and step >= settings.stop_step:
        return "after"
    if step < settings.start_step + settings.warmup_steps:
        return "warmup"
    return "active"


def controls(settings: ControlSettings, step: int) -> bool:
    """Whether the factor (rather than 1) applies at ``step``: active, or after ``stop_step`` with ``"hold"``."""
    p = phase(settings, step)
    return p == "active" or (p == "after" and settings.after_stop == "hold")


def factor_at(settings: ControlSettings, state: ControlState, step: int) -> float:
    """The factor used at optimizer step ``step`` (before the per-group lr bounds)."""
    return state.factor if controls(settings, step) else 1.0


def _bounds(settings: ControlSettings, scheduled: Sequence[float], groups: Sequence[int]) -> tuple[float, float]:
    lo, hi = settings.factor_bounds()
    for i in groups:
        s = float(scheduled[i])
        if s > 0:
            if settings.min_lr is not None:
                lo = max(lo, settings.min_lr / s)
            if settings.max_lr is not None:
                hi = min(hi, settings.max_lr / s)
    return lo, hi


def decide(
    settings: ControlSettings, state: ControlState, reading: Reading, scheduled: Sequence[float], step: int
) -> Decision:
    """Apply the update rule (module docstring) to one reading; pure (``state`` is not modified).

    Args:
        settings: the options.
        state: the state before the reading.
        reading: the gauge per param group.
        scheduled: the scheduled lr of every param group now (length = number of groups).
        step: the optimizer step the new factor will first apply to.

    Returns:
        A :class:`Decision`. Readings of the wrong length or without a usable ratio are skipped
        (``used=False``, a warning) and never change the factor; in the warm-up they only update
        the EMA.
    """
    n = len(scheduled)
    new = replace(state, smoothed=list(state.smoothed) if len(state.smoothed) == n else [None] * n,
                  last_key=reading.key, losses=list(state.losses))
    p = phase(settings, step)
    if p in ("before", "after"):
        return Decision(new, used=False, changed=False, ratio=None)
    settings._resolved()
    ratios, thresholds, lrs = reading.ratios, reading.thresholds, reading.lrs
    if not (len(ratios) == len(thresholds) == len(lrs) == n):
        new.n_skipped += 1
        return Decision(new, False, False, None, (
            f"{_OWNER}: measurement at step {reading.step} has {len(ratios)} ratios for an optimizer with "
            f"{n} param groups; skipped"))
    smoothed = list(new.smoothed)
    rho = -math.inf
    for i in settings.controlled(n):
        r, t, lr = float(ratios[i]), float(thresholds[i]), float(lrs[i])
        if not (math.isfinite(r) and math.isfinite(t) and math.isfinite(lr) and t > 0 and lr > 0):
            continue
        c = r * t  # the curvature this group's ratio compares, units 1/lr
        prev = smoothed[i]
        c = c if prev is None else settings.smoothing * prev + (1.0 - settings.smoothing) * c
        smoothed[i] = c
        rho = max(rho, c * float(scheduled[i]) / (t * lr))  # t * lr: a constant of the optimizer
    if not math.isfinite(rho) or rho <= 0:
        new.n_skipped += 1
        return Decision(new, False, False, None, (
            f"{_OWNER}: measurement at step {reading.step} gives no usable stability ratio "
            f"(ratios={ratios}, thresholds={thresholds}, lrs={lrs}); the factor stays {state.factor:.6g}"))
    new.smoothed = smoothed
    new.n_measurements += 1
    before = state.last_scheduled
    rising = before is not None and len(before) == n and any(float(scheduled[i]) > before[i] for i in settings.controlled(n))
    new.last_scheduled = [float(x) for x in scheduled]
    if p == "warmup":
        new.last_ratio = rho
        return Decision(new, True, False, rho)
    f = state.factor
    current = rho * f
    new.last_ratio = current
    goal: float | None
    if settings.target_ratio is not None:
        goal = settings.target_ratio
    else:
        assert settings.band is not None
        low, high = settings.band
        if low <= current <= high:
            goal = None
        elif settings.band_goal == "edge" or (settings.band_goal == "cautious" and current < low):
            goal = low if current < low else high
        else:
            goal = math.sqrt(low * high)
    proposed = f
    if goal is not None:
        rise = settings.max_change
        floor = settings.low_goal
        if settings.approach == "jump" and floor is not None and not rising:
            # the projected ratio stays at or below the lower edge (every rising goal is at or above it);
            # not while the schedule rises (a warm-up would carry a jump past the band before the next reading)
            rise = max(rise, floor / current)
        proposed = f * min(max(goal / current, 1.0 / settings.max_change), rise)
    if step < state.hold_until:
        proposed = min(proposed, f)  # after a rollback: may fall, may not rise
    if state.ceiling is not None:
        proposed = min(proposed, max(state.ceiling, f)) if proposed > f else proposed
    lo, hi = _bounds(settings, scheduled, settings.controlled(n))
    proposed = min(max(proposed, lo), hi)  # max_lr / max_factor win
    new.factor = proposed
    changed = proposed != f
    if changed:
        new.n_decisions += 1
    return Decision(new, True, changed, current)


def group_factors(settings: ControlSettings, state: ControlState, scheduled: Sequence[float], step: int) -> list[float]:
    """Per param group factor used at ``step``: the factor within the lr bounds, 1 for other groups."""
    out = [1.0] * len(scheduled)
    factor = factor_at(settings, state, step)
    bounded = controls(settings, step)
    if factor == 1.0 and not bounded:
        return out
    for i in settings.controlled(len(scheduled)):
        f = factor
        s = float(scheduled[i])
        if bounded and s > 0:
            if settings.min_lr is not None:
                f = max(f, settings.min_lr / s)
            if settings.max_lr is not None:
                f = min(f, settings.max_lr / s)
        out[i] = f
    return out


def loss_alarm(settings: ControlSettings, losses: Sequence[float], loss: float, spikes: bool = True) -> str | None:
    """Why ``loss`` calls for a rollback, or None.

    A non-finite loss always does; a finite one when ``spikes`` (the caller passes whether the
    factor held the lr above its schedule: a spike at or below the schedule is not the controller's
    doing, e.g. an outlier batch), ``spike_factor`` is set, at least ``spike_window // 2`` recent
    losses are known and ``loss > spike_factor * median(losses)``.
    """
    if not math.isfinite(loss):
        return f"non-finite training loss ({loss})"
    if not spikes or settings.spike_factor is None or len(losses) < settings.spike_window // 2:
        return None
    level = statistics.median(losses)
    if level > 0 and loss > settings.spike_factor * level:
        return (
            f"training loss {loss:.6g} is more than spike_factor={settings.spike_factor:g} times its recent "
            f"median {level:.6g}"
        )
    return None


def record_loss(settings: ControlSettings, state: ControlState, loss: float) -> None:
    """Append a finite loss to ``state.losses`` (keeps the last ``spike_window``)."""
    state.losses.append(float(loss))
    del state.losses[: -settings.spike_window]


def after_rollback(settings: ControlSettings, state: ControlState, step: int) -> ControlState:
    """The state after a rollback at ``step``.

    The factor times ``rollback_factor`` (not below ``1 / max_factor``), no increase before
    ``step + hold_steps``, a ceiling one ``max_change`` below the factor that diverged (never
    raised again: a gauge that does not see the instability, e.g. Adam's full-batch preconditioned
    sharpness under minibatch noise, cannot drive the run into it twice), the EMA and the loss
    history cleared.
    """
    factor = max(state.factor * settings.rollback_factor, settings.factor_bounds()[0])
    ceiling = state.factor / settings.max_change
    if state.ceiling is not None:
        ceiling = min(ceiling, state.ceiling)
    return replace(
        state,
        factor=factor,
        ceiling=max(ceiling, factor),
        smoothed=[None] * len(state.smoothed),
        n_rollbacks=state.n_rollbacks + 1,
        hold_until=step + settings.hold_steps,
        losses=[],
    )


def resolve_gauge(
    gauge: Gauge, *, full_batch: bool, adam_family: bool, batch_sharpness_measured: bool
) -> Literal["sharpness", "batch_sharpness"]:
    """What ``gauge="auto"`` steers; an explicit gauge is returned as it is.

    ``"batch_sharpness"`` for minibatch training with SGD (with or without momentum) when the
    monitor measures it, ``"sharpness"`` otherwise: for full-batch GD (where the batch sharpness is
    the Rayleigh quotient of the full gradient, about 0 before the edge), for the Adam family (its
    preconditioned sharpness; the controller only lowers Adam's lr by default) and for minibatch SGD
    without ``SharpnessMonitor(batch_sharpness=...)``. Chosen by measurement (examples/README.md,
    "Controller under minibatch SGD, momentum and Adam").
    """
    if gauge != "auto":
        return gauge
    if full_batch or adam_family or not batch_sharpness_measured:
        return "sharpness"
    return "batch_sharpness"
