"""Worker for tests/test_sharded.py: ShardedHessianOperator on 2 gloo CPU processes, no Lightning.

Usage: python tests/_sharded_worker.py OUT_DIR
Spawns 2 processes; each shards a small tanh MLP with FSDP2 ``fully_shard`` (uneven shards, and an
empty one on rank 1) in float64 and in float32, and writes OUT_DIR/{dtype}_rank{r}.pt with its
eigenvalues, the dense float64 reference of the unsharded model over both ranks' batches, the
products' bitwise-restoration checks and the cost counters.
"""

from __future__ import annotations

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FullyShardedDataParallel,
    MixedPrecisionPolicy,
    ShardingStrategy,
    fully_shard,
)
from torch.distributed.tensor import Replicate, distribute_tensor

from lightning_rpe.curvature import HessianOperator
from lightning_rpe.curvature.sharded import ShardedHessianOperator, sharded_eigenpairs

WORLD = 2


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # 3->5->1: weight (5,3) splits 3/2 rows, bias (5,) 3/2, weight (1,5) and bias (1,) 1/0: rank 1 empty
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    return model.to(dtype)


def make_batches(rank: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    n_batches = 2 if rank == 0 else 1  # unequal batch counts: rank 1 pads with a weight-0 round
    out = []
    for i in range(n_batches):
        x = torch.randn(4 + i, 3, generator=g, dtype=torch.float64)
        y = torch.randn(4 + i, 1, generator=g, dtype=torch.float64)
        out.append((x.to(dtype), y.to(dtype)))
    return out


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def run(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for dtype in (torch.float64, torch.float32):
            model = make_model(dtype)
            full = make_model(torch.float64)
            batches = make_batches(rank, dtype)
            all_batches = [b for r in range(WORLD) for b in make_batches(r, torch.float64)]
            ref = HessianOperator(full, loss_fn, all_batches, dtype=torch.float64).to_dense()
            ref_evals = torch.linalg.eigvalsh(ref)
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
            sharded = list(model.parameters())  # the DTensors (registered while the model is sharded)
            if dtype == torch.float32:
                # unsharded parameters stay registered after backward: the products must not run on
                # (or leave behind) a stale or perturbed unsharded copy
                model.set_reshard_after_backward(False)
            # a training step first: FSDP's lazy init, and a .grad that must survive the products
            loss_fn(model, batches[0]).backward()
            grads_before = [p.grad.to_local().clone() for p in sharded]
            with torch.no_grad():
                loss_before = loss_fn(model, batches[0])
            before = [p.to_local().clone() for p in sharded]
            op = ShardedHessianOperator(model, loss_fn, batches)
            res = sharded_eigenpairs(op, k=2, which="both", tol=1e-10, max_hvp=op.total_dim)
            # H v on a fixed global vector, compared with the dense reference entry by entry
            g = torch.Generator().manual_seed(7)
            v_full = torch.randn(op.total_dim, generator=g, dtype=torch.float64)
            hv_ref = ref @ v_full
            offsets, local_v, local_ref, start = [], [], [], 0
            for p in sharded:
                full_numel = p.numel()
                local = p.to_local()
                rows = p.shape[0]
                chunk = -(-rows // WORLD)  # FSDP2 Shard(0): ceil-sized row chunks, the last ones short/empty
                r0 = min(rank * chunk, rows)
                per_row = full_numel // rows
                lo, hi = start + r0 * per_row, start + r0 * per_row + local.numel()
                local_v.append(v_full[lo:hi])
                local_ref.append(hv_ref[lo:hi])
                offsets.append((lo, hi))
                start += full_numel
            hv = op.matvec(torch.cat(local_v))
            loss, grad = op.loss_and_gradient()
            _, grad_ref = HessianOperator(full, loss_fn, all_batches, dtype=torch.float64).loss_and_gradient()
            model.set_requires_gradient_sync(False)  # as in gradient accumulation without sync
            try:
                op.matvec(torch.cat(local_v))
                accumulating = "accepted"
            except ValueError as exc:
                accumulating = str(exc)
            model.set_requires_gradient_sync(True)
            after = [p.to_local() for p in sharded]
            with torch.no_grad():
                loss_after = loss_fn(model, batches[0])
            grads_after = [p.grad.to_local() for p in sharded]
            name = "float64" if dtype == torch.float64 else "float32"
            torch.save(
                {
                    "eigenvalues": res.eigenvalues.tolist(),
                    "converged": res.converged.tolist(),
                    "ref_eigenvalues": ref_evals.tolist(),
                    "local_numels": list(op.local_numels),
                    "total_dim": op.total_dim,
                    "dim": op.dim,
                    "hv": hv.to(torch.float64),
                    "hv_ref": torch.cat(local_ref),
                    "grad": grad.to(torch.float64),
                    "grad_ref": torch.cat([grad_ref[lo:hi] for lo, hi in offsets]),
                    "loss": loss,
                    "weights_bitwise": all(torch.equal(a, b) for a, b in zip(before, after)),
                    "accumulating": accumulating,
                    "loss_bitwise": torch.equal(loss_before, loss_after),
                    "flatten_dtensors": torch.equal(
                        op.flatten(sharded), torch.cat([p.to_local().reshape(-1) for p in sharded]).to(op.dtype)),
                    "grads_bitwise": all(torch.equal(a, b) for a, b in zip(grads_before, grads_after)),
                    "n_hvp": op.n_hvp,
                    "n_gradients": op.n_gradients,
                    "eps": op.eps,
                    "vector_dtype": str(op.dtype),
                    "eigvec_norm": float(op.norms(res.eigenvectors[:, :1])[0]),
                },
                os.path.join(out_dir, f"{name}_rank{rank}.pt"),
            )
        torch.save(padded(rank, mesh), os.path.join(out_dir, f"padded_rank{rank}.pt"))
        torch.save(refusals(mesh), os.path.join(out_dir, f"refusals_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class PaddedLM(nn.Module):
    """Embedding(6, 2, padding_idx=4): rows 0-2 on rank 0, 3-5 on rank 1 (the pad row on rank 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 2, padding_idx=4)
        self.out = nn.Linear(2, 3)
        with torch.no_grad():
            self.emb.weight[4] = 0.3  # a pad row with values (loaded weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)).mean(1))


def padded(rank: int, mesh) -> dict[str, torch.Tensor]:
    """Products of the sharded operator on a padded embedding against HessianOperator's ``M H M``."""

    def ce(model: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def tokens(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(50 + r)
        x = torch.randint(0, 6, (8, 3), generator=g)
        x[:, -1] = 4
        return x, torch.randint(0, 3, (8,), generator=g)

    full = PaddedLM().double()
    ref = HessianOperator(full, ce, [tokens(r) for r in range(WORLD)], dtype=torch.float64).to_dense()
    model = PaddedLM().double()
    fully_shard(model, mesh=mesh)
    op = ShardedHessianOperator(model, ce, [tokens(rank)], dtype=torch.float64)
    # local coordinates: emb.weight rows 3 * rank .. 3 * rank + 2 (2 each), then out.weight rows
    # (3 rows of 2: 2 / 1), then out.bias (3: 2 / 1)
    index = [2 * (3 * rank) + i for i in range(6)]
    index += [12 + 2 * 2 * rank + i for i in range(2 * (2 - rank))]
    index += [18 + 2 * rank + i for i in range(2 - rank)]
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return {"hv": op.matvec(v[index]), "hv_ref": (ref @ v)[index], "frozen_rows": op.frozen_rows,
            "dim": op.dim}


def refusals(mesh) -> dict[str, str]:
    """The ValueError message of ShardedHessianOperator.check_module for each unsupported layout."""
    cases = {}

    def hsdp() -> nn.Module:
        m = make_model(torch.float32)
        fully_shard(m, mesh=init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")))
        return m

    def replicate() -> nn.Module:
        m = nn.Module()
        m.w = nn.Parameter(distribute_tensor(torch.ones(4), mesh, [Replicate()]))
        return m

    def plain_next_to_sharded() -> nn.Module:
        m = make_model(torch.float32)
        fully_shard(m[0], mesh=mesh)
        return m  # m[2] was never sharded: plain tensors next to DTensors

    def bf16() -> nn.Module:
        m = make_model(torch.float32)
        fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        return m

    def flat() -> nn.Module:
        return FullyShardedDataParallel(make_model(torch.float32), device_id=torch.device("cpu"), use_orig_params=False)

    def no_shard() -> nn.Module:
        return FullyShardedDataParallel(make_model(torch.float32), device_id=torch.device("cpu"), use_orig_params=True,
                                        sharding_strategy=ShardingStrategy.NO_SHARD)

    for name, build in [("hsdp", hsdp), ("replicate", replicate), ("plain", plain_next_to_sharded), ("bf16", bf16),
                        ("flat", flat), ("no_shard", no_shard)]:
        try:
            ShardedHessianOperator.check_module(build())
            cases[name] = "accepted"
        except ValueError as exc:
            cases[name] = str(exc)
    return cases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], free_port()), nprocs=WORLD, join=True)
