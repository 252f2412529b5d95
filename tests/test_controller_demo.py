"""Demonstration: the InstabilityController holds full-batch GD on digits in a chosen ratio band.

Setting: the package's digits data (1000 training images), a 64-64-10 tanh MLP with MSE on
one-hot targets, full-batch gradient descent at lr 0.05, the real SharpnessMonitor measuring
lambda_max of the full training loss every 10 steps. Without the controller this run is in its
progressive-sharpening phase for hundreds of steps: the ratio lambda_max * lr / 2 stays far below 1.

* band (1.1, 1.5): the controller raises the lr until the run is beyond the classical threshold and
  keeps it there (edge of stability; the loss falls non-monotonically but does not diverge);
* band (0.5, 0.8): the controller raises the lr less and lowers it again whenever progressive
  sharpening pushes the ratio above the band: the run stays stable (loss decreases at every step).
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_rpe.callbacks.instability_controller import InstabilityController
from lightning_rpe.callbacks.sharpness_monitor import Measurement, SharpnessMonitor
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.models import MLPClassifier

torch.set_num_threads(1)

LR, STEPS, EVERY, SETTLE = 0.05, 300, 10, 50  # measurements at steps >= SETTLE count as "after warm-up"


class History(pl.Callback):
    """Every new monitor measurement and the training loss of every step."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor = monitor
        self.measurements: list[Measurement] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.losses.append(float(outputs["loss"]))
        m = self.monitor.latest
        if m is not None and (not self.measurements or m is not self.measurements[-1]):
            self.measurements.append(m)


def digits_run(band: tuple[float, float] | None) -> History:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(n_train=1000)  # batch_size=None: full batch, one GD step per epoch
    dm.setup()
    model = MLPClassifier(hidden=(64, 64), lr=LR)  # tanh, MSE, torch.optim.SGD: threshold 2 / lr
    monitor = SharpnessMonitor(every_n_steps=EVERY, top_k=1, lambda_min=False, grad_alignment=False,
                               on_fit_start=False, on_fit_end=False, custom_scalars=False,
                               probe=[dm.full_train_batch()])
    history = History(monitor)
    callbacks: list[pl.Callback] = [monitor, history]
    if band is not None:
        # the bound on the total factor (default 4) and the warm-up (default 100 steps) are lifted: the
        # band needs about 10x the initial lr here, and the test looks at the steps from 50 on
        callbacks.insert(1, InstabilityController(band=band, max_change=2.0, max_factor=None, warmup_steps=0))
    trainer = pl.Trainer(max_steps=STEPS, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, datamodule=dm)
    assert len(history.measurements) == STEPS // EVERY
    return history


@pytest.fixture(scope="module")
def uncontrolled() -> History:
    return digits_run(None)


def test_uncontrolled_run_stays_below_the_threshold(uncontrolled: History) -> None:
    ratios = [m.ratios[0] for m in uncontrolled.measurements]
    assert max(ratios) < 0.5, ratios  # progressive sharpening, far from the edge of stability
    assert ratios[-1] > ratios[5]  # ... and sharpening
    assert all(m.lrs[0] == pytest.approx(LR) for m in uncontrolled.measurements)


def test_controller_holds_the_ratio_in_a_band_above_the_threshold(uncontrolled: History) -> None:
    band = (1.1, 1.5)
    run = digits_run(band)
    after = [m for m in run.measurements if m.step >= SETTLE]
    inside = [band[0] <= m.ratios[0] <= band[1] for m in after]
    assert sum(inside) / len(inside) >= 0.8, [round(m.ratios[0], 3) for m in run.measurements]
    assert all(m.ratios[0] > 1.0 for m in after)  # beyond the classical threshold 2 / lr
    # the threshold moved with the effective lr the controller chose (thresholds use it)
    assert max(m.lrs[0] for m in after) > 5 * LR
    for m in after:
        assert m.thresholds[0] == pytest.approx(2.0 / m.lrs[0])
    # unstable but not divergent: the loss rises at some steps and still ends lower than without control
    rises = sum(b > a for a, b in zip(run.losses, run.losses[1:]))
    assert rises >= 5
    assert math.isfinite(run.losses[-1]) and run.losses[-1] < uncontrolled.losses[-1]


def test_controller_aiming_below_one_keeps_training_stable(uncontrolled: History) -> None:
    band = (0.5, 0.8)
    run = digits_run(band)
    after = [m for m in run.measurements if m.step >= SETTLE]
    ratios = [m.ratios[0] for m in after]
    assert max(ratios) < 1.0, ratios
    inside = [band[0] <= r <= band[1] for r in ratios]
    assert sum(inside) / len(inside) >= 0.8, ratios
    # progressive sharpening pushed the ratio up and the controller took the lr back down
    lrs = [m.lrs[0] for m in after]
    assert any(b < a for a, b in zip(lrs, lrs[1:]))
    # stable: the full-batch loss decreases at every step, and faster than at the initial lr
    assert all(b < a for a, b in zip(run.losses, run.losses[1:]))
    assert run.losses[-1] < uncontrolled.losses[-1]
