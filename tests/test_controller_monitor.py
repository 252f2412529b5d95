"""InstabilityController with the real SharpnessMonitor: thresholds at the effective lr, the
no-op guarantee, checkpoint/resume, Adam's preconditioned ratio, logging through a real logger."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lit_models import TinyMLP, full_batch_loader, make_dataset, make_trainer
from test_controller import legacy_controller

from lightning_rpe.callbacks.instability_controller import InstabilityController
from lightning_rpe.callbacks.sharpness_monitor import Measurement, SharpnessMonitor

torch.set_num_threads(1)


class History(pl.Callback):
    def __init__(self, monitor: SharpnessMonitor, controller: InstabilityController | None = None) -> None:
        self.monitor = monitor
        self.controller = controller
        self.measurements: list[Measurement] = []
        self.scales: list[float] = []  # the controller's factor when each measurement was taken

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        m = self.monitor.latest
        if m is not None and (not self.measurements or m is not self.measurements[-1]):
            self.measurements.append(m)


def monitor(**kwargs: Any) -> SharpnessMonitor:
    defaults = dict(every_n_steps=4, top_k=1, lambda_min=False, grad_alignment=False, on_fit_start=False,
                    on_fit_end=False, custom_scalars=False, dtype="float64", tol=1e-8)
    defaults.update(kwargs)
    return SharpnessMonitor(**defaults)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_thresholds_use_the_effective_lr() -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyMLP(hidden=16, lr=0.05)
    mon = monitor()
    ctrl = legacy_controller(target_ratio=0.9, max_change=3.0)
    history = History(mon)
    make_trainer([mon, ctrl, history], max_steps=24).fit(model, full_batch_loader(n=64))
    ms = history.measurements
    assert len(ms) == 6
    # every measurement: the lr it reports is the scheduled lr (constant 0.05) times a factor the
    # controller chose, and the ratio is sharpness * lr_eff / 2 (plain GD)
    assert len({round(m.lrs[0], 12) for m in ms}) >= 3
    for m in ms:
        assert m.ratios[0] == pytest.approx(m.sharpness * m.lrs[0] / 2.0, rel=1e-9)
    # after a decision the ratio lands near the target (sharpness moves between measurements)
    assert abs(ms[-1].ratios[0] - 0.9) < 0.2
    assert ctrl.n_decisions >= 3


def test_disabled_controller_leaves_a_monitored_run_bit_identical() -> None:
    def run(extra: list[pl.Callback]) -> tuple[dict[str, torch.Tensor], list[float], Any]:
        pl.seed_everything(0, verbose=False)
        model = TinyMLP(hidden=16, lr=0.1, dropout=0.1, optimizer="momentum")
        mon = monitor(every_n_steps=3, dtype="float32", tol=1e-3)
        history = History(mon)
        trainer = make_trainer([mon, *extra, history], max_steps=12)
        trainer.fit(model, full_batch_loader(n=64))
        opt_state = trainer.optimizers[0].state_dict()
        return weights(model), [m.ratios[0] for m in history.measurements], opt_state

    w0, r0, s0 = run([])
    disabled = InstabilityController(band=(1.1, 1.5), enabled=False)
    w1, r1, s1 = run([disabled])
    assert r0 == r1
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    for p, state in s0["state"].items():
        assert torch.equal(state["momentum_buffer"], s1["state"][p]["momentum_buffer"])
    assert disabled.state_dict() == {}


def test_adam_preconditioned_ratio_is_steered() -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyMLP(hidden=16, optimizer="adam", lr=1e-3)
    mon = monitor(every_n_steps=5, dtype="float32", tol=1e-4)
    ctrl = legacy_controller(target_ratio=0.5, max_change=4.0)
    history = History(mon)
    make_trainer([mon, ctrl, history], max_steps=40).fit(model, full_batch_loader(n=64))
    ms = [m for m in history.measurements if m.preconditioned_sharpness is not None]
    assert len(ms) >= 6
    for m in ms:
        # Adam's threshold (2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr at the effective lr
        assert m.thresholds[0] == pytest.approx(38.0 / m.lrs[0], rel=1e-9)
        assert m.ratios[0] == pytest.approx(m.preconditioned_sharpness / m.thresholds[0], rel=1e-9)
    assert ctrl.factor != 1.0
    assert abs(math.log(ms[-1].ratios[0] / 0.5)) < math.log(2.0)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path: Any) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, every: int | None = None) -> tuple[Any, ...]:
        pl.seed_everything(0, verbose=False)
        model = TinyMLP(hidden=16, lr=0.05)
        mon = monitor(every_n_steps=4)
        ctrl = legacy_controller(band=(0.6, 0.9), smoothing=0.3, max_change=1.8, warmup_steps=4)
        history = History(mon)
        callbacks: list[pl.Callback] = [mon, ctrl, history]
        kwargs: dict[str, Any] = {}
        if every is not None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                             filename="{step}"))
            kwargs["enable_checkpointing"] = True
        trainer = make_trainer(callbacks, max_steps=max_steps, **kwargs)
        trainer.fit(model, full_batch_loader(n=64), ckpt_path=ckpt_path)
        return model, ctrl, history

    full_model, full_ctrl, full_hist = run(32, every=14)
    ckpt = tmp_path / "step=14.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("InstabilityController"))
    assert saved["n_measurements"] == 3 and saved["factor"] != 1.0
    res_model, res_ctrl, res_hist = run(32, ckpt_path=str(ckpt))
    assert full_ctrl.n_decisions >= 2
    a, b = full_ctrl.state_dict(), res_ctrl.state_dict()
    assert a["n_measurements"] == b["n_measurements"] and a["n_decisions"] == b["n_decisions"]
    assert a["factor"] == pytest.approx(b["factor"], rel=1e-9)
    assert a["smoothed"] == pytest.approx(b["smoothed"], rel=1e-9)
    tail = [m.ratios[0] for m in full_hist.measurements if m.step > 14]
    assert res_hist.measurements[0].step == 12  # the restored `latest`, which the controller had already used
    assert [m.ratios[0] for m in res_hist.measurements if m.step > 14] == pytest.approx(tail, rel=1e-7)
    for k, v in weights(full_model).items():
        torch.testing.assert_close(weights(res_model)[k], v, rtol=1e-6, atol=1e-7)


def test_logged_names_reach_a_real_logger(tmp_path: Any) -> None:
    import csv

    pl.seed_everything(0, verbose=False)
    model = TinyMLP(hidden=16, group_lrs=(0.05, 0.02))
    mon = monitor(every_n_steps=4)
    ctrl = legacy_controller(band=(0.5, 0.8), max_change=3.0)
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer([mon, ctrl], max_steps=12, logger=logger, log_every_n_steps=1)
    trainer.fit(model, full_batch_loader(n=64))
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    names = set(rows[0])
    for name in ("rpe/lr_scale", "rpe/lr/pg1", "rpe/lr/pg2", "rpe/controller_ratio", "rpe/band_low",
                 "rpe/band_high", "rpe/stability_ratio", "train_loss"):
        assert name in names, name
    by_step: dict[int, dict[str, float]] = {}
    for r in rows:
        for k, v in r.items():
            if v not in ("", None) and k != "step":
                by_step.setdefault(int(r["step"]), {})[k] = float(v)
    steps = sorted(s for s, v in by_step.items() if "rpe/lr_scale" in v)
    assert steps == list(range(12))  # once per optimizer step, the x axis of train_loss
    for s in steps:
        row = by_step[s]
        assert "train_loss" in row
        assert row["rpe/lr/pg1"] == pytest.approx(0.05 * row["rpe/lr_scale"], rel=1e-6)
        assert row["rpe/lr/pg2"] == pytest.approx(0.02 * row["rpe/lr_scale"], rel=1e-6)
    assert len({by_step[s]["rpe/lr_scale"] for s in steps}) >= 2
    assert "rpe/lr_scale" in trainer.callback_metrics


def test_each_decision_is_written_once_at_its_measurements_x(tmp_path: Any) -> None:
    # Logged through pl_module.log(on_step=True), a decision's ratio was written again at every later
    # step of the epoch (34 writes for 9 decisions in a review's run), and one step before the
    # measurement it decided on.
    import csv

    from torch.utils.data import DataLoader

    pl.seed_everything(0, verbose=False)
    mon = monitor(every_n_steps=5)
    ctrl = legacy_controller(band=(0.5, 0.8), max_change=3.0)
    logger = CSVLogger(tmp_path, name="run")
    data = make_dataset(64, seed=2)
    trainer = make_trainer([mon, ctrl], max_steps=20, logger=logger, log_every_n_steps=1)
    trainer.fit(TinyMLP(hidden=16), DataLoader(data, batch_size=8))  # 8 batches per epoch
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    written = [(int(r["step"]), float(r["rpe/controller_ratio"])) for r in rows if r.get("rpe/controller_ratio")]
    measured = {int(r["step"]) for r in rows if r.get("rpe/stability_ratio")}
    xs = [x for x, _ in written]
    assert {5, 10, 15, 20} <= measured
    assert len(xs) == len(set(xs)) >= 3 and set(xs) <= measured  # once each, at a measurement's x
    assert all(r.get("rpe/band_low") for r in rows if r.get("rpe/controller_ratio"))
    assert sum(bool(r.get("rpe/band_low")) for r in rows) == len(written)


def test_tensorboard_layout_has_the_controller_category(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    mon = monitor(custom_scalars=True)
    trainer = make_trainer([mon, legacy_controller(target_ratio=0.9)], max_steps=4, logger=logger)
    trainer.fit(TinyMLP(hidden=8), full_batch_loader(n=32))
    from lightning_rpe.callbacks._logging import _LAYOUT_ATTR

    layout = getattr(logger.experiment, _LAYOUT_ATTR)  # the merged layout that was written
    assert "rpe/curvature" in layout  # the monitor's category is kept
    charts = layout["rpe/controller"]
    assert set(charts) == {"stability ratio and its goal", "lr scale (controller factor)",
                           "effective lr (inside optimizer.step)"}
    import re

    regexes = charts["effective lr (inside optimizer.step)"][1]
    assert any(re.match(r, "rpe/lr") for r in regexes) and any(re.match(r, "rpe/lr/pg2") for r in regexes)
