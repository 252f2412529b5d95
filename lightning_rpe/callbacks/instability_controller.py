"""InstabilityController: steer the stability ratio by scaling the learning rate.

The controller follows the :class:`~lightning_rpe.callbacks.sharpness_monitor.SharpnessMonitor` in
the same Trainer. After each new measurement it chooses a factor ``f`` so that the stability ratio
(sharpness / threshold of the optimizer in use, preconditioned for the Adam family) at the next
optimizer step lands in a band ``[low, high]`` or at a target. The optimizer then steps with

    effective lr = scheduled lr * f

The multiplication happens only inside ``optimizer.step`` (a torch step pre-hook multiplies the
controlled groups' ``lr``, a post-hook puts the scheduled values back), so learning-rate schedulers,
``LearningRateMonitor`` and checkpoints always see the scheduled rate. See ``docs/controller.md``.

Update rule (one decision per new measurement). For each controlled group ``i`` the measurement
gives the ratio ``r_i`` at the effective rate ``lr_i`` it used. Every supported threshold is
proportional to ``1 / lr`` (``2 / lr`` for GD, ``38 / lr`` for Adam at beta1 = 0.9), so the
curvature the ratio compares is ``c_i = r_i * threshold_i`` and ``K_i = threshold_i * lr_i`` is a
constant of the optimizer. With ``c_i`` smoothed by an exponential moving average and ``s_i`` the
scheduled rate now, the ratio at factor 1 is ``rho_i = c_i * s_i / K_i`` and the ratio at factor
``f`` is ``rho * f`` with ``rho = max_i rho_i`` (the least stable controlled group). Then

    f <- f * clamp(goal / (rho * f), 1 / max_change, max_change)

clamped afterwards so that ``min_lr <= s_i * f <= max_lr``. ``goal`` is ``target_ratio``; in band
mode there is no change while ``low <= rho * f <= high``, else ``goal`` is the band's geometric
centre ``sqrt(low * high)`` (``band_goal="center"``) or the edge that was crossed (``"edge"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle

from lightning_rpe.callbacks.sharpness_monitor import Measurement, SharpnessMonitor

__all__ = ["InstabilityController"]

_BAND_GOALS = ("center", "edge")
_AFTER_STOP = ("reset", "hold")
_STATE_VERSION = 1


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class InstabilityController(Callback):
    r"""Scale the learning rate so the stability ratio stays in a band or at a target.

    The stability ratio is the one the ``SharpnessMonitor`` reports (``rpe/stability_ratio``):
    sharpness / threshold, for example ``lambda_max * lr / 2`` for plain GD and
    ``lambda_max(P^-1/2 H P^-1/2) * lr * (1 - beta1) / (2 + 2 beta1)`` for Adam. Above 1 the step
    is unstable along the top eigendirection. Exactly one of ``target_ratio`` and ``band`` is
    required while ``enabled``.

    Args:
        target_ratio: ratio to steer to after every measurement (> 0).
        band: ``(low, high)`` with ``0 < low < high``; the factor is left alone while the predicted
            ratio is inside.
        band_goal: where a band decision aims: ``"center"`` (geometric centre
            ``sqrt(low * high)``, the default) or ``"edge"`` (the crossed edge: minimal change).
        max_change: largest factor change per decision (> 1): the new factor lies in
            ``[f / max_change, f * max_change]``.
        min_lr, max_lr: bounds on every controlled group's effective rate (same units as the
            optimizer's ``lr``); enforced at every step. When they conflict ``max_lr`` wins. A
            scheduled rate of exactly 0 stays 0.
        smoothing: EMA coefficient ``beta`` in ``[0, 1)`` for the measured curvature,
            ``c <- beta * c + (1 - beta) * c_new``; 0 (default) uses each measurement as it is.
        warmup_steps: optimizer steps after ``start_step`` during which the controller only
            observes (fills the EMA) and the factor stays 1.
        start_step: first optimizer step (``trainer.global_step``) the controller takes part in;
            before it, measurements are ignored and the factor is 1.
        stop_step: first optimizer step it no longer controls (``None``: never stops).
        after_stop: ``"reset"`` (factor back to 1 from ``stop_step`` on, the default) or
            ``"hold"`` (keep the last factor, make no further decisions).
        param_groups: indices of the optimizer's param groups to scale (``None``: all). The ratio
            that drives the decision is the largest over these groups.
        initial_factor: factor at the first controlled step (> 0, default 1).
        log: log ``rpe/lr_scale`` and the effective ``rpe/lr`` (``rpe/lr/pg1``, ``pg2``, ... with several
            groups) at every optimizer step, and at every decision ``rpe/controller_ratio`` (the
            predicted ratio the decision used) with ``rpe/band_low``/``rpe/band_high`` or
            ``rpe/target_ratio``.
        enabled: ``False`` makes the callback a no-op: it registers nothing, keeps no state and
            training is bit-identical to a run without it.
    """

    def __init__(
        self,
        target_ratio: float | None = None,
        band: tuple[float, float] | None = None,
        *,
        band_goal: str = "center",
        max_change: float = 2.0,
        min_lr: float | None = None,
        max_lr: float | None = None,
        smoothing: float = 0.0,
        warmup_steps: int = 0,
        start_step: int = 0,
        stop_step: int | None = None,
        after_stop: str = "reset",
        param_groups: Sequence[int] | None = None,
        initial_factor: float = 1.0,
        log: bool = True,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False, got {enabled!r}")
        if target_ratio is not None and band is not None:
            raise ValueError("give either target_ratio (a float > 0) or band ((low, high)), not both")
        if enabled and target_ratio is None and band is None:
            raise ValueError(
                "InstabilityController needs target_ratio (a float > 0, e.g. 1.2) or "
                "band ((low, high) with 0 < low < high, e.g. (1.1, 1.5)); or set enabled=False"
            )
        if target_ratio is not None and not (
            _is_number(target_ratio) and math.isfinite(target_ratio) and target_ratio > 0
        ):
            raise ValueError(f"target_ratio must be a finite float > 0, got {target_ratio!r}")
        band_t: tuple[float, float] | None = None
        if band is not None:
            try:
                low, high = band  # type: ignore[misc]
            except (TypeError, ValueError):
                raise ValueError(f"band must be (low, high) with 0 < low < high, got {band!r}") from None
            if not (
                _is_number(low) and _is_number(high) and math.isfinite(low) and math.isfinite(high)
                and 0 < low < high
            ):
                raise ValueError(f"band must be (low, high) with 0 < low < high, got {band!r}")
            band_t = (float(low), float(high))
        if band_goal not in _BAND_GOALS:
            raise ValueError(f"band_goal must be one of {_BAND_GOALS}, got {band_goal!r}")
        if not (_is_number(max_change) and math.isfinite(max_change) and max_change > 1):
            raise ValueError(f"max_change must be a finite float > 1, got {max_change!r}")
        for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
            if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be None or a finite float >= 0, got {value!r}")
        if min_lr is not None and max_lr is not None and min_lr > max_lr:
            raise ValueError(f"min_lr must be <= max_lr, got min_lr={min_lr!r}, max_lr={max_lr!r}")
        if not (_is_number(smoothing) and 0 <= smoothing < 1):
            raise ValueError(f"smoothing must be a float in [0, 1), got {smoothing!r}")
        for name, value in (("warmup_steps", warmup_steps), ("start_step", start_step)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if stop_step is not None and not (
            isinstance(stop_step, int) and not isinstance(stop_step, bool) and stop_step > start_step
        ):
            raise ValueError(f"stop_step must be None or an int > start_step ({start_step}), got {stop_step!r}")
        if after_stop not in _AFTER_STOP:
            raise ValueError(f"after_stop must be one of {_AFTER_STOP}, got {after_stop!r}")
        groups: tuple[int, ...] | None = None
        if param_groups is not None:
            try:
                groups = tuple(param_groups)
            except TypeError:
                raise ValueError(
                    f"param_groups must be None (all groups) or a non-empty list of group indices, got {param_groups!r}"
                ) from None
            if (
                not groups
                or any(not isinstance(g, int) or isinstance(g, bool) or g < 0 for g in groups)
                or len(set(groups)) != len(groups)
            ):
                raise ValueError(
                    "param_groups must be None (all groups) or a non-empty list of distinct group indices >= 0, "
                    f"got {param_groups!r}"
                )
        if not (_is_number(initial_factor) and math.isfinite(initial_factor) and initial_factor > 0):
            raise ValueError(f"initial_factor must be a finite float > 0, got {initial_factor!r}")
        if not isinstance(log, bool):
            raise ValueError(f"log must be True or False, got {log!r}")

        self.target_ratio = None if target_ratio is None else float(target_ratio)
        self.band = band_t
        self.band_goal = band_goal
        self.max_change = float(max_change)
        self.min_lr = None if min_lr is None else float(min_lr)
        self.max_lr = None if max_lr is None else float(max_lr)
        self.smoothing = float(smoothing)
        self.warmup_steps = warmup_steps
        self.start_step = start_step
        self.stop_step = stop_step
        self.after_stop = after_stop
        self.param_groups = groups
        self.initial_factor = float(initial_factor)
        self.log = log
        self.enabled = enabled

        # state saved in checkpoints (plain Python types)
        self.factor: float = self.initial_factor
        self.smoothed: list[float | None] = []  # EMA of the curvature per optimizer group
        self.n_measurements = 0  # measurements used (EMA updated)
        self.n_decisions = 0  # decisions that changed the factor
        self.n_skipped = 0  # measurements that could not be used
        self.last_ratio: float | None = None  # predicted ratio at the last decision (before it)
        self._last_key: tuple[int, int, float] | None = None

        # runtime only
        self._monitor: SharpnessMonitor | None = None
        self._trainer: pl.Trainer | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list[RemovableHandle] = []
        self._pending: list[tuple[int, Any, Any]] | None = None
        self._applied: tuple[int, float, tuple[float, ...], tuple[Any, ...]] | None = None
        self._logged_step: int | None = None
        self._decision_to_log: float | None = None
        self._prefix = "rpe/"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {
            "version": _STATE_VERSION,
            "factor": float(self.factor),
            "smoothed": [None if c is None else float(c) for c in self.smoothed],
            "n_measurements": int(self.n_measurements),
            "n_decisions": int(self.n_decisions),
            "n_skipped": int(self.n_skipped),
            "last_ratio": None if self.last_ratio is None else float(self.last_ratio),
            "last_key": None if self._last_key is None else list(self._last_key),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.enabled or not state_dict:
            return
        self.factor = float(state_dict["factor"])
        self.smoothed = [None if c is None else float(c) for c in state_dict["smoothed"]]
        self.n_measurements = int(state_dict["n_measurements"])
        self.n_decisions = int(state_dict["n_decisions"])
        self.n_skipped = int(state_dict["n_skipped"])
        lr = state_dict.get("last_ratio")
        self.last_ratio = None if lr is None else float(lr)
        key = state_dict.get("last_key")
        self._last_key = None if key is None else (int(key[0]), int(key[1]), float(key[2]))

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessMonitor)]
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
        if self.param_groups is not None and max(self.param_groups) >= n_groups:
            raise ValueError(
                f"param_groups must be indices in [0, {n_groups - 1}] for this optimizer "
                f"({n_groups} param groups), got {list(self.param_groups)}"
            )
        if len(self.smoothed) != n_groups:
            self.smoothed = (self.smoothed + [None] * n_groups)[:n_groups]
        self._remove_hooks()
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._cleanup()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        self._restore_pending()
        self._remove_hooks()
        if self._monitor is not None and getattr(self._monitor.lr_scale_provider, "__self__", None) is self:
            self._monitor.lr_scale_provider = None
        self._monitor = None
        self._trainer = None
        self._optimizer = None

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ phases
    def _phase(self, step: int) -> str:
        """``"before"``, ``"warmup"``, ``"active"`` or ``"after"`` for the optimizer step index ``step``."""
        if step < self.start_step:
            return "before"
        if self.stop_step is not None and step >= self.stop_step:
            return "after"
        if step < self.start_step + self.warmup_steps:
            return "warmup"
        return "active"

    def _factor_at(self, step: int) -> float:
        phase = self._phase(step)
        if phase == "active" or (phase == "after" and self.after_stop == "hold"):
            return self.factor
        return 1.0

    def _controlled(self, n_groups: int) -> tuple[int, ...]:
        return tuple(range(n_groups)) if self.param_groups is None else self.param_groups

    def _bounded(self, factor: float, scheduled: float) -> float:
        """The factor applied to one group: ``factor`` limited so that ``min_lr <= lr * f <= max_lr``."""
        if scheduled <= 0:
            return factor
        if self.min_lr is not None:
            factor = max(factor, self.min_lr / scheduled)
        if self.max_lr is not None:
            factor = min(factor, self.max_lr / scheduled)
        return factor

    def _group_factors(self, step: int) -> list[float]:
        assert self._optimizer is not None
        groups = self._optimizer.param_groups
        factor = self._factor_at(step)
        out = [1.0] * len(groups)
        if factor == 1.0 and self.min_lr is None and self.max_lr is None:
            return out
        phase = self._phase(step)
        bounded = phase == "active" or (phase == "after" and self.after_stop == "hold")
        for i in self._controlled(len(groups)):
            out[i] = self._bounded(factor, float(groups[i]["lr"])) if bounded else factor
        return out

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
        return self._group_factors(self._trainer.global_step)

    # ------------------------------------------------------------------ step hooks
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore_pending()  # a previous step raised before its post-hook ran
        assert self._trainer is not None
        step = self._trainer.global_step
        factors = self._group_factors(step)
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
        effective_lrs = tuple(g["lr"] for g in optimizer.param_groups)
        self._applied = (step, self._factor_at(step), tuple(factors), effective_lrs)

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
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.enabled:
            self._maybe_decide(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        self._maybe_decide(trainer)
        if not self.log:
            return
        p = self._prefix
        if self._applied is not None and self._applied[0] != self._logged_step:
            step, factor, _, lrs = self._applied
            self._logged_step = step
            self._log(pl_module, f"{p}lr_scale", factor)
            if len(lrs) == 1:
                self._log(pl_module, f"{p}lr", lrs[0])
            else:  # the monitor's per-group suffix: pg1 is param group 0
                for i, lr in enumerate(lrs, start=1):
                    self._log(pl_module, f"{p}lr/pg{i}", lr)
        if self._decision_to_log is not None:
            ratio = self._decision_to_log
            self._decision_to_log = None
            self._log(pl_module, f"{p}controller_ratio", ratio)
            if self.target_ratio is not None:
                self._log(pl_module, f"{p}target_ratio", self.target_ratio)
            elif self.band is not None:
                self._log(pl_module, f"{p}band_low", self.band[0])
                self._log(pl_module, f"{p}band_high", self.band[1])

    @staticmethod
    def _log(pl_module: pl.LightningModule, name: str, value: Any) -> None:
        pl_module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.enabled and self.log and self._monitor is not None):
            return
        if getattr(self._monitor, "custom_scalars", False):
            from lightning_rpe.callbacks import _logging

            _logging.add_custom_scalars(trainer, self.layout())

    def layout(self) -> dict[str, dict[str, list[str]]]:
        """TensorBoard custom-scalars category of the controller (anchored tag regexes)."""
        import re

        from lightning_rpe.callbacks._logging import tag_regex

        p = self._prefix
        return {
            f"{p}controller".rstrip("/"): {
                "stability ratio and its goal": [
                    f"^{re.escape(p)}stability_ratio$",
                    tag_regex(f"{p}controller_ratio", f"{p}target_ratio", f"{p}band_low", f"{p}band_high"),
                ],
                "lr scale (controller factor)": [tag_regex(f"{p}lr_scale")],
                "effective lr (inside optimizer.step)": [f"^{re.escape(p)}lr(/pg[0-9]+)?$"],
            }
        }

    def _maybe_decide(self, trainer: pl.Trainer) -> None:
        monitor = self._monitor
        if monitor is None or self._optimizer is None:
            return
        m = monitor.latest
        if m is None:
            return
        key = (int(m.step), int(m.epoch), float(m.sharpness))
        if key == self._last_key or (
            self._last_key is not None
            and key[0] == self._last_key[0]
            and math.isnan(key[2])
            and math.isnan(self._last_key[2])
        ):
            return
        step = trainer.global_step
        phase = self._phase(step)
        if phase in ("before", "after"):
            self._last_key = key  # not ours to use; do not reconsider it later
            return
        # decide on rank zero only, then broadcast the whole new state so that ranks cannot drift
        payload: dict[str, Any] | None = None
        if trainer.is_global_zero:
            payload = self._decide(m, phase)
        payload = trainer.strategy.broadcast(payload, src=0)
        self._apply_payload(payload, key)
        if payload["used"] and payload["ratio"] is not None:
            self._decision_to_log = float(payload["ratio"])
        if payload.get("warning") and trainer.is_global_zero:
            rank_zero_warn(payload["warning"])

    def _decide(self, m: Measurement, phase: str) -> dict[str, Any]:
        """Return the new state after measurement ``m`` (pure: does not modify ``self``)."""
        assert self._optimizer is not None
        groups = self._optimizer.param_groups
        n = len(groups)
        smoothed = list(self.smoothed) if len(self.smoothed) == n else [None] * n
        out: dict[str, Any] = {
            "factor": self.factor,
            "smoothed": smoothed,
            "used": False,
            "changed": False,
            "ratio": self.last_ratio,
            "warning": None,
        }
        ratios, thresholds, lrs = tuple(m.ratios), tuple(m.thresholds), tuple(m.lrs)
        if not (len(ratios) == len(thresholds) == len(lrs) == n):
            out["warning"] = (
                f"InstabilityController: measurement at step {m.step} has {len(ratios)} ratios for an optimizer "
                f"with {n} param groups; skipped"
            )
            return out
        rho = -math.inf
        for i in self._controlled(n):
            r, t, lr = float(ratios[i]), float(thresholds[i]), float(lrs[i])
            if not (math.isfinite(r) and math.isfinite(t) and math.isfinite(lr) and t > 0 and lr > 0):
                continue
            c = r * t  # the (preconditioned) sharpness this group's ratio compares, units 1/lr
            prev = smoothed[i]
            c = c if prev is None else self.smoothing * prev + (1.0 - self.smoothing) * c
            smoothed[i] = c
            scheduled = float(groups[i]["lr"])
            k = t * lr  # threshold * lr: a constant of the optimizer (2 for GD)
            rho = max(rho, c * scheduled / k)
        if not math.isfinite(rho) or rho <= 0:
            out["smoothed"] = list(self.smoothed) if len(self.smoothed) == n else [None] * n
            out["warning"] = (
                f"InstabilityController: measurement at step {m.step} gives no usable stability ratio "
                f"(ratios={ratios}, thresholds={thresholds}, lrs={lrs}); the factor stays {self.factor:.6g}"
            )
            return out
        out["used"] = True
        if phase != "active":  # warm-up: observe only
            out["ratio"] = rho
            return out
        f = self.factor
        current = rho * f
        out["ratio"] = current
        goal: float | None
        if self.target_ratio is not None:
            goal = self.target_ratio
        else:
            assert self.band is not None
            low, high = self.band
            if low <= current <= high:
                goal = None
            elif self.band_goal == "center":
                goal = math.sqrt(low * high)
            else:
                goal = low if current < low else high
        new = f
        if goal is not None:
            step_factor = min(max(goal / current, 1.0 / self.max_change), self.max_change)
            new = f * step_factor
        # absolute bounds on the effective rate of every controlled group (max_lr wins)
        lo, hi = 0.0, math.inf
        for i in self._controlled(n):
            scheduled = float(groups[i]["lr"])
            if scheduled > 0:
                if self.min_lr is not None:
                    lo = max(lo, self.min_lr / scheduled)
                if self.max_lr is not None:
                    hi = min(hi, self.max_lr / scheduled)
        new = min(max(new, lo), hi)
        out["factor"] = new
        out["changed"] = new != f
        return out

    def _apply_payload(self, payload: dict[str, Any], key: tuple[int, int, float]) -> None:
        self._last_key = key
        self.smoothed = list(payload["smoothed"])
        self.last_ratio = payload["ratio"]
        if payload["used"]:
            self.n_measurements += 1
        else:
            self.n_skipped += 1
        if payload["changed"]:
            self.n_decisions += 1
        self.factor = float(payload["factor"])

    def __repr__(self) -> str:
        goal = f"target_ratio={self.target_ratio}" if self.target_ratio is not None else f"band={self.band}"
        return f"{type(self).__name__}({goal}, max_change={self.max_change}, enabled={self.enabled})"
