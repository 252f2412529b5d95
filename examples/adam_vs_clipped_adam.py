"""SGD vs Adam vs ClippedAdam on the bundled digits data: does restoring instabilities help here?

The paper's claim 6 (docs/science.md): Adam suppresses edge-of-stability instabilities because its
denominator grows with the gradients; clipping the denominator from above ("Clipped-Ada",
``lightning_rpe.optim.ClippedAdam(clip=c, mode="upper")``, per-coordinate step never below
lr / c) restores them, and that improves generalization.

This script trains the same tanh MLP on the same digits split with full-batch steps and

* SGD (gradient descent) at ``--sgd-lr``,
* Adam and ClippedAdam (c in ``--clips``) at ``--adam-lr`` with betas (0.9, 0.99),

for several seeds (the seed changes the initialisation and the train/test split). During training
a :class:`~lightning_rpe.SharpnessMonitor` measures the stability ratio every ``--every`` steps
(preconditioned for the Adam family); at the end the script measures the Hessian's lambda_max on the
whole training set (flatness: smaller = flatter) and the test accuracy. It prints one Markdown
table per seed and a mean +- std table over seeds.

    python examples/adam_vs_clipped_adam.py --seeds 0 1 2
    python examples/adam_vs_clipped_adam.py --seeds 0 --steps 300 --hidden 64   # quick look

Columns: ``test_acc`` (held-out digits, 797 images), ``train_loss`` (final), ``lambda_max``
(final sharpness of the training loss), ``final_ratio`` and ``frac_unstable`` (the monitor's
stability ratio at the end, and the fraction of measurements with ratio > 1; for the Adam family
the preconditioned ratio against 38 / lr at beta1 = 0.9), ``clip_binding`` (ClippedAdam: mean over
measurements of the fraction of coordinates whose denominator the clip replaced; with upper
clipping that happens only where sqrt(v_hat) > c, so when the gradients are small a large c changes
nothing).

The default loss is MSE on one-hot targets (the package's reference experiment, in which full-batch
GD and Adam both reach their edge of stability); ``--loss cross_entropy`` is the paper's loss.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dict_table, final_sharpness

from lightning_rpe import SharpnessMonitor
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.models import MLPClassifier
from lightning_rpe.optim import ClippedAdam


def clip_binding(optimizer: torch.optim.Optimizer) -> float | None:
    """Fraction of coordinates whose denominator ClippedAdam clipped at the last step, over all
    param groups (None for other optimizers): ``ClippedAdam.clip_statistics()`` weighted by size.

    Upper mode clips where ``sqrt(v_hat) > c`` (there the step is larger than Adam's).
    """
    if not isinstance(optimizer, ClippedAdam):
        return None
    stats = [s for s in optimizer.clip_statistics() if s.numel]
    total = sum(s.numel for s in stats)
    return sum(s.fraction * s.numel for s in stats) / total if total else None


class RatioLog(pl.Callback):
    """After every measurement: the monitor's stability ratio (largest over param groups) and the
    fraction of coordinates where ClippedAdam's clip binds."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor = monitor
        self.ratios: list[float] = []
        self.binding: list[float] = []
        self._seen: Any = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = self.monitor.latest
        if m is not None and m is not self._seen:
            self._seen = m
            self.ratios.append(max(m.ratios))
            b = clip_binding(trainer.optimizers[0])
            if b is not None:
                self.binding.append(b)


def run(name: str, optimizer: str, lr: float, clip: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(n_train=args.n_train, seed=seed)  # full batch: gradient-descent-like steps
    dm.setup()
    model = MLPClassifier(hidden=tuple(args.hidden), loss=args.loss, optimizer=optimizer, lr=lr,
                          betas=(0.9, 0.99), clip=clip, clip_mode="upper")
    monitor = SharpnessMonitor(every_n_steps=args.every, top_k=1, lambda_min=False, on_fit_start=False,
                               probe=[dm.full_train_batch()])  # the full training loss
    ratio_log = RatioLog(monitor)
    trainer = pl.Trainer(max_steps=args.steps, callbacks=[monitor, ratio_log], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu", devices=1)
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    model.eval()
    with torch.no_grad():
        x, y = dm.full_test_batch()
        test_acc = float((model(x).argmax(1) == y).float().mean())
        train_loss = float(model.compute_loss(dm.full_train_batch()))
    lam = final_sharpness(model, dm.full_train_batch())
    ratios = [r for r in ratio_log.ratios if math.isfinite(r)]
    return {
        "run": name, "seed": seed, "test_acc": test_acc, "train_loss": train_loss, "lambda_max": lam,
        "final_ratio": ratios[-1] if ratios else math.nan,
        "frac_unstable": sum(r > 1.0 for r in ratios) / len(ratios) if ratios else math.nan,
        "clip_binding": statistics.mean(ratio_log.binding) if ratio_log.binding else math.nan,
        "seconds": time.time() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="full-batch optimizer steps per run")
    p.add_argument("--every", type=int, default=25, help="monitor measurement interval (steps)")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--loss", default="mse", choices=["mse", "cross_entropy"])
    p.add_argument("--sgd-lr", type=float, default=0.2)
    p.add_argument("--adam-lr", type=float, default=5e-3)
    p.add_argument("--clips", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    args = p.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")
    # a diverged run makes every later measurement fail; the table's "diverged" column says so
    warnings.filterwarnings("ignore", "SharpnessMonitor: measurement at step .* skipped: .*non-finite.*")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    configs = [("SGD", "sgd", args.sgd_lr, 1.0), ("Adam", "adam", args.adam_lr, 1.0)]
    configs += [(f"ClippedAdam c={c:g}", "clipped_adam", args.adam_lr, c) for c in args.clips]
    rows = []
    for seed in args.seeds:
        for name, opt, lr, clip in configs:
            rows.append(run(name, opt, lr, clip, seed, args))
            r = rows[-1]
            print(f"seed {seed} {name:<20} acc {r['test_acc']:.4f} loss {r['train_loss']:.4g} "
                  f"lambda_max {r['lambda_max']:.4g} ratio {r['final_ratio']:.3g} "
                  f"unstable {r['frac_unstable']:.2f} clipped {r['clip_binding']:.3g} ({r['seconds']:.0f} s)",
                  flush=True)
    cols = ["run", "seed", "test_acc", "train_loss", "lambda_max", "final_ratio", "frac_unstable", "clip_binding"]
    print("\n## Per seed\n")
    print(dict_table(rows, cols))
    summary = []
    for name, *_ in configs:
        rs = [r for r in rows if r["run"] == name]
        ok = [r for r in rs if math.isfinite(r["train_loss"])]
        row: dict[str, Any] = {"run": name, "seeds": len(rs), "diverged": len(rs) - len(ok)}
        for c in ("test_acc", "lambda_max", "final_ratio", "frac_unstable", "clip_binding"):
            vals = [r[c] for r in ok if math.isfinite(r[c])]
            if not vals:
                row[c] = "-"
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row[c] = f"{statistics.mean(vals):.4g} +- {sd:.2g}"
        summary.append(row)
    print("\n## Mean +- std over seeds\n")
    print("(over the runs that did not diverge; diverged = final training loss not finite)\n")
    print(dict_table(summary, ["run", "seeds", "diverged", "test_acc", "lambda_max", "final_ratio", "frac_unstable",
                          "clip_binding"]))
    print(f"\nsettings: steps={args.steps} hidden={args.hidden} n_train={args.n_train} loss={args.loss} "
          f"sgd_lr={args.sgd_lr} adam_lr={args.adam_lr} betas=(0.9, 0.99) full batch")


if __name__ == "__main__":
    main()
