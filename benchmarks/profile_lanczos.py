"""cProfile of cold Lanczos lambda_max solves (tol 3e-3, as in row (a) of bench_engine.py).

Run::

    python benchmarks/profile_lanczos.py [--threads 1] [--workloads mlp_wide mlp_small]

Three solves per workload (operator construction included) after one warm-up solve; prints the
share of the time spent in ``run_backward`` (the products and the graph build) and the top
entries by own time: what is left is the solver's and the operator's per-product overhead.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import WORKLOADS, build_workload  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["mlp_wide", "mlp_small"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_rpe.curvature import HessianOperator, eigenpairs

    for name in args.workloads:
        w = build_workload(name)

        def solve(seed: int):
            op = HessianOperator(w.model, w.loss_fn, [w.batch])
            return eigenpairs(op, k=1, which="largest", tol=3e-3, generator=torch.Generator().manual_seed(seed))

        solve(0)
        profiler = cProfile.Profile()
        profiler.enable()
        hvps = [solve(seed).n_hvp for seed in range(3)]
        profiler.disable()
        stats = pstats.Stats(profiler)
        backward = sum(v[2] for k, v in stats.stats.items() if k[2] == "<method 'run_backward' of "
                       "'torch._C._EngineBase' objects>" or "run_backward" in k[2])
        print(f"{name}: HVPs {hvps}, total {stats.total_tt:.3f} s, run_backward "
              f"{100 * backward / stats.total_tt:.0f} %")
        stats.sort_stats("tottime").print_stats(8)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
