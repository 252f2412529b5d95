"""InstabilityController: options, update rule, phases, scheduler composition, logging, state.

Most tests drive the controller with ``StubMonitor``, a SharpnessMonitor subclass whose
"measurement" is exact and synthetic: the curvature is a known function ``c(step)`` and the
threshold is the plain-GD ``2 / lr_eff`` at the effective rate the controller reports through
``lr_scale_provider``. That makes every decision checkable by hand. Tests with the real monitor
are in ``test_controller_monitor.py``; the DDP test in ``test_controller_ddp.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rpe.callbacks.instability_controller import InstabilityController
from lightning_rpe.callbacks.sharpness_monitor import Measurement, SharpnessMonitor

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# helpers (also imported by test_controller_ddp.py's subprocess script)
# --------------------------------------------------------------------------------------------------
def _measurement(**values: Any) -> Measurement:
    """A Measurement with the given fields; fields this test does not care about get neutral values."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(Measurement)}
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = values[name]
        elif field.default is not dataclasses.MISSING:
            continue
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            continue
        else:
            kwargs[name] = None
    return Measurement(**kwargs)


class StubMonitor(SharpnessMonitor):
    """A SharpnessMonitor whose measurement is synthetic and exact.

    Every ``every`` optimizer steps (in ``on_train_batch_end``) it reports the curvature
    ``c = curvature(step)`` and, per param group, the GD threshold ``2 / lr_eff`` with
    ``lr_eff = group lr * lr_scale_provider()[i]``, so ``ratio = c * lr_eff / 2`` exactly.
    """

    def __init__(self, curvature: Callable[[int], float], every: int = 1) -> None:
        Callback.__init__(self)  # deliberately skips the real monitor's constructor
        self.curvature = curvature
        self.every = every
        self.latest: Measurement | None = None
        self.lr_scale_provider = None
        self.history: list[Measurement] = []

    def measure(self, trainer: pl.Trainer) -> None:
        opt = trainer.optimizers[0]
        n = len(opt.param_groups)
        scales = list(self.lr_scale_provider()) if self.lr_scale_provider is not None else [1.0] * n
        lrs = tuple(float(g["lr"]) * s for g, s in zip(opt.param_groups, scales))
        c = float(self.curvature(trainer.global_step))
        thresholds = tuple(2.0 / lr if lr > 0 else math.inf for lr in lrs)
        # H = c I: the controlled groups' own ratio is the largest of their ratios c lr_i / 2
        controlled = getattr(self, "controlled_groups", None)
        m = _measurement(
            step=trainer.global_step, epoch=trainer.current_epoch, sharpness=c, eigenvalues=(c,),
            lambda_min=None, trace=None, preconditioned_sharpness=None, thresholds=thresholds,
            ratios=tuple(c / t for t in thresholds), lrs=lrs, n_hvp=0, seconds=0.0,
            controlled_ratio=None if controlled is None else max(c * lrs[i] / 2 for i in controlled),
        )
        self.latest = m
        self.history.append(m)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        if trainer.global_step % self.every == 0:
            self.measure(trainer)


# Give StubMonitor the plain Callback behaviour for every hook the real monitor overrides, so the
# stub depends only on `isinstance(stub, SharpnessMonitor)` and on the Measurement fields.
for _name, _value in vars(Callback).items():
    if callable(_value) and not _name.startswith("__") and _name not in vars(StubMonitor):
        setattr(StubMonitor, _name, _value)
for _name in ("state_key", "_generate_state_key"):
    if _name in vars(Callback):
        setattr(StubMonitor, _name, vars(Callback)[_name])


class RecordingSGD(torch.optim.SGD):
    """SGD that records every group's lr as seen inside ``step`` (after all pre-hooks ran)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.used: list[tuple[float, ...]] = []

    def step(self, closure=None):  # noqa: D102
        self.used.append(tuple(float(g["lr"]) for g in self.param_groups))
        return super().step(closure)


class TinyModel(pl.LightningModule):
    """Linear regression on fixed random data; two param groups (weight, bias) when ``groups=2``."""

    def __init__(self, lr: float = 0.05, groups: int = 1, scheduler: Callable | None = None,
                 scheduler_interval: str = "step", lrs: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(6, 2)
        self.lr = lr
        self.groups = groups
        self.lrs = lrs
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduled_at_start: list[tuple[float, ...]] = []

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.net(x) - y).pow(2).sum(dim=1).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, on_step=True, batch_size=len(batch[0]))
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        opt = self.trainer.optimizers[0]
        self.scheduled_at_start.append(tuple(float(g["lr"]) for g in opt.param_groups))

    def configure_optimizers(self):  # noqa: D102
        if self.groups == 1:
            opt = RecordingSGD(self.parameters(), lr=self.lr)
        else:
            lrs = self.lrs or (self.lr, self.lr)
            opt = RecordingSGD([{"params": [self.net.weight], "lr": lrs[0]},
                                {"params": [self.net.bias], "lr": lrs[1]}], lr=self.lr)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": self.scheduler_interval}}


def tiny_loader(n: int = 32, batch_size: int | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or n, shuffle=False)


class CaptureLogger(Logger):
    """In-memory logger: ``self.rows`` holds ``(step, metrics)`` for every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step if step is not None else -1), dict(metrics)))

    def series(self, key: str) -> dict[int, float]:
        return {s: m[key] for s, m in self.rows if key in m}


def make_trainer(callbacks: list[Callback], max_steps: int = 20, logger: Logger | bool = False,
                 **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger, enable_checkpointing=kwargs.pop("ckpt", False),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=1, accelerator="cpu", devices=1, **kwargs,
    )


def fit(model: pl.LightningModule, callbacks: list[Callback], max_steps: int = 20, loader: DataLoader | None = None,
        **kwargs: Any) -> pl.Trainer:
    trainer = make_trainer(callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(model, train_dataloaders=loader or tiny_loader())
    return trainer


class FactorRecorder(Callback):
    """Records ``controller.lr_scales()`` in ``on_train_batch_start`` (put it after the controller)."""

    def __init__(self, controller: InstabilityController) -> None:
        self.controller = controller
        self.scales: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        self.scales.append(list(self.controller.lr_scales()))


def legacy_controller(**kwargs: Any) -> InstabilityController:
    """The controller with the options these tests were written for: no warm-up, no bound on the total
    factor, max_change 2 for every rise, no loss-spike rollback and the sharpness gauge (the behaviour before the safe
    defaults of issue 9).
    Tests of the new defaults and of the divergence guard are in test_controller_safety.py."""
    options: dict[str, Any] = {"warmup_steps": 0, "max_factor": None, "adam_max_factor": None, "max_change": 2.0,
                               "spike_factor": None, "gauge": "sharpness",
                               "approach": "gradual"}
    options.update(kwargs)
    return InstabilityController(**options)


# --------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_ratio": 1.0, "band": (1.0, 2.0)}, "not both"),
        ({"target_ratio": 0.0}, "target_ratio"),
        ({"target_ratio": float("nan")}, "target_ratio"),
        ({"target_ratio": "1.2"}, "target_ratio"),
        ({"band": (1.5, 1.1)}, "band"),
        ({"band": (0.0, 1.1)}, "band"),
        ({"band": (1.1,)}, "band"),
        ({"band": 1.2}, "band"),
        ({"band": (1.1, 1.5), "band_goal": "middle"}, "band_goal"),
        ({"target_ratio": 1.2, "max_change": 1.0}, "max_change"),
        ({"target_ratio": 1.2, "max_change": float("inf")}, "max_change"),
        ({"target_ratio": 1.2, "min_lr": -1.0}, "min_lr"),
        ({"target_ratio": 1.2, "max_lr": float("nan")}, "max_lr"),
        ({"target_ratio": 1.2, "min_lr": 0.5, "max_lr": 0.1}, "min_lr"),
        ({"target_ratio": 1.2, "smoothing": 1.0}, "smoothing"),
        ({"target_ratio": 1.2, "smoothing": -0.1}, "smoothing"),
        ({"target_ratio": 1.2, "warmup_steps": -1}, "warmup_steps"),
        ({"target_ratio": 1.2, "warmup_steps": 1.5}, "warmup_steps"),
        ({"target_ratio": 1.2, "start_step": -2}, "start_step"),
        ({"target_ratio": 1.2, "start_step": 10, "stop_step": 10}, "stop_step"),
        ({"target_ratio": 1.2, "stop_step": 1.0}, "stop_step"),
        ({"target_ratio": 1.2, "stop_step": 0.0}, "stop_step"),
        ({"target_ratio": 1.2, "stop_step": float("nan")}, "stop_step"),
        ({"target_ratio": 1.2, "after_stop": "keep"}, "after_stop"),
        ({"target_ratio": 1.2, "param_groups": []}, "param_groups"),
        ({"target_ratio": 1.2, "param_groups": [0, 0]}, "param_groups"),
        ({"target_ratio": 1.2, "param_groups": [-1]}, "param_groups"),
        ({"target_ratio": 1.2, "param_groups": 3}, "param_groups"),
        ({"target_ratio": 1.2, "initial_factor": 0.0}, "initial_factor"),
        ({"target_ratio": 1.2, "enabled": "yes"}, "enabled"),
        ({"target_ratio": 1.2, "log": 1}, "log"),
    ],
)
def test_invalid_options_name_the_option(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InstabilityController(**kwargs)


@pytest.mark.parametrize("stop_step", [0, -3, True, "0.9", 1.0, -0.5, float("inf")])
def test_every_bad_stop_step_names_both_forms(stop_step: Any) -> None:
    """An int and a fraction are both accepted, so every refusal says so (an int refusal named only ints)."""
    with pytest.raises(ValueError, match=r"stop_step must be None, an int > start_step \(0\), or a float in \(0, 1\)"):
        InstabilityController(stop_step=stop_step)


def test_disabled_needs_no_goal_and_accepts_band_list() -> None:
    InstabilityController(enabled=False)
    c = InstabilityController(band=[1.1, 1.5])  # a YAML list
    assert c.band == (1.1, 1.5)


def test_missing_monitor_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"needs a SharpnessMonitor.*SharpnessMonitor\(") as err:
        fit(TinyModel(), [legacy_controller(target_ratio=1.0)], max_steps=2)
    assert "enabled=False" in str(err.value)


def test_two_monitors_is_a_clear_error() -> None:
    callbacks = [StubMonitor(lambda s: 1.0), StubMonitor(lambda s: 1.0), legacy_controller(target_ratio=1.0)]
    with pytest.raises(ValueError, match="exactly one SharpnessMonitor, found 2"):
        fit(TinyModel(), callbacks, max_steps=2)


def test_param_group_index_out_of_range() -> None:
    callbacks = [StubMonitor(lambda s: 1.0), legacy_controller(target_ratio=1.0, param_groups=[1])]
    with pytest.raises(ValueError, match=r"param_groups must be indices in \[0, 0\]"):
        fit(TinyModel(), callbacks, max_steps=2)


# --------------------------------------------------------------------------------------------------
# the update rule
# --------------------------------------------------------------------------------------------------
def _expected_target_factors(c: float, lr: float, target: float, max_change: float, n: int) -> list[float]:
    """Factors a target controller should use at steps 0..n-1 with a measurement after every step."""
    f, out = 1.0, []
    for _ in range(n):
        out.append(f)
        ratio = c * lr * f / 2.0
        f = f * min(max(target / ratio, 1.0 / max_change), max_change)
    return out


@pytest.mark.parametrize("controller_first", [True, False])
def test_target_rule_matches_hand_computation(controller_first: bool) -> None:
    c, lr, target, max_change = 4.0, 0.05, 1.3, 2.0  # start ratio 0.1: needs x13, reached in 4 decisions
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: c)
    controller = legacy_controller(target_ratio=target, max_change=max_change)
    recorder = FactorRecorder(controller)
    order = [controller, monitor] if controller_first else [monitor, controller]
    fit(model, [*order, recorder], max_steps=8)
    expected = _expected_target_factors(c, lr, target, max_change, 8)
    used = [u[0] / lr for u in model.optimizers().optimizer.used]
    assert used == pytest.approx(expected, rel=1e-12)
    assert [s[0] for s in recorder.scales] == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == pytest.approx(target / (c * lr / 2))  # it got there, and stayed
    assert [m.ratios[0] for m in monitor.history][-3:] == pytest.approx([target] * 3)
    assert controller.n_decisions == 4
    assert controller.n_measurements == (7 if controller_first else 8)  # the last one comes after the last step


@pytest.mark.parametrize(("band_goal", "goal"), [("center", math.sqrt(1.1 * 1.5)), ("edge", 1.1)])
def test_band_rule_moves_only_outside_the_band(band_goal: str, goal: float) -> None:
    lr = 0.1
    # ratio 0.5 at factor 1: below the band; one decision moves it to the goal, then it stays inside
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: 10.0)
    controller = legacy_controller(band=(1.1, 1.5), band_goal=band_goal, max_change=4.0)
    fit(model, [monitor, controller], max_steps=6)
    f = goal / 0.5
    used = [u[0] / lr for u in model.optimizers().optimizer.used]
    assert used == pytest.approx([1.0] + [f] * 5, rel=1e-12)
    assert controller.n_decisions == 1
    # above the band: falls to the goal from the top
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: 40.0)  # ratio 2.0
    controller = legacy_controller(band=(1.1, 1.5), band_goal=band_goal, max_change=4.0)
    fit(model, [monitor, controller], max_steps=3)
    goal_above = math.sqrt(1.1 * 1.5) if band_goal == "center" else 1.5
    used = [u[0] / lr for u in model.optimizers().optimizer.used]
    assert used == pytest.approx([1.0, goal_above / 2.0, goal_above / 2.0], rel=1e-12)


def test_max_change_and_lr_bounds() -> None:
    lr = 0.01
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: 1.0)  # ratio 0.005 at factor 1
    controller = legacy_controller(target_ratio=1.0, max_change=1.5, max_lr=0.04)
    fit(model, [monitor, controller], max_steps=8)
    used = [u[0] for u in model.optimizers().optimizer.used]
    assert used == pytest.approx([0.01, 0.015, 0.0225, 0.03375, 0.04, 0.04, 0.04, 0.04], rel=1e-12)
    # min_lr lifts a tiny ratio's target-seeking decrease
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: 1000.0)  # ratio 5 at factor 1
    controller = legacy_controller(target_ratio=1.0, max_change=10.0, min_lr=0.005)
    fit(model, [monitor, controller], max_steps=3)
    assert [u[0] for u in model.optimizers().optimizer.used] == pytest.approx([0.01, 0.005, 0.005], rel=1e-12)


def test_lr_bounds_hold_at_every_step_under_a_scheduler() -> None:
    lr = 0.1
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 + 0.5 * s)  # noqa: E731
    model, monitor = TinyModel(lr=lr, scheduler=sched), StubMonitor(lambda s: 30.0, every=5)
    controller = legacy_controller(target_ratio=1.0, max_change=4.0, max_lr=0.2)
    fit(model, [monitor, controller], max_steps=15)
    used = [u[0] for u in model.optimizers().optimizer.used]
    assert max(used) <= 0.2 + 1e-15
    assert any(u == pytest.approx(0.2) for u in used)


def test_smoothing_is_an_ema_of_the_curvature() -> None:
    lr, beta = 0.1, 0.5
    curv = [10.0, 30.0, 10.0, 30.0]
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: curv[s - 1] if s <= 4 else 10.0)
    controller = legacy_controller(target_ratio=1.0, smoothing=beta, max_change=100.0)
    fit(model, [monitor, controller], max_steps=4)
    ema, expected = None, []
    for c in curv:
        ema = c if ema is None else beta * ema + (1 - beta) * c
        expected.append(1.0 / (ema * lr / 2))
    used = [u[0] / lr for u in model.optimizers().optimizer.used]
    assert used == pytest.approx([1.0] + expected[:3], rel=1e-12)
    assert controller.smoothed[0] == pytest.approx(ema)


def test_warmup_start_stop_and_after_stop() -> None:
    lr = 0.1
    for after_stop in ("reset", "hold"):
        model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: 10.0)  # ratio 0.5 at factor 1
        controller = legacy_controller(target_ratio=1.0, start_step=3, warmup_steps=2, stop_step=8,
                                           after_stop=after_stop, max_change=4.0)
        fit(model, [monitor, controller], max_steps=11)
        used = [u[0] / lr for u in model.optimizers().optimizer.used]
        after = 2.0 if after_stop == "hold" else 1.0
        # steps 0-2 before start, 3-4 warm-up (observing), first decision at step 5 from the
        # measurement taken after step 4, stop at step 8.
        assert used == pytest.approx([1.0] * 5 + [2.0] * 3 + [after] * 3, rel=1e-12)
        assert controller.n_measurements == 5  # measurements after steps 3..7 (global_step 3..7)
        assert controller.n_decisions == 1


def test_param_groups_selects_groups_and_uses_the_least_stable() -> None:
    model, monitor = TinyModel(groups=2, lrs=(0.1, 0.05)), StubMonitor(lambda s: 10.0)
    controller = legacy_controller(target_ratio=1.0, max_change=4.0)
    fit(model, [monitor, controller], max_steps=3)
    used = model.optimizers().optimizer.used
    # ratios at factor 1: 0.5 and 0.25; the larger one drives: factor 2 for both groups
    assert used == [(0.1, 0.05), (0.2, 0.1), (0.2, 0.1)]
    model, monitor = TinyModel(groups=2, lrs=(0.1, 0.05)), StubMonitor(lambda s: 10.0)
    controller = legacy_controller(target_ratio=1.0, max_change=8.0, param_groups=[1])
    fit(model, [monitor, controller], max_steps=3)
    used = model.optimizers().optimizer.used
    assert used == [(0.1, 0.05), (0.1, 0.2), (0.1, 0.2)]


def test_unusable_measurement_is_skipped_with_a_warning() -> None:
    lr = 0.1
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: 10.0 if s != 2 else float("nan"))
    controller = legacy_controller(target_ratio=1.0, max_change=4.0)
    with pytest.warns(UserWarning, match="no usable stability ratio"):
        fit(model, [monitor, controller], max_steps=4)
    assert controller.n_skipped == 1
    used = [u[0] / lr for u in model.optimizers().optimizer.used]
    assert used == pytest.approx([1.0, 2.0, 2.0, 2.0])


# --------------------------------------------------------------------------------------------------
# composition with schedulers
# --------------------------------------------------------------------------------------------------
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s)),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=24, eta_min=1e-3),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=24),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_effective_lr_is_scheduled_lr_times_factor(name: str) -> None:
    steps = 24
    # the same run without the controller: the scheduled rates
    plain = TinyModel(lr=0.1, scheduler=SCHEDULERS[name])
    fit(plain, [StubMonitor(lambda s: 30.0 + s, every=3)], max_steps=steps)
    scheduled = [u[0] for u in plain.optimizers().optimizer.used]

    model = TinyModel(lr=0.1, scheduler=SCHEDULERS[name])
    monitor = StubMonitor(lambda s: 30.0 + s, every=3)  # sharpening: the factor keeps moving
    controller = legacy_controller(target_ratio=1.2, max_change=1.5)
    recorder = FactorRecorder(controller)
    logger = CaptureLogger()
    lr_monitor = LearningRateMonitor(logging_interval="step")
    trainer = fit(model, [monitor, controller, recorder, lr_monitor], max_steps=steps, logger=logger)
    used = [u[0] for u in model.optimizers().optimizer.used]
    factors = [s[0] for s in recorder.scales]
    assert len(used) == len(factors) == steps
    assert len(set(factors)) >= 4, factors  # the factor really changed during the run
    # inside every step: effective lr = scheduled lr x factor (exactly: the same product)
    assert used == [s * f for s, f in zip(scheduled, factors)]
    # outside the step the optimizer holds the scheduled rate, identical to the run without controller
    assert [s[0] for s in model.scheduled_at_start] == scheduled
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.get_last_lr()[0] == model.optimizers().optimizer.param_groups[0]["lr"]
    assert plain.trainer.lr_scheduler_configs[0].scheduler.state_dict() == sched.state_dict()
    # logged per step: the factor and the effective lr actually used at that step
    lr_scale, lr_eff = logger.series("rpe/lr_scale"), logger.series("rpe/lr")
    assert sorted(lr_scale) == list(range(steps))
    assert [lr_scale[s] for s in range(steps)] == pytest.approx(factors, rel=1e-6)
    assert [lr_eff[s] for s in range(steps)] == pytest.approx(used, rel=1e-6)
    # LearningRateMonitor shows the scheduled rate, not the effective one
    lr_monitor_values = logger.series("lr-RecordingSGD")
    assert [lr_monitor_values[s] for s in range(steps)] == pytest.approx(scheduled, rel=1e-12)


def test_hooks_are_on_the_torch_optimizer_and_removed_at_teardown() -> None:
    model, monitor = TinyModel(), StubMonitor(lambda s: 10.0)
    controller = legacy_controller(target_ratio=1.0)
    trainer = fit(model, [monitor, controller], max_steps=3)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Optimizer)
    assert controller._pre_step not in opt._optimizer_step_pre_hooks.values()
    assert controller._post_step not in opt._optimizer_step_post_hooks.values()
    assert monitor.lr_scale_provider is None
    assert opt.param_groups[0]["lr"] == 0.05  # the scheduled (here constant) rate is back


class _Boom(Exception):
    pass


class _FailAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: D102
        if trainer.global_step == self.step:
            raise _Boom()


def test_exception_inside_step_restores_the_scheduled_lr_and_removes_hooks() -> None:
    model, monitor = TinyModel(lr=0.1), StubMonitor(lambda s: 10.0)
    controller = legacy_controller(target_ratio=1.0, max_change=4.0)
    trainer = make_trainer([monitor, controller, _FailAt(3)], max_steps=6)
    with pytest.raises(_Boom):
        trainer.fit(model, train_dataloaders=tiny_loader())
    opt = trainer.optimizers[0]
    assert controller.factor == 2.0
    assert opt.param_groups[0]["lr"] == 0.1
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


# --------------------------------------------------------------------------------------------------
# enabled=False
# --------------------------------------------------------------------------------------------------
def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_disabled_is_a_bit_identical_no_op() -> None:
    pl.seed_everything(3, verbose=False)
    plain = TinyModel(lr=0.1)
    fit(plain, [StubMonitor(lambda s: 10.0)], max_steps=6, loader=tiny_loader(batch_size=8))
    pl.seed_everything(3, verbose=False)
    model, monitor = TinyModel(lr=0.1), StubMonitor(lambda s: 10.0)
    controller = legacy_controller(band=(1.1, 1.5), enabled=False)
    trainer = fit(model, [monitor, controller], max_steps=6, loader=tiny_loader(batch_size=8), ckpt=False)
    for k, v in _weights(plain).items():
        assert torch.equal(v, _weights(model)[k])
    assert plain.optimizers().optimizer.used == model.optimizers().optimizer.used
    assert monitor.lr_scale_provider is None
    assert controller.state_dict() == {}
    assert not trainer.optimizers[0]._optimizer_step_pre_hooks
    # no monitor needed when disabled
    fit(TinyModel(), [legacy_controller(enabled=False)], max_steps=2)


# --------------------------------------------------------------------------------------------------
# state and resume
# --------------------------------------------------------------------------------------------------
def test_state_dict_is_plain_and_round_trips() -> None:
    model, monitor = TinyModel(lr=0.1), StubMonitor(lambda s: 10.0 + s)
    controller = legacy_controller(target_ratio=1.0, smoothing=0.3)
    fit(model, [monitor, controller], max_steps=5)
    state = controller.state_dict()

    def plain(x: Any) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (bool, int, float, str))

    assert plain(state), state
    other = legacy_controller(target_ratio=1.0, smoothing=0.3)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert state["factor"] == controller.factor and state["n_measurements"] == 5


def test_resume_equals_uninterrupted(tmp_path: Any) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, save: str | None = None) -> tuple[Any, ...]:
        pl.seed_everything(0, verbose=False)
        model = TinyModel(lr=0.05, scheduler=SCHEDULERS["CosineAnnealingLR"])
        monitor = StubMonitor(lambda s: 20.0 + 2.0 * s, every=2)
        controller = legacy_controller(band=(1.1, 1.5), smoothing=0.5, max_change=1.7, warmup_steps=2)
        trainer = make_trainer([monitor, controller], max_steps=max_steps)
        trainer.fit(model, train_dataloaders=tiny_loader(), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return model, controller

    full_model, full_ctrl = run(16)
    ckpt = str(tmp_path / "half.ckpt")
    run(7, save=ckpt)
    loaded = torch.load(ckpt, weights_only=True)  # plain types: loads with weights_only
    assert any("InstabilityController" in k for k in loaded["callbacks"])
    resumed_model, resumed_ctrl = run(16, ckpt_path=ckpt)
    assert resumed_ctrl.state_dict() == full_ctrl.state_dict()
    assert full_ctrl.n_decisions >= 2
    assert resumed_model.optimizers().optimizer.used == full_model.optimizers().optimizer.used[7:]
    for k, v in _weights(full_model).items():
        assert torch.equal(v, _weights(resumed_model)[k])


def test_gradient_accumulation_scales_each_optimizer_step() -> None:
    lr = 0.1
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: 10.0)
    controller = legacy_controller(target_ratio=1.0, max_change=4.0)
    logger = CaptureLogger()
    fit(model, [monitor, controller], max_steps=3, loader=tiny_loader(batch_size=8), logger=logger,
        accumulate_grad_batches=2)
    # the stub measures after every batch; the one after batch 0 (global_step 0, before any
    # optimizer step) already drives the first step
    used = [u[0] / lr for u in model.optimizers().optimizer.used]
    assert used == pytest.approx([2.0, 2.0, 2.0])
    assert len(model.optimizers().optimizer.used) == 3  # 6 batches, 3 optimizer steps
    assert list(logger.series("rpe/lr_scale").values()) == pytest.approx([2.0, 2.0, 2.0])  # once per step



class ManualModel(TinyModel):
    """TinyModel with manual optimization: training_step calls opt.step() itself."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = self.compute_loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_is_scaled_too() -> None:
    lr = 0.1
    model, monitor = ManualModel(lr=lr), StubMonitor(lambda s: 10.0)
    controller = legacy_controller(target_ratio=1.0, max_change=4.0)
    fit(model, [monitor, controller], max_steps=3)
    used = [u[0] / lr for u in model.optimizers().optimizer.used]
    assert used == pytest.approx([1.0, 2.0, 2.0])
    assert model.optimizers().optimizer.param_groups[0]["lr"] == lr
