"""Cost of sending rank 0's measurement to every DDP process: pickled whole vs vectors as tensors.

Run::

    python benchmarks/broadcast_solve.py [--dim 5383142] [--repeats 5]

Two CPU processes (gloo, one torch thread each). Each sends a ``Solve`` holding a ``(dim, 2)`` top
block and a ``(dim,)`` lambda_min vector (float32), the monitor's payload at ``top_k=1``, by
``broadcast_object_list`` of the whole object (the monitor before 2026-11-30) and by
:func:`lightning_rpe.callbacks._distributed.broadcast_solve` (scalars pickled, vectors by
``torch.distributed.broadcast``). Prints the median wall time of rank 0 per way and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
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


def _run(rank: int, dim: int, repeats: int, path: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=300))
    g = torch.Generator().manual_seed(rank)
    res = Solve(eigenvalues=(2.0, 1.0), lambda_min=-1.0, trace=None, preconditioned_sharpness=None, groups=(),
                ratios=(), stability_ratio=None, n_hvp=10, residuals=(0.0, 0.0), lambda_min_residual=None,
                probe_loss=None, grad_alignment=None, top_vectors=torch.randn(dim, 2, generator=g),
                min_vector=torch.randn(dim, generator=g), preconditioned_vector=None)
    strategy, times = _Strategy(), {"pickled": [], "tensors": []}
    for _ in range(repeats):
        for way in times:
            torch.distributed.barrier()
            t0 = time.perf_counter()
            out = strategy.broadcast(res, 0) if way == "pickled" else broadcast_solve(strategy, res, torch.device("cpu"))
            torch.distributed.barrier()
            times[way].append(time.perf_counter() - t0)
            assert out.top_vectors.shape == (dim, 2)
    if rank == 0:
        p, t = statistics.median(times["pickled"]), statistics.median(times["tensors"])
        print(f"dim {dim:,} ({3 * dim * 4 / 2**20:.0f} MiB of vectors), median of {repeats}: pickled {p:.3f} s, "
              f"tensors {t:.3f} s, ratio {t / p:.2f}", flush=True)
    torch.distributed.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=5_383_142)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(args.dim, args.repeats, os.path.join(tmp, "rendezvous")), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
