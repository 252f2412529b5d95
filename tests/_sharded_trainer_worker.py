"""Lightning worker for tests/test_sharded_trainer.py (run as a script; Lightning re-launches it per rank).

Usage: python tests/_sharded_trainer_worker.py OUT_DIR {model_parallel|fsdp} [ACCELERATOR [DEVICES]]
(default ``cpu 2``; ``cuda 1`` is the one-GPU check of tests/test_sharded_cuda.py).

``model_parallel``: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with
FSDP2 ``fully_shard`` in ``configure_model``, float64 parameters built by hand.
``fsdp``: ``FSDPStrategy`` through a test-only subclass that runs on CPU (Lightning refuses CPU for
the plain class; FSDP1 needs ``device_id=cpu``), float32.

Each rank fits twice from the same initialisation: once with a callback that measures sharpness
and lambda_min after every optimizer step through ``lightning_rpe.callbacks._sharded`` and checks
them against a dense float64 reference of the unsharded model over both ranks' probe batches, and
once without. Writes OUT_DIR/{mode}_rank{r}.pt.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_rpe.callbacks._sharded import (
    check_supported,
    is_sharded,
    sharded_operator,
)
from lightning_rpe.curvature import HessianOperator
from lightning_rpe.curvature.sharded import sharded_eigenpairs


class ShardMLP(pl.LightningModule):
    def __init__(self, dtype: torch.dtype, shard: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard:
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def compute_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class CPUFSDPStrategy(FSDPStrategy):
    """Test-only: FSDPStrategy on CPU (the accelerator check only refuses the exact class; FSDP1
    needs ``device_id=cpu`` instead of the index Lightning passes)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return FullyShardedDataParallel(module=model, sharding_strategy=self.sharding_strategy,
                                        device_id=torch.device("cpu"), **self.kwargs)


def local_shards(module: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in module.parameters():
        t = p._local_tensor if hasattr(p, "_local_tensor") else p.data
        out.append(t.detach().cpu().clone())
    return out


def probe_batches(rank: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(50 + rank)
    n = 2 if rank == 0 else 1  # unequal counts
    return [(torch.randn(3 + i, 3, generator=g, dtype=torch.float64).to(dtype),
             torch.randn(3 + i, 1, generator=g, dtype=torch.float64).to(dtype)) for i in range(n)]


def full_parameters(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The unsharded parameters by name (a collective)."""
    if isinstance(trainer.strategy, FSDPStrategy):
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            return {n: p.detach().cpu().to(torch.float64).clone() for n, p in pl_module.named_parameters()}
    return {n: p.full_tensor().detach().cpu().to(torch.float64).clone() for n, p in pl_module.named_parameters()}


class Measure(pl.Callback):
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.records: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rank = trainer.global_rank
        probe = [tuple(t.to(pl_module.device) for t in b) for b in probe_batches(rank, self.dtype)]
        before = local_shards(trainer.strategy.model)
        op = sharded_operator(trainer, pl_module, lambda m, b: m.compute_loss(b), probe)
        res = sharded_eigenpairs(op, k=1, which="both", tol=1e-10, max_hvp=op.total_dim)
        after = local_shards(trainer.strategy.model)
        # dense float64 reference of the unsharded model over both ranks' probe batches
        params = full_parameters(trainer, pl_module)
        gathered: list = [None] * trainer.world_size
        dist.all_gather_object(gathered, [tuple(t.cpu().to(torch.float64) for t in b) for b in probe])
        ref_model = ShardMLP(torch.float64, shard=False)
        ref_model.load_state_dict(params)
        union = [b for share in gathered for b in share]
        ref = HessianOperator(ref_model, lambda m, b: m.compute_loss(b), union, dtype=torch.float64).to_dense()
        evals = torch.linalg.eigvalsh(ref)
        self.records.append({
            "step": trainer.global_step,
            "lambda_max": res.lambda_max, "lambda_min": res.lambda_min, "converged": res.converged.tolist(),
            "ref_max": float(evals[-1]), "ref_min": float(evals[0]),
            "bitwise": all(torch.equal(a, b) for a, b in zip(before, after)),
            "local_dim": op.dim, "total_dim": op.total_dim, "kind": op.kind, "n_hvp": op.n_hvp,
            "n_gradients": op.n_gradients, "eps": op.eps, "dtype": str(op.dtype),
        })


def fit(mode: str, measure: bool, out_dir: str, accelerator: str, devices: int
        ) -> tuple[list[torch.Tensor], list[dict], pl.Trainer]:
    dtype = torch.float64 if mode == "model_parallel" else torch.float32
    if mode == "model_parallel":
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    else:
        strategy = CPUFSDPStrategy() if accelerator == "cpu" else FSDPStrategy()
    model = ShardMLP(dtype, shard=mode == "model_parallel")
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(16, 3, generator=g, dtype=torch.float64).to(dtype),
                         torch.randn(16, 1, generator=g, dtype=torch.float64).to(dtype))
    callbacks = [Measure(dtype)] if measure else []
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=out_dir)
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=False))
    records = callbacks[0].records if measure else []
    return local_shards(trainer.strategy.model), records, trainer


class MonitorSpy(pl.Callback):
    """After the SharpnessMonitor (earlier in the callback list): its values and a dense reference."""

    def __init__(self, monitor) -> None:
        self.monitor = monitor
        self.records: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = self.monitor.latest
        gathered: list = [None] * trainer.world_size
        mine = [tuple(t.cpu().to(torch.float64) for t in b) for b in self.monitor.probe_batches]
        dist.all_gather_object(gathered, mine)
        ref_model = ShardMLP(torch.float64, shard=False)
        ref_model.load_state_dict(full_parameters(trainer, pl_module))
        union = [b for share in gathered for b in share]
        ref = HessianOperator(ref_model, lambda mod, b: mod.compute_loss(b), union, dtype=torch.float64).to_dense()
        evals = torch.linalg.eigvalsh(ref)
        self.records.append({"step": m.step, "sharpness": m.sharpness, "lambda_min": m.lambda_min,
                             "ratio": m.stability_ratio, "lr": m.lrs[0], "backend": m.backend,
                             "ref_max": float(evals[-1]), "ref_min": float(evals[0])})


def fit_monitor(mode: str, out_dir: str, accelerator: str, devices: int) -> tuple[list[torch.Tensor], list[dict]]:
    from lightning_rpe import SharpnessMonitor

    dtype = torch.float64 if mode == "model_parallel" else torch.float32
    strategy = (ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if mode == "model_parallel"
                else CPUFSDPStrategy() if accelerator == "cpu" else FSDPStrategy())
    model = ShardMLP(dtype, shard=mode == "model_parallel")
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(16, 3, generator=g, dtype=torch.float64).to(dtype),
                         torch.randn(16, 1, generator=g, dtype=torch.float64).to(dtype))
    monitor = SharpnessMonitor(every_n_steps=1, on_fit_start=False, on_fit_end=False, probe_size=16,
                               dtype="float64" if dtype == torch.float64 else "float32",
                               tol=1e-9 if dtype == torch.float64 else 1e-4, batchnorm="eval", custom_scalars=False)
    spy = MonitorSpy(monitor)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[monitor, spy], default_root_dir=out_dir)
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=False))
    return local_shards(trainer.strategy.model), spy.records


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    accelerator = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    devices = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    torch.set_num_threads(1)
    shards_measured, records, trainer = fit(mode, True, out_dir, accelerator, devices)
    sharded, problem = is_sharded(trainer.strategy), None
    try:
        check_supported(trainer.strategy, trainer.strategy.model)
    except ValueError as exc:  # pragma: no cover - reported to the test
        problem = str(exc)
    shards_plain, _, _ = fit(mode, False, out_dir, accelerator, devices)
    shards_monitored, monitor_records = fit_monitor(mode, out_dir, accelerator, devices)
    torch.save({
        "monitor_records": monitor_records,
        "monitor_invisible": all(torch.equal(a, b) for a, b in zip(shards_monitored, shards_plain)),
        "records": records,
        "invisible": all(torch.equal(a, b) for a, b in zip(shards_measured, shards_plain)),
        "world_size": trainer.world_size, "is_sharded": sharded, "problem": problem,
        "device": str(trainer.strategy.root_device),
    }, os.path.join(out_dir, f"{mode}_rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
