"""Hold full-batch gradient descent in a stability-ratio band with the InstabilityController.

The paper's practical message (docs/science.md, claims 2 and 7): training beyond the classical
stability threshold (lr * lambda_max / 2 > 1 for GD), but not excessively far, finds flatter
minima that generalize better. This script trains the package's digits MLP (tanh, MSE on one-hot
targets, full-batch GD: threshold 2 / lr) three ways from the same initialisation and initial lr:

* ``none``: no controller (at lr 0.05 the run is in progressive sharpening, ratio far below 1);
* ``below``: the controller holds the ratio in ``--below`` (default 0.5 - 0.8): a large but stable
  lr, the control that separates "larger lr" from "unstable";
* ``above``: the controller holds the ratio in ``--above`` (default 1.1 - 1.5): beyond the
  threshold, at the edge of stability.

For each seed (initialisation and train/test split) it reports the test accuracy, the final
training loss, the final sharpness lambda_max of the training loss (float64 Lanczos at the end),
the mean effective lr, and the fraction of measurements (after ``--settle`` steps) whose ratio
was inside the band.

    python examples/controller_band.py --seeds 0 1 2
    python examples/controller_band.py --seeds 0 --steps 300 --hidden 64   # quick look

Add ``--logdir runs`` to write TensorBoard logs (``tensorboard --logdir runs``: the
``rpe/controller`` custom-scalars tab shows the ratio with the band, the factor and the lr).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dict_table, final_sharpness  # noqa: E402

from lightning_rpe import InstabilityController, SharpnessMonitor
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.models import MLPClassifier


class Record(pl.Callback):
    """Collects every new monitor measurement and the effective lr of every step."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor = monitor
        self.measurements: list[Any] = []
        self.lrs: list[float] = []

    def on_train_start(self, trainer, pl_module):  # noqa: D102
        # registered after the controller's pre-hook: sees the lr the step really uses
        trainer.optimizers[0].register_step_pre_hook(lambda opt, a, k: self.lrs.append(float(opt.param_groups[0]["lr"])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        m = self.monitor.latest
        if m is not None and (not self.measurements or m is not self.measurements[-1]):
            self.measurements.append(m)


def run(arm: str, band: tuple[float, float] | None, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(n_train=args.n_train, seed=seed)  # batch_size=None: full batch
    dm.setup()
    model = MLPClassifier(hidden=tuple(args.hidden), lr=args.lr)  # tanh, MSE, SGD without momentum
    monitor = SharpnessMonitor(every_n_steps=args.every, top_k=1, lambda_min=False, on_fit_start=False,
                               probe=[dm.full_train_batch()])  # the full training loss
    record = Record(monitor)
    callbacks: list[pl.Callback] = [monitor]
    if band is not None:
        callbacks.append(InstabilityController(band=band, max_change=args.max_change,
                                               max_factor=args.max_factor or None, warmup_steps=args.warmup_steps))
    callbacks.append(record)
    logger: Any = False
    if args.logdir:
        logger = pl.loggers.TensorBoardLogger(args.logdir, name=f"seed{seed}", version=arm)
    trainer = pl.Trainer(max_steps=args.steps, callbacks=callbacks, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, accelerator="cpu", devices=1, log_every_n_steps=10)
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    model.eval()
    with torch.no_grad():
        x, y = dm.full_test_batch()
        test_acc = float((model(x).argmax(1) == y).float().mean())
        train_loss = float(model.compute_loss(dm.full_train_batch()))
    after = [m for m in record.measurements if m.step >= args.settle and m.trigger == "step"]
    ref = band if band is not None else (args.above[0], args.above[1])
    in_band = sum(ref[0] <= m.ratios[0] <= ref[1] for m in after) / max(1, len(after))
    return {
        "arm": arm, "seed": seed, "test_acc": test_acc, "train_loss": train_loss,
        "lambda_max": final_sharpness(model, dm.full_train_batch()),
        "mean_lr": statistics.mean(record.lrs), "in_band": in_band,
        "ratio_median": statistics.median(m.ratios[0] for m in after) if after else float("nan"),
        "seconds": time.time() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000, help="full-batch GD steps per run")
    p.add_argument("--lr", type=float, default=0.05, help="initial (scheduled) learning rate")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--every", type=int, default=10, help="measure every n steps")
    p.add_argument("--settle", type=int, default=100, help="in-band fraction counts measurements from this step")
    p.add_argument("--above", type=float, nargs=2, default=[1.1, 1.5])
    p.add_argument("--below", type=float, nargs=2, default=[0.5, 0.8])
    p.add_argument("--max-change", type=float, default=2.0)
    p.add_argument("--max-factor", type=float, default=0.0, dest="max_factor",
                   help="bound on the controller's total factor (0: unbounded; the controller's default \"auto\" is 4 for the "
                        "sharpness gauge, and this full-batch run needs about 10)")
    p.add_argument("--warmup-steps", type=int, default=0, dest="warmup_steps",
                   help="controller warm-up (the controller's default is 100)")
    p.add_argument("--logdir", default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    arms = [("none", None), ("below", tuple(args.below)), ("above", tuple(args.above))]
    rows = []
    for seed in args.seeds:
        for arm, band in arms:
            rows.append(run(arm, band, seed, args))
            r = rows[-1]
            print(f"seed {seed} {arm:<6} acc {r['test_acc']:.4f} loss {r['train_loss']:.4g} "
                  f"lambda_max {r['lambda_max']:.4g} mean lr {r['mean_lr']:.3g} "
                  f"in band {r['in_band']:.2f} ({r['seconds']:.0f} s)", flush=True)
    print("\n## Per seed (in_band: fraction of measurements in the arm's band; for 'none' the 'above' band)\n")
    print(dict_table(rows, ["arm", "seed", "test_acc", "train_loss", "lambda_max", "mean_lr", "ratio_median", "in_band"]))
    summary = []
    for arm, _ in arms:
        rs = [r for r in rows if r["arm"] == arm]
        row: dict[str, Any] = {"arm": arm, "seeds": len(rs)}
        for c in ("test_acc", "train_loss", "lambda_max", "mean_lr", "in_band"):
            vals = [r[c] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row[c] = f"{statistics.mean(vals):.4g} +- {sd:.2g}"
        summary.append(row)
    print("\n## Mean +- std over seeds\n")
    print(dict_table(summary, ["arm", "seeds", "test_acc", "train_loss", "lambda_max", "mean_lr", "in_band"]))
    print(f"\nsettings: steps={args.steps} lr={args.lr} hidden={args.hidden} n_train={args.n_train} "
          f"every={args.every} settle={args.settle} above={args.above} below={args.below} "
          f"max_change={args.max_change}; full-batch GD, MSE, tanh")


if __name__ == "__main__":
    main()
