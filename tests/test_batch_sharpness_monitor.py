"""SharpnessMonitor(batch_sharpness=...): the core's value against the pure function, logging,
invisibility, options; the listener and the ratio at the next lr; gauge='auto' under minibatch SGD."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lit_models import (
    TinyMLP,
    full_batch_loader,
    make_dataset,
    make_loader,
    make_trainer,
)
from test_controller import legacy_controller

from lightning_rpe import InstabilityController, SharpnessMonitor
from lightning_rpe.curvature import batch_sharpness, sample_minibatches
from lightning_rpe.measure import Measurement
from lightning_rpe.stability import adam_preconditioner

torch.set_num_threads(1)


def monitor(**kwargs: Any) -> SharpnessMonitor:
    defaults: dict[str, Any] = {"every_n_steps": 4, "top_k": 1, "lambda_min": False, "grad_alignment": False,
                                "on_fit_start": False, "on_fit_end": False, "custom_scalars": False,
                                "dtype": "float64", "tol": 1e-8, "batch_sharpness": 5}
    defaults.update(kwargs)
    return SharpnessMonitor(**defaults)


def loader(batch_size: int = 8, n: int = 48) -> Any:
    return make_loader(make_dataset(n, seed=3), batch_size=batch_size, shuffle=True)


def _reference(model: TinyMLP, mon: SharpnessMonitor, m: Measurement, batch_size: int,
               scales: torch.Tensor | None = None) -> Any:
    batches = sample_minibatches(mon.probe_batches, batch_size, mon.settings.batch_sharpness,
                                 mon.settings.minibatch_generator(m.step))
    return batch_sharpness(model, lambda mod, b: mod.compute_loss(b), batches, dtype=torch.float64, scales=scales)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_monitor_batch_sharpness_equals_the_pure_function(optimizer: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyMLP(hidden=8, lr=0.05, optimizer=optimizer)
    mon = monitor()
    make_trainer([mon], max_steps=12).fit(model, loader())
    m = mon.latest
    assert m is not None and m.step == 12  # the parameters now are the measured ones
    ref = _reference(model, mon, m, batch_size=8)
    assert ref.n_batches == 5
    assert m.batch_sharpness == pytest.approx(ref.mean, rel=1e-9)
    assert m.batch_sharpness_se == pytest.approx(ref.std_error, rel=1e-9)
    # ratio = BS / threshold: lr / 2 for SGD, lr / (2 + 2 beta) with heavy-ball momentum
    assert m.batch_sharpness_ratio == pytest.approx(m.batch_sharpness / m.thresholds[0], rel=1e-9)
    k = 2.0 if optimizer == "sgd" else 2.0 + 2 * 0.9
    assert m.thresholds[0] == pytest.approx(k / 0.05)
    for name in ("rpe/batch_sharpness", "rpe/batch_sharpness_se", "rpe/batch_sharpness_ratio"):
        assert name in mon.metrics(m)


def test_adam_batch_sharpness_is_the_preconditioned_one() -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyMLP(hidden=8, lr=0.01, optimizer="adam")
    mon = monitor()
    make_trainer([mon], max_steps=8).fit(model, loader())
    m = mon.latest
    pre = adam_preconditioner(model.trainer.optimizers[0])
    inverse = torch.cat([1.0 / pre[p].reshape(-1) for p in model.parameters()]).double()
    ref = _reference(model, mon, m, batch_size=8, scales=inverse)
    assert m.batch_sharpness == pytest.approx(ref.mean, rel=1e-6)
    assert m.batch_sharpness_ratio == pytest.approx(m.batch_sharpness / m.thresholds[0], rel=1e-9)


def test_full_batch_uses_the_whole_probe_set_once() -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyMLP(hidden=8, lr=0.05)
    mon = monitor()
    make_trainer([mon], max_steps=8).fit(model, full_batch_loader(n=32))
    m = mon.latest
    params = list(model.parameters())
    loss = model.compute_loss(mon.probe_batches[0])
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params, create_graph=True)])
    hg = torch.cat([x.reshape(-1) for x in torch.autograd.grad(g, params, grad_outputs=g.detach())])
    gd = g.detach()
    assert m.batch_sharpness == pytest.approx(float(gd @ hg / (gd @ gd)), rel=1e-5)
    assert m.batch_sharpness_se is None  # one mini-batch: no standard error


def test_batch_sharpness_is_invisible_to_training() -> None:
    def run(callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
        pl.seed_everything(1, verbose=False)
        model = TinyMLP(hidden=8, lr=0.05, dropout=0.1, optimizer="momentum")
        make_trainer(callbacks, max_steps=10).fit(model, loader())
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain = run([])
    measured = run([monitor(every_n_steps=3, dtype="float32", tol=1e-3)])
    for k, v in plain.items():
        assert torch.equal(v, measured[k]), k


def test_option_validation() -> None:
    assert SharpnessMonitor().settings.batch_sharpness == 0
    assert SharpnessMonitor(batch_sharpness=True).settings.batch_sharpness == 16
    assert SharpnessMonitor(batch_sharpness=3).settings.batch_sharpness == 3
    for bad in (0, -2, "yes", 2.5):
        with pytest.raises(ValueError, match="SharpnessMonitor: batch_sharpness"):
            SharpnessMonitor(batch_sharpness=bad)


def test_listener_decides_first_and_the_logged_ratio_is_at_the_next_lr() -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyMLP(hidden=8, lr=0.05)
    mon = monitor(batch_sharpness=False)
    ctrl = legacy_controller(target_ratio=0.9, max_change=3.0)
    seen: list[tuple[Measurement, list[float]]] = []

    class Spy(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            mon.listeners.append(lambda tr, m: seen.append((m, list(ctrl.lr_scales()))))

    make_trainer([mon, ctrl, Spy()], max_steps=16).fit(model, full_batch_loader(n=32))
    assert ctrl.on_measurement not in mon.listeners  # removed at teardown
    assert len(seen) == 4
    m_raw, scale_after = seen[-1]
    latest = mon.latest
    assert latest.step == m_raw.step
    # the controller (registered first) had decided when the spy was called; the measurement the
    # monitor keeps and logs is restated at the lr of the next step
    assert latest.lrs[0] == pytest.approx(0.05 * scale_after[0], rel=1e-12)
    assert latest.ratios[0] == pytest.approx(latest.sharpness * latest.lrs[0] / 2, rel=1e-9)
    assert latest.stability_ratio == pytest.approx(latest.ratios[0], rel=1e-9)
    assert m_raw.ratios[0] == pytest.approx(m_raw.sharpness * m_raw.lrs[0] / 2, rel=1e-9)
    assert any(abs(s[0].lrs[0] / 0.05 - s[1][0]) > 1e-9 for s in seen)  # decisions changed the factor


def test_gauges_under_minibatch_sgd() -> None:
    """gauge='auto' steers the batch sharpness under minibatch SGD when the monitor measures it, in the
    gauge's default band; gauge='sharpness' the sharpness; gauge='batch_sharpness' the monitor's
    batch-sharpness ratio."""
    def run(gauge: str) -> tuple[SharpnessMonitor, InstabilityController]:
        pl.seed_everything(0, verbose=False)
        mon = monitor(every_n_steps=2, dtype="float32", tol=1e-3)
        ctrl = InstabilityController(warmup_steps=4, gauge=gauge)  # type: ignore[arg-type]
        make_trainer([mon, ctrl], max_steps=16).fit(TinyMLP(hidden=8, lr=0.02), loader())
        return mon, ctrl

    mon, ctrl = run("auto")
    assert ctrl.active_gauge == "batch_sharpness" and ctrl.band == (0.7, 1.1)
    mon, ctrl = run("sharpness")
    assert ctrl.active_gauge == "sharpness" and ctrl.band == (1.1, 1.5)
    assert ctrl.state.last_key[2] == pytest.approx(mon.latest.sharpness)
    mon, ctrl = run("batch_sharpness")
    assert ctrl.active_gauge == "batch_sharpness"
    assert mon.latest.batch_sharpness_ratio is not None and math.isfinite(mon.latest.batch_sharpness_ratio)
    assert ctrl.state.n_measurements >= 6 and ctrl.state.n_decisions >= 1
    assert ctrl.state.last_key[2] == pytest.approx(mon.latest.sharpness)  # the key: the (lr-free) sharpness


def test_one_decision_per_batch_sharpness_measurement() -> None:
    """The monitor restates monitor.latest at the new lr after a decision; the controller must not take
    the restated batch-sharpness ratio for a new measurement (it decided twice: 1.5**2 per measurement)."""
    pl.seed_everything(0, verbose=False)
    mon = monitor(every_n_steps=4, dtype="float32", tol=1e-3)
    ctrl = InstabilityController(gauge="batch_sharpness", target_ratio=50.0, warmup_steps=0, max_change=1.5, approach="gradual",
                                 max_factor=None)
    make_trainer([mon, ctrl], max_steps=16).fit(TinyMLP(hidden=8, lr=0.02), loader())
    assert mon.n_measurements == 4
    assert ctrl.state.n_measurements == 4 and ctrl.state.n_decisions == 4
    assert ctrl.factor == pytest.approx(1.5**4)  # far below the target: one max_change step per measurement


@pytest.mark.parametrize(("goal", "named"), [({"band": (1.1, 1.5)}, "band=(1.1, 1.5)"),
                                             ({"target_ratio": 1.3}, "target_ratio=1.3")])
def test_a_goal_above_the_edge_of_stochastic_stability_warns(goal: dict[str, Any], named: str) -> None:
    """A band or a target above 1 for the batch sharpness under minibatch SGD cannot be reached: both warn."""
    pl.seed_everything(0, verbose=False)
    ctrl = InstabilityController(warmup_steps=2, **goal)
    with pytest.warns(UserWarning, match=rf"{re.escape(named)} asks the batch sharpness to stay above"):
        make_trainer([monitor(every_n_steps=4, dtype="float32", tol=1e-3), ctrl], max_steps=4).fit(
            TinyMLP(hidden=8, lr=0.02), loader())
    assert ctrl.active_gauge == "batch_sharpness"


def test_gradient_accumulation_measures_the_optimizer_step_batch() -> None:
    """With accumulate_grad_batches=2 and batch 8 a step's gradient is the mean over 16 samples: the
    batch sharpness uses mini-batches of 16, the same value as batch 16 without accumulation."""
    def first(batch_size: int, accumulate: int) -> float:
        pl.seed_everything(0, verbose=False)
        mon = monitor(every_n_steps=1)  # after the first optimizer step, at lr 1e-12: the initial parameters
        make_trainer([mon], max_steps=1, accumulate_grad_batches=accumulate).fit(
            TinyMLP(hidden=8, lr=1e-12), make_loader(make_dataset(48, seed=3), batch_size=batch_size))
        assert mon.latest is not None and mon.latest.step == 1 and mon.latest.batch_sharpness is not None
        return float(mon.latest.batch_sharpness)

    assert first(8, 2) == pytest.approx(first(16, 1), rel=1e-9)
    assert first(8, 1) != pytest.approx(first(16, 1), rel=1e-3)


def test_auto_gauge_treats_accumulation_over_the_whole_epoch_as_full_batch() -> None:
    ctrl = InstabilityController(warmup_steps=0)
    mon = monitor(every_n_steps=1)
    make_trainer([mon, ctrl], max_steps=2, accumulate_grad_batches=6).fit(
        TinyMLP(hidden=8, lr=0.01), make_loader(make_dataset(48, seed=3), batch_size=8))
    assert ctrl.active_gauge == "sharpness"  # 6 batches of 8 = one step per epoch over all 48 samples
