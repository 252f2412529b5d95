"""Where the ResNet's product check fails on a GPU (issue 12 GPU run): the same check outside and
inside a Lightning fit, with the precision flags in force at each point.

Run: ``python benchmarks/gpu_monitor_check.py`` (CUDA; on the CPU it runs the same checks).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from bench_scale import _lightning_module, make_model, synthetic_cifar
from torch.utils.data import DataLoader, TensorDataset

from lightning_rpe.curvature import HessianOperator
from lightning_rpe.curvature.verify import verify_operator
from lightning_rpe.measure import MeasureSettings, solve

CUDA = torch.cuda.is_available()


def flags() -> str:
    return (f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32} cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
            f"cudnn.benchmark={torch.backends.cudnn.benchmark} cudnn.deterministic={torch.backends.cudnn.deterministic} "
            f"matmul_precision={torch.get_float32_matmul_precision()}")


def checks(label: str, module: pl.LightningModule, batch: Any) -> None:
    print(f"[{label}] {flags()}", flush=True)
    for backend in ("func", "autograd"):
        r = verify_operator(HessianOperator(module, lambda m, b: m.compute_loss(b), [batch], backend=backend))
        print(f"[{label}] verify {backend}: {r.verdict} rel_error={r.rel_error} training={module.training}", flush=True)
    s = solve(module, lambda m, b: m.compute_loss(b), [batch], MeasureSettings(), step=0, check=True)
    print(f"[{label}] solve: verification={s.verification} error={s.verify_error} switched_to={s.switched_to} "
          f"backend={s.backend} lambda_max={s.eigenvalues[0]:.6g} notes={[n[1][:160] for n in s.notes]}", flush=True)


class Probe(pl.Callback):
    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checks("in fit", pl_module, tuple(t.to(pl_module.device) for t in self.batch))


def main() -> None:
    torch.manual_seed(0)
    module = _lightning_module(make_model("resnet", quick=not CUDA), lr=0.01)
    x, y = synthetic_cifar(1024)
    batch = (x[:256], y[:256])
    dev = torch.device("cuda" if CUDA else "cpu")
    module.to(dev)
    checks("standalone", module, tuple(t.to(dev) for t in batch))
    trainer = pl.Trainer(max_steps=1, accelerator="gpu" if CUDA else "cpu", devices=1, logger=False, callbacks=[Probe(batch)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=256))


if __name__ == "__main__":
    main()
