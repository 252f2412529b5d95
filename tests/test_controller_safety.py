"""InstabilityController safety (issue 9): the pure control law, safe defaults, the divergence guard
with rollback, reset on a fresh fit, the listener entry point, the gauge choice."""

from __future__ import annotations

import math
import typing
import warnings
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lit_models import TinyMLP, full_batch_loader, make_dataset, make_loader, make_trainer
from test_controller import CaptureLogger, RecordingSGD, StubMonitor, TinyModel, fit

from lightning_rpe import SharpnessMonitor, control
from lightning_rpe.callbacks.instability_controller import InstabilityController
from lightning_rpe.control import ControlSettings, ControlState, Reading

torch.set_num_threads(1)


def _reading(step: int, ratio: float, lr: float = 0.1) -> Reading:
    return Reading(step=step, key=(step, 0, ratio), ratios=(ratio,), thresholds=(2.0 / lr,), lrs=(lr,))


# --------------------------------------------------------------------------------------------------
# the pure control law
# --------------------------------------------------------------------------------------------------
def _law(**kwargs: Any) -> ControlSettings:
    """Settings with the sharpness gauge's defaults resolved (max_factor 4, band_goal "center")."""
    return ControlSettings(**kwargs).with_goal_for("sharpness")


def test_defaults_bound_the_change_and_the_total_factor() -> None:
    s = ControlSettings(band=(1.1, 1.5))
    assert (s.max_change, s.max_factor, s.band_goal, s.approach, s.warmup_steps, s.gauge) == (
        1.5, "auto", "auto", "jump", 100, "auto")
    law = s.with_goal_for("sharpness")
    assert (law.max_factor, law.band_goal) == (4.0, "center")
    # far below the band (0.05): a jump to the lower edge (x22) would be allowed, max_factor=4 stops it
    d = control.decide(law, ControlState(), _reading(100, 0.05), [0.1], 100)
    assert d.state.factor == 4.0
    gradual = replace(law, approach="gradual")
    state = ControlState()
    factors = []
    for k in range(10):  # gradual: the factor rises by 1.5 per decision to 4
        step = 100 + 10 * k
        d = control.decide(gradual, state, _reading(step, 0.05 * state.factor), [0.1], step)
        state = d.state
        factors.append(state.factor)
    assert factors[:3] == pytest.approx([1.5, 2.25, 3.375])
    assert factors[3:] == pytest.approx([4.0] * 7)
    # far above the band it falls, at most by 1.5 per decision, not below 1 / max_factor
    for k in range(10):
        step = 300 + 10 * k
        state = control.decide(law, state, _reading(step, 50.0 * state.factor), [0.1], step).state
    assert state.factor == pytest.approx(0.25)


def test_unresolved_auto_options_are_refused_by_the_law() -> None:
    s = ControlSettings(band=(1.1, 1.5))
    with pytest.raises(ValueError, match="with_goal_for"):
        control.decide(s, ControlState(), _reading(100, 0.5), [0.1], 100)
    with pytest.raises(ValueError, match="with_goal_for"):
        s.factor_bounds()
    bs = ControlSettings().with_goal_for("batch_sharpness")
    assert (bs.band, bs.band_goal, bs.max_factor) == ((0.7, 1.1), "cautious", 16.0)
    # 16 is the bound for plain SGD: momentum and the Adam family (when adam_max_factor=None lets
    # max_factor bound its rises) take 4
    assert ControlSettings().for_optimizer(False, True).with_goal_for("batch_sharpness").max_factor == 4.0
    adam = ControlSettings(adam_max_factor=None).for_optimizer(True).with_goal_for("batch_sharpness")
    assert adam.max_factor == 4.0 and adam.factor_bounds() == (0.25, 4.0)
    given = ControlSettings(band_goal="edge", max_factor=None).with_goal_for("batch_sharpness")
    assert (given.band_goal, given.max_factor) == ("edge", None)  # explicit values are kept


def test_jump_lands_on_the_lower_edge_and_cautious_raises_to_it() -> None:
    """Batch-sharpness defaults: band (0.7, 1.1), band_goal "cautious", max_factor 16, max_change 1.5."""
    law = ControlSettings().with_goal_for("batch_sharpness")
    lr = 0.1

    def ratio_at(curvature: float, f: float) -> Reading:  # the ratio the steps at factor f had
        return _reading(0, curvature * lr * f / 2.0, lr * f)

    # ratio 0.1: one decision to the lower edge (x7), not five at x1.5
    d = control.decide(law, ControlState(), replace(ratio_at(2.0, 1.0), step=100), [lr], 100)
    assert d.state.factor == pytest.approx(7.0)
    # just below the band (0.63 at factor 7): raised to the edge 0.7 (x1.11), not the centre (x1.39)
    d = control.decide(law, d.state, replace(ratio_at(1.8, 7.0), step=110), [lr], 110)
    assert d.state.factor == pytest.approx(7.0 * 0.7 / 0.63)
    # above the band: down to the centre sqrt(0.7 * 1.1), at most / 1.5
    f = d.state.factor
    d = control.decide(law, d.state, replace(ratio_at(1.2 * 2.0 / (lr * f), f), step=120), [lr], 120)
    assert d.state.factor == pytest.approx(f * math.sqrt(0.7 * 1.1) / 1.2)
    # a jump never projects above the lower edge; gradual takes the old 1.5 steps
    d = control.decide(replace(law, approach="gradual"), ControlState(), replace(ratio_at(2.0, 1.0), step=100),
                       [lr], 100)
    assert d.state.factor == pytest.approx(1.5)
    # target mode: the jump goes to the target itself
    target = ControlSettings(target_ratio=0.8).with_goal_for("batch_sharpness")
    d = control.decide(target, ControlState(), replace(ratio_at(2.0, 1.0), step=100), [lr], 100)
    assert d.state.factor == pytest.approx(8.0)


def test_warmup_observes_only_and_skipped_readings_never_change_the_factor() -> None:
    s = _law(target_ratio=1.0, warmup_steps=50)
    d = control.decide(s, ControlState(), _reading(20, 0.1), [0.1], 20)
    assert d.used and not d.changed and d.state.factor == 1.0 and d.state.smoothed == [pytest.approx(2.0)]
    state = ControlState(factor=2.0, smoothed=[3.0])
    for bad in (math.nan, math.inf, -1.0, 0.0):
        d = control.decide(s, state, _reading(60, bad), [0.1], 60)
        assert not d.used and d.state.factor == 2.0 and d.state.n_skipped == 1 and d.warning
        assert d.state.smoothed == [3.0]  # the EMA is not touched either
    d = control.decide(s, state, Reading(60, (60, 0, 1.0), (1.0, 1.0), (20.0, 20.0), (0.1, 0.1)), [0.1], 60)
    assert not d.used and d.state.factor == 2.0 and "2 ratios for an optimizer with 1 param groups" in d.warning


def test_rollback_lowers_the_factor_and_holds_it() -> None:
    s = _law(band=(1.1, 1.5), warmup_steps=0, hold_steps=30, rollback_factor=0.5)
    state = ControlState(factor=3.0, smoothed=[5.0], losses=[1.0, 2.0])
    state = control.after_rollback(s, state, step=40)
    assert state.factor == 1.5 and state.hold_until == 70 and state.n_rollbacks == 1
    assert state.ceiling == pytest.approx(3.0 / 1.5)  # one max_change below the factor that diverged
    assert state.smoothed == [None] and state.losses == []
    # during the hold a reading below the band does not raise the factor; one above it lowers it
    d = control.decide(s, state, _reading(50, 0.2), [0.1], 50)
    assert d.used and d.state.factor == 1.5 and not d.changed
    d = control.decide(s, state, _reading(50, 3.0), [0.1], 50)
    assert d.state.factor < 1.5
    d = control.decide(s, state, _reading(70, 0.2), [0.1], 70)  # hold over: up to the ceiling only
    assert d.state.factor == pytest.approx(2.0)
    d = control.decide(s, d.state, _reading(80, 0.2), [0.1], 80)
    assert d.state.factor == pytest.approx(2.0)
    d = control.decide(s, d.state, _reading(90, 50.0), [0.1], 90)  # falling is always allowed
    assert d.state.factor < 2.0
    # a second rollback lowers the ceiling further
    again = control.after_rollback(s, replace(state, factor=1.9), step=100)
    assert again.ceiling == pytest.approx(1.9 / 1.5) and again.factor == pytest.approx(0.95)
    # the floor is 1 / max_factor
    low = control.after_rollback(s, ControlState(factor=0.3), 0)
    assert low.factor == pytest.approx(0.25)


def test_loss_alarm() -> None:
    s = ControlSettings(band=(1.1, 1.5), spike_factor=4.0, spike_window=10)
    assert "non-finite" in control.loss_alarm(s, [], math.nan)
    assert "non-finite" in control.loss_alarm(s, [], math.inf)
    assert control.loss_alarm(s, [1.0] * 4, 100.0) is None  # fewer than spike_window // 2 losses known
    assert control.loss_alarm(s, [1.0] * 5, 3.9) is None
    assert "spike_factor=4" in control.loss_alarm(s, [1.0] * 5, 4.1)
    assert control.loss_alarm(ControlSettings(band=(1.1, 1.5), spike_factor=None), [1.0] * 20, 1e9) is None
    state = ControlState()
    for i in range(25):
        control.record_loss(s, state, float(i))
    assert state.losses == [float(i) for i in range(15, 25)]


def test_adam_family_bound() -> None:
    s = _law(band=(1.1, 1.5))
    assert s.for_optimizer(False) is s
    assert s.for_optimizer(True).factor_bounds() == (0.25, 1.0)  # the controller only lowers Adam's lr by default
    assert _law(band=(1.1, 1.5), adam_max_factor=2.0).for_optimizer(True).factor_bounds() == (0.25, 2.0)
    assert _law(band=(1.1, 1.5), adam_max_factor=None).for_optimizer(True).factor_bounds() == (0.25, 4.0)
    unbounded = _law(band=(1.1, 1.5), max_factor=None, adam_max_factor=8.0)
    assert unbounded.for_optimizer(True).factor_bounds() == (0.0, 8.0)
    state = ControlState()
    law = s.for_optimizer(True)
    for k in range(5):
        state = control.decide(law, state, _reading(100 + 10 * k, 0.1 * state.factor), [0.1], 100 + 10 * k).state
    assert state.factor == 1.0
    state = control.decide(law, state, _reading(200, 5.0), [0.1], 200).state
    assert state.factor < 1.0


def test_no_jump_while_the_schedule_rises() -> None:
    """Before: under a warm-up schedule (OneCycleLR, linear warm-up) the jump put the ratio on the lower
    edge at the scheduled lr of the decision, and the schedule then carried it past the band before the
    next reading (a stub OneCycleLR run, readings every 25 steps: 24 steps above the band, ratio up to
    1.8; gradual: none)."""
    law = ControlSettings().with_goal_for("batch_sharpness")
    state = control.decide(law, ControlState(), _reading(50, 0.05, lr=0.01), [0.01], 50).state  # warm-up
    assert state.last_scheduled == [0.01]
    rising = control.decide(law, state, _reading(100, 0.05, lr=0.02), [0.02], 100)
    assert rising.state.factor == pytest.approx(1.5)  # bounded by max_change
    flat = control.decide(law, state, _reading(100, 0.05, lr=0.01), [0.01], 100)
    assert flat.state.factor == pytest.approx(14.0)  # the jump to the lower edge 0.7
    falling = control.decide(law, state, _reading(100, 0.05, lr=0.005), [0.005], 100)
    assert falling.state.factor == pytest.approx(14.0)


def test_state_round_trips_and_version_1_states_load() -> None:
    state = ControlState(factor=2.0, smoothed=[1.0, None], n_measurements=3, n_decisions=2, n_skipped=1,
                         n_rollbacks=1, last_ratio=1.2, last_key=(10, 0, 4.0), hold_until=50, ceiling=2.5,
                         losses=[0.5], last_scheduled=[0.1, 0.01])
    d = state.state_dict()
    assert ControlState.from_state_dict(d) == state
    v1 = {"version": 1, "factor": 2.0, "smoothed": [1.0], "n_measurements": 1, "n_decisions": 1, "n_skipped": 0,
          "last_ratio": None, "last_key": None}
    assert ControlState.from_state_dict(v1).n_rollbacks == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gauge": "lambda_max"}, "gauge must be one of 'sharpness', 'batch_sharpness', 'auto'"),
        ({"max_factor": 0.5}, "max_factor"),
        ({"max_factor": math.inf}, "max_factor"),
        ({"max_factor": "big"}, 'max_factor must be "auto", None'),
        ({"band_goal": "middle"}, "band_goal must be one of 'center', 'edge', 'cautious', 'auto'"),
        ({"approach": "fast"}, "approach must be one of 'jump', 'gradual'"),
        ({"spike_factor": 1.0}, "spike_factor"),
        ({"spike_window": 1}, "spike_window"),
        ({"rollback_factor": 1.0}, "rollback_factor"),
        ({"hold_steps": -1}, "hold_steps"),
        ({"adam_max_factor": 0.9}, "adam_max_factor"),
    ],
)
def test_new_options_are_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=f"InstabilityController: {match}"):
        InstabilityController(band=(1.1, 1.5), **kwargs)


def test_choices_are_literal_types_for_the_cli() -> None:
    hints = typing.get_type_hints(InstabilityController.__init__)
    assert typing.get_args(hints["gauge"]) == ("sharpness", "batch_sharpness", "auto")
    assert typing.get_args(hints["band_goal"]) == ("center", "edge", "cautious", "auto")
    assert typing.get_args(hints["approach"]) == ("jump", "gradual")
    assert typing.get_args(hints["after_stop"]) == ("reset", "hold")


def test_control_module_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = "import sys, lightning_rpe.control; print(any(m.split('.')[0] == 'lightning' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------
# the divergence guard in training
# --------------------------------------------------------------------------------------------------
class FaultyModel(TinyModel):
    """TinyModel whose loss at the given optimizer steps is multiplied by ``scale`` (NaN or a spike)."""

    def __init__(self, faults: dict[int, float], momentum: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.faults = faults
        self.momentum = momentum
        self.params_at_start: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.params_at_start.append({k: v.detach().clone() for k, v in self.state_dict().items()})

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch) * self.faults.get(self.trainer.global_step, 1.0)
        self.log("train_loss", loss, on_step=True, batch_size=len(batch[0]))
        return loss

    def configure_optimizers(self):
        if not self.momentum:
            return super().configure_optimizers()
        return RecordingSGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def _guarded(**kwargs: Any) -> InstabilityController:
    options: dict[str, Any] = {"target_ratio": 1.0, "warmup_steps": 0, "gauge": "sharpness", "hold_steps": 5}
    options.update(kwargs)
    return InstabilityController(**options)


def test_nan_loss_rolls_back_model_and_optimizer_lowers_and_holds_the_factor() -> None:
    torch.manual_seed(0)
    model = FaultyModel({12: math.nan}, momentum=0.9, lr=0.01)
    monitor = StubMonitor(lambda s: 10.0, every=4)  # ratio 0.05 at factor 1: the controller raises the lr
    controller = _guarded(max_change=1.5, max_factor=4.0, approach="gradual")
    logger = CaptureLogger()
    with pytest.warns(UserWarning, match=r"non-finite training loss \(nan\) at step 13: rolled the model"):
        fit(model, [monitor, controller], max_steps=20, logger=logger)
    assert controller.state.n_rollbacks == 1
    weights = [v for v in model.state_dict().values()]
    assert all(bool(torch.isfinite(w).all()) for w in weights)
    # the parameters after the rollback (at the start of step 13) are those at the start of an earlier
    # step whose loss passed the guard: the last snapshot
    restored = model.params_at_start[13]
    assert any(all(torch.equal(restored[k], p[k]) for k in restored) for p in model.params_at_start[:12])
    momentum = model.trainer.optimizers[0].state
    assert all(bool(torch.isfinite(s["momentum_buffer"]).all()) for s in momentum.values())
    # the factor: 1.5 at step 4, 2.25 at 8, 3.375 at 12; halved at the rollback, held for 5 steps
    used = [u[0] / 0.01 for u in model.optimizers().optimizer.used]
    assert used[12] == pytest.approx(3.375)
    assert used[13:16] == pytest.approx([1.6875] * 3)
    assert max(used[13:18]) == pytest.approx(1.6875)  # no increase before step 18
    assert logger.series("rpe/rollbacks")[13] == 1.0
    assert controller.snapshot_bytes == sum(p.numel() * 4 for p in model.parameters()) * 2  # weights + momentum


class TwoOptimizers(FaultyModel):
    """Manual optimization with two momentum optimizers (weight and bias), both stepping every batch."""

    def __init__(self, faults: dict[int, float], **kwargs: Any) -> None:
        super().__init__(faults, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        for opt in self.optimizers():
            loss = self.compute_loss(batch) * self.faults.get(self.trainer.global_step, 1.0)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return [torch.optim.SGD([self.net.weight], lr=self.lr, momentum=0.9),
                torch.optim.SGD([self.net.bias], lr=self.lr, momentum=0.9)]


def test_rollback_restores_every_optimizers_state() -> None:
    # A NaN loss at global step 12 (the first optimizer's step) poisons both optimizers' momentum. The
    # rollback restored the model and only the first optimizer's state: the second's NaN momentum
    # then broke the restored model again.
    torch.manual_seed(0)
    model = TwoOptimizers({12: math.nan}, lr=0.01)
    controller = _guarded(max_factor=4.0)
    with pytest.warns(UserWarning, match="rolled the model and optimizer state back"):
        fit(model, [StubMonitor(lambda s: 10.0, every=4), controller], max_steps=24)
    assert controller.state.n_rollbacks == 1
    for opt in model.trainer.optimizers:
        assert all(bool(torch.isfinite(st["momentum_buffer"]).all()) for st in opt.state.values())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_loss_spike_rolls_back_and_an_ordinary_run_never_does() -> None:
    model = FaultyModel({15: 50.0}, lr=0.01)
    controller = _guarded(spike_window=6)
    with pytest.warns(UserWarning, match="more than spike_factor=4 times its recent median"):
        fit(model, [StubMonitor(lambda s: 10.0, every=4), controller], max_steps=20)
    assert controller.state.n_rollbacks == 1
    quiet = FaultyModel({}, lr=0.01)
    controller = _guarded(spike_window=6)
    fit(quiet, [StubMonitor(lambda s: 10.0, every=4), controller], max_steps=20)
    assert controller.state.n_rollbacks == 0


def test_a_spike_at_the_scheduled_lr_is_not_rolled_back_but_a_nan_is() -> None:
    # ratio 10 * 0.01 / 2 = 0.05 = the target: the factor stays 1 (as Adam's under the default
    # adam_max_factor=1). An outlier batch (a 50x loss) is not the controller's doing: before, it was
    # rolled back (5 rollbacks and a quartered lr in a review's Adam run with one outlier per epoch).
    model = FaultyModel({15: 50.0}, lr=0.01)
    controller = _guarded(target_ratio=0.05, spike_window=6)
    fit(model, [StubMonitor(lambda s: 10.0, every=4), controller], max_steps=20)
    assert controller.state.n_rollbacks == 0 and controller.state.factor == 1.0
    model = FaultyModel({15: math.nan}, lr=0.01)
    controller = _guarded(target_ratio=0.05, spike_window=6)
    with pytest.warns(UserWarning, match="non-finite training loss"):
        fit(model, [StubMonitor(lambda s: 10.0, every=4), controller], max_steps=20)
    assert controller.state.n_rollbacks == 1


def test_the_spike_test_uses_the_factor_the_step_ran_at_not_the_one_decided_on_its_batch() -> None:
    # factor 4 from step 4 (ratio 0.05, target 1, max_factor 4); the step taken at factor 4 from step 11
    # spikes (50x), and the measurement after it (curvature 400: ratio 8) cuts the factor to 1 in the same
    # on_train_batch_end, before the spike test. Reading the factor then, the spike went unrolled (a review).
    model = FaultyModel({11: 50.0}, lr=0.01)
    monitor = ListeningStub(lambda s: 10.0 if s < 12 else 400.0, every=4)
    controller = _guarded(max_change=4.0, max_factor=4.0, approach="gradual", spike_window=6)
    with pytest.warns(UserWarning, match="more than spike_factor=4 times its recent median"):
        fit(model, [monitor, controller], max_steps=16)
    assert controller.state.n_rollbacks == 1


def test_no_rollback_while_the_controller_does_not_act() -> None:
    model = FaultyModel({3: 50.0}, lr=0.01)
    controller = _guarded(warmup_steps=10, spike_window=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*treespec.*")
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        fit(model, [StubMonitor(lambda s: 10.0, every=4), controller], max_steps=8)
    assert controller.state.n_rollbacks == 0


def test_rollback_keeps_the_scheduled_lr() -> None:
    def sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

    model = FaultyModel({9: math.nan}, lr=0.01, scheduler=sched)
    controller = _guarded(max_factor=4.0)
    with pytest.warns(UserWarning, match="rolled the model"):
        fit(model, [StubMonitor(lambda s: 10.0, every=4), controller], max_steps=14)
    scheduled = [s[0] for s in model.scheduled_at_start]
    assert scheduled == pytest.approx([0.01 * 0.9**k for k in range(14)], rel=1e-12)


# --------------------------------------------------------------------------------------------------
# reuse, listener, gauge
# --------------------------------------------------------------------------------------------------
def test_a_reused_controller_resets_on_a_fresh_fit() -> None:
    def run(controller: InstabilityController) -> tuple[dict[str, torch.Tensor], list[tuple[float, ...]]]:
        torch.manual_seed(1)
        model = TinyModel(lr=0.01)
        fit(model, [StubMonitor(lambda s: 10.0, every=2), controller], max_steps=12)
        return {k: v.clone() for k, v in model.state_dict().items()}, model.optimizers().optimizer.used

    reused = _guarded(max_factor=None, max_change=2.0)
    run(reused)
    assert reused.state.factor > 8
    w_again, used_again = run(reused)
    w_fresh, used_fresh = run(_guarded(max_factor=None, max_change=2.0))
    assert used_again == used_fresh
    for k in w_fresh:
        assert torch.equal(w_again[k], w_fresh[k])


class ListeningStub(StubMonitor):
    """A stub that, like the real monitor, calls its listeners before publishing, then rescales."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listeners: list[Any] = []
        self.scale_seen_by_listener_after: list[float] = []

    def measure(self, trainer: Any) -> None:
        super().measure(trainer)
        for listener in self.listeners:
            listener(trainer, self.latest)
        self.scale_seen_by_listener_after.append(self.lr_scale_provider()[0])


def test_listener_decides_before_the_monitor_publishes() -> None:
    monitor = ListeningStub(lambda s: 10.0, every=4)
    controller = _guarded(max_change=2.0, max_factor=None, approach="gradual")
    fit(TinyModel(lr=0.01), [monitor, controller], max_steps=9)
    assert controller.on_measurement in monitor.listeners or controller._monitor is None
    # right after each listener call the scale is already the new factor
    assert monitor.scale_seen_by_listener_after == pytest.approx([2.0, 4.0])
    assert monitor.listeners == []  # removed at teardown


def test_batch_sharpness_gauge_needs_the_monitor_to_measure_it() -> None:
    controller = InstabilityController(band=(1.1, 1.5), gauge="batch_sharpness")
    with pytest.raises(ValueError, match=r"SharpnessMonitor\(batch_sharpness=True\)"):
        fit(TinyModel(), [StubMonitor(lambda s: 1.0), controller], max_steps=2)
    auto = InstabilityController(band=(1.1, 1.5))
    fit(TinyModel(), [StubMonitor(lambda s: 1.0), auto], max_steps=2)  # full batch: the sharpness
    assert auto.active_gauge == "sharpness"


def test_a_band_out_of_reach_of_the_factor_bound_is_said_once() -> None:
    ctrl = InstabilityController(band=(1.1, 1.5), warmup_steps=0, max_factor=2.0)
    monitor = SharpnessMonitor(every_n_steps=2, probe_size=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([monitor, ctrl], max_steps=20).fit(TinyMLP(optimizer="sgd", lr=0.01), full_batch_loader(16))
    said = [str(w.message) for w in record if "stays below the goal" in str(w.message)]
    assert len(said) == 1 and "max_factor=2.0" in said[0]
    assert ctrl.state.factor == pytest.approx(2.0) and monitor.latest.stability_ratio < 1.1


# --------------------------------------------------------------------------------------------------
# what gauge="auto" steers, the default band per gauge, a stop_step given as a fraction of the run
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("full_batch", "adam_family", "measured", "expected"),
    [
        (True, False, True, "sharpness"),  # full-batch GD: the batch sharpness is ~0 before the edge
        (True, False, False, "sharpness"),
        (False, True, True, "sharpness"),  # Adam: its preconditioned sharpness
        (False, False, False, "sharpness"),  # minibatch SGD, the monitor does not measure it
        (False, False, True, "batch_sharpness"),  # minibatch SGD
    ],
)
def test_auto_gauge_rule(full_batch: bool, adam_family: bool, measured: bool, expected: str) -> None:
    got = control.resolve_gauge("auto", full_batch=full_batch, adam_family=adam_family,
                                batch_sharpness_measured=measured)
    assert got == expected
    for explicit in ("sharpness", "batch_sharpness"):  # an explicit gauge is kept
        assert control.resolve_gauge(explicit, full_batch=full_batch, adam_family=adam_family,  # type: ignore[arg-type]
                                     batch_sharpness_measured=measured) == explicit


def test_default_band_per_gauge_and_fractional_stop_step() -> None:
    s = ControlSettings()
    assert s.band is None and s.target_ratio is None
    assert s.with_goal_for("sharpness").band == control.DEFAULT_BANDS["sharpness"] == (1.1, 1.5)
    assert s.with_goal_for("batch_sharpness").band == control.DEFAULT_BANDS["batch_sharpness"]
    assert ControlSettings(band=(0.5, 0.9)).with_goal_for("batch_sharpness").band == (0.5, 0.9)
    assert ControlSettings(target_ratio=1.2).with_goal_for("sharpness").band is None
    frac = ControlSettings(stop_step=0.9, start_step=5)
    assert frac.for_run(600).stop_step == 540 and frac.for_run(3).stop_step == 6 and frac.for_run(None).stop_step is None
    assert ControlSettings(stop_step=50).for_run(600).stop_step == 50
    with pytest.raises(ValueError, match="for_run"):
        control.phase(frac, 10)


def test_controller_without_band_uses_the_gauge_default_and_stops_at_the_fraction() -> None:
    lr = 0.1
    model, monitor = TinyModel(lr=lr), StubMonitor(lambda s: 10.0)  # ratio 0.5 at factor 1
    controller = InstabilityController(warmup_steps=2, stop_step=0.5, max_change=2.0)
    fit(model, [monitor, controller], max_steps=12)
    assert controller.active_gauge == "sharpness" and controller.band == control.DEFAULT_BANDS["sharpness"]
    assert controller.stop_step == 6 and controller.settings.stop_step == 0.5
    used = [u[0] / lr for u in model.optimizers().optimizer.used]
    # ratio 0.5 at factor 1, below the band: one jump to its lower edge 1.1 (x2.2 > max_change 2; the centre
    # would be x2.57), then in the band; factor 1 again from step 6 = 0.5 * 12 on
    assert used == pytest.approx([1.0, 1.0] + [2.2] * 4 + [1.0] * 6, rel=1e-12)


@pytest.mark.parametrize(("stop_step", "warns"), [(0.9, True), (5, True), (11, False)])
def test_a_stop_step_inside_the_warmup_warns(stop_step: float, warns: bool) -> None:
    """stop_step=0.9 of a 12-step run is step 11 (round(10.8)), inside the default 100-step warm-up: it would never act."""
    warmup = 100 if isinstance(stop_step, float) else 10
    controller = InstabilityController(stop_step=stop_step, warmup_steps=warmup if stop_step != 11 else 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TinyModel(lr=0.1), [StubMonitor(lambda s: 10.0), controller], max_steps=12)
    said = [str(w.message) for w in caught if "not after the warm-up" in str(w.message)]
    assert len(said) == int(warns)
    if warns:
        assert f"stop_step is step {controller.stop_step}," in said[0]


def test_a_fractional_stop_step_in_a_run_without_a_length_warns_and_never_stops() -> None:
    class StopAt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
            trainer.should_stop = trainer.global_step >= 6

    controller = InstabilityController(stop_step=0.5, warmup_steps=1)
    with pytest.warns(UserWarning, match=r"stop_step=0.5 is a fraction .* no known length"):
        fit(TinyModel(lr=0.1), [StubMonitor(lambda s: 10.0), controller, StopAt()], max_steps=-1, max_epochs=-1)
    assert controller.stop_step is None and controller.factor > 1.0  # controlled to the end


def test_batch_sharpness_gauge_without_the_measurement_raises_before_any_band_advice() -> None:
    loader = make_loader(make_dataset(32), batch_size=8)
    controller = InstabilityController(gauge="batch_sharpness", band=(1.1, 1.5), warmup_steps=0)
    monitor = SharpnessMonitor(every_n_steps=2, probe_size=32, lambda_min=False)  # no batch sharpness
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match="does not measure"):
        warnings.simplefilter("always")
        make_trainer([monitor, controller], max_steps=2).fit(TinyMLP(optimizer="sgd", lr=0.05), loader)
    assert not [w for w in caught if "asks the batch sharpness" in str(w.message)]


def test_minibatch_sgd_auto_steers_the_batch_sharpness_and_warns_on_a_band_above_it() -> None:
    loader = make_loader(make_dataset(32), batch_size=8)
    auto = InstabilityController(warmup_steps=0)
    monitor = SharpnessMonitor(every_n_steps=2, probe_size=32, batch_sharpness=2, lambda_min=False)
    make_trainer([monitor, auto], max_steps=4).fit(TinyMLP(optimizer="sgd", lr=0.05), loader)
    assert auto.active_gauge == "batch_sharpness" and auto.band == control.DEFAULT_BANDS["batch_sharpness"]
    above = InstabilityController(band=(1.1, 1.5), warmup_steps=0)
    monitor = SharpnessMonitor(every_n_steps=2, probe_size=32, batch_sharpness=2, lambda_min=False)
    with pytest.warns(UserWarning, match="does not rise above"):
        make_trainer([monitor, above], max_steps=2).fit(TinyMLP(optimizer="sgd", lr=0.05), loader)


def test_adam_step_zero_nan_ratio_is_not_warned_and_repr_shows_the_band() -> None:
    ctrl = InstabilityController(warmup_steps=0)
    assert "the gauge's default" in repr(ctrl)
    monitor = SharpnessMonitor(every_n_steps=2, probe_size=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([monitor, ctrl], max_steps=4).fit(TinyMLP(optimizer="adam", lr=0.01), full_batch_loader(16))
    assert not [w for w in record if "no usable stability ratio" in str(w.message)]
    assert "band=(1.1, 1.5)" in repr(ctrl)


class _MomentumInTheSecondGroup(TinyModel):
    def configure_optimizers(self):  # noqa: D102
        return RecordingSGD([{"params": [self.net.weight], "lr": 0.01},
                             {"params": [self.net.bias], "lr": 0.01, "momentum": 0.9}], lr=0.01)


@pytest.mark.parametrize("param_groups, expected", [([0], 16.0), (None, 4.0)])
def test_auto_max_factor_looks_at_the_momentum_of_the_controlled_groups_only(param_groups, expected) -> None:
    """Before: momentum in a group the controller leaves alone gave the controlled plain-SGD group the
    momentum bound (4) instead of the batch sharpness's (16)."""
    monitor = StubMonitor(lambda step: 10.0)
    monitor.batch_sharpness = True  # the stub's readings carry no batch sharpness: only the resolution is tested
    controller = InstabilityController(gauge="batch_sharpness", param_groups=param_groups, warmup_steps=0)
    assert controller.max_factor == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(_MomentumInTheSecondGroup(), [monitor, controller], max_steps=2)
    assert (controller.max_factor, controller.band_goal) == (expected, "cautious")


def test_auto_gauge_steers_the_sharpness_where_the_batch_sharpness_is_not_computed() -> None:
    # On a sharded model the monitor does not compute the batch sharpness although asked: the auto gauge
    # chose it anyway, and every decision was skipped ("no usable stability ratio") with the factor at 1.
    monitor = SharpnessMonitor(batch_sharpness=True)
    assert monitor.measures_batch_sharpness
    monitor._sharded = True  # what setup finds under FSDP / ModelParallelStrategy
    assert not monitor.measures_batch_sharpness
    controller = InstabilityController()
    controller._monitor = monitor
    controller._choose_gauge(SimpleNamespace(num_training_batches=10, accumulate_grad_batches=1))
    assert controller.active_gauge == "sharpness"
    explicit = InstabilityController(gauge="batch_sharpness")
    explicit._monitor = monitor
    with pytest.raises(ValueError, match="a sharded model"):
        explicit._choose_gauge(SimpleNamespace(num_training_batches=10, accumulate_grad_batches=1))


def test_a_subset_of_groups_is_refused_on_a_sharded_model() -> None:
    # the monitor does not compute the controlled groups' own ratio on sharded vectors: every decision
    # was skipped ("no usable stability ratio") without saying why (a review)
    monitor = SharpnessMonitor()
    monitor._sharded = True  # what setup finds under FSDP / ModelParallelStrategy
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    controller = InstabilityController(param_groups=[0])
    controller._monitor = monitor
    with pytest.raises(ValueError, match=r"param_groups=\[0\] is a subset .* sharded model"):
        controller.on_fit_start(SimpleNamespace(optimizers=[opt]), None)
