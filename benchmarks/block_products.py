"""Batched vs column-loop block products on the double-backward path, per vector, in gradients.

Run::

    python benchmarks/block_products.py [--threads 1] [--rounds 7]

For each workload of ``benchmarks/workloads.py`` (first 1000 digits), one ``HessianOperator`` with
the default batched block product (``torch.autograd.grad(..., is_grads_batched=True)``) and one
forced onto the engine's column loop (each column one backward through the cached graph; set via
the private ``_batched_backward_ok`` flag, the same switch the engine uses as its fallback) multiply
blocks of 1, 2 and 6 random vectors. Times are medians over interleaved rounds, each divided by
the block size and by the time of one gradient measured in the same round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import WORKLOADS, build_workload  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_rpe.curvature import HessianOperator

    sizes = (1, 2, 6)
    print(f"gradients per vector (median of {args.rounds} interleaved rounds, {args.threads} thread(s))")
    print(f"{'workload':<10} {'gradient':>9}  " + "  ".join(f"{m + '-b' + str(b):>9}" for m in ("batched", "loop") for b in sizes))
    for name in args.workloads:
        w = build_workload(name)
        ops = {}
        for mode in ("batched", "loop"):
            op = HessianOperator(w.model, w.loss_fn, [w.batch])
            if mode == "loop":
                op._batched_backward_ok = False
            ops[mode] = op
        gen = torch.Generator().manual_seed(0)
        blocks = {b: torch.randn(ops["loop"].dim, b, generator=gen) for b in sizes}
        for op in ops.values():
            op.matmat(blocks[2])  # builds and caches the graph
        times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in ops for b in sizes}
        grads = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            w.gradient()
            grads.append(time.perf_counter() - t0)
            for mode, op in ops.items():
                for b, V in blocks.items():
                    t0 = time.perf_counter()
                    op.matmat(V)
                    times[(mode, b)].append(time.perf_counter() - t0)
        g = statistics.median(grads)
        cells = [f"{statistics.median(t / b / gg for t, gg in zip(times[(m, b)], grads)):9.2f}"
                 for m in ops for b in sizes]
        print(f"{name:<10} {g * 1e3:7.2f}ms  " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
