"""Worker for tests/test_monitor_ddp.py::test_broadcast_solve_sends_rank_zero_vectors (2 gloo processes).

Usage: python tests/_broadcast_worker.py OUT_DIR. Each rank builds a Solve whose vectors differ from
the other rank's (rank 1 also lacks the lambda_min vector and holds a non-contiguous top block); after
``broadcast_solve`` every rank must hold rank 0's values, shapes and scalars.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.multiprocessing as mp

from lightning_rpe.callbacks._distributed import broadcast_solve
from lightning_rpe.measure import Solve


class _Strategy:
    def broadcast(self, obj, src=0):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src)
        return box[0]


def _solve(rank: int) -> Solve:
    g = torch.Generator().manual_seed(rank)
    top = torch.randn(7, 4, generator=g)[:, ::2] if rank else torch.randn(7, 2, generator=g)  # rank 1: a strided view
    return Solve(eigenvalues=(float(3 + rank), 1.0), lambda_min=-1.0 - rank, trace=None, preconditioned_sharpness=None,
                 groups=(), ratios=(), stability_ratio=None, n_hvp=10 + rank, residuals=(0.0, 0.0),
                 lambda_min_residual=None, probe_loss=None, grad_alignment=None, top_vectors=top,
                 min_vector=None if rank else torch.randn(7, generator=g, dtype=torch.float64),
                 preconditioned_vector=None)


def _run(rank: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    res = broadcast_solve(_Strategy(), _solve(rank), torch.device("cpu"))
    torch.save({"top": res.top_vectors, "min": res.min_vector, "pre": res.preconditioned_vector,
                "eigenvalues": res.eigenvalues, "n_hvp": res.n_hvp}, os.path.join(out_dir, f"b{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(sys.argv[1],), nprocs=2, join=True)
