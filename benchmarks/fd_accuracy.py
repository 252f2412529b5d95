"""Accuracy of the finite-difference backend and cost of verification on the benchmark workloads.

For each workload (benchmarks/workloads.py) and dtype, the finite-difference product
``(g(theta + eps v) - g(theta - eps v)) / (2 eps)`` with ``eps = s (1 + ||theta||) / ||v||`` is
compared with the exact float64 double-backward product, for several relative steps ``s``
(median and max relative error over ``--n-dirs`` random directions). Then
``verify_operator`` is timed on the default operator (float32 and float64), in units of one
gradient of the same loss measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/fd_accuracy.py [--workloads mlp_small cnn mlp_wide] [--n-samples 1000]

Uses ``torch.set_num_threads(--threads)`` (default 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import WORKLOADS, build_workload

from lightning_rpe.curvature.hessian import FD_STEP, HessianOperator
from lightning_rpe.curvature.verify import verify_operator

STEPS = {torch.float32: (1e-3, 3e-3, 1e-2), torch.float64: (1e-8, 1e-7, 1e-6, 1e-5)}


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--n-dirs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cost-only", action="store_true", help="skip the accuracy table")
    parser.add_argument("--width", type=int, default=None, help="hidden width (smoke tests; default: benchmark sizes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.n_samples} samples; default FD_STEP "
          f"float32 {FD_STEP[torch.float32]:g}, float64 {FD_STEP[torch.float64]:g}")
    print("accuracy: workload dtype step -> median / max relative error against the float64 double-backward product")
    for name in [] if args.cost_only else args.workloads:
        w = build_workload(name, n_samples=args.n_samples, width=args.width)
        exact_op = HessianOperator(w.model, w.loss_fn, [w.batch], dtype=torch.float64, backend="autograd")
        V = torch.randn(exact_op.dim, args.n_dirs, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        exact = exact_op.matmat(V)
        for dtype, steps in STEPS.items():
            for step in steps:
                fd = HessianOperator(w.model, w.loss_fn, [w.batch], dtype=dtype, backend="finite_difference", fd_step=step)
                approx = fd.matmat(V.to(dtype)).double()
                errs = ((approx - exact).norm(dim=0) / exact.norm(dim=0)).sort().values
                print(f"  {name:10s} {str(dtype)[6:]:8s} s={step:7.0e}  {float(errs.median()):.2e} / {float(errs[-1]):.2e}")
    print("verification cost on the measurement's operator (graphs already built): workload dtype -> seconds, "
          "in gradients of the same loss and dtype and in products of the operator (best of repeats)")
    for name in args.workloads:
        base = build_workload(name, n_samples=args.n_samples, width=args.width)
        for dtype in (torch.float32, torch.float64):
            w = base.to(dtype)
            t_grad = _best_time(w.gradient, args.repeats * 3)

            op = HessianOperator(w.model, w.loss_fn, [w.batch], dtype=dtype)
            op.matvec(torch.ones(op.dim, dtype=dtype))  # the measurement's operator, graphs built
            t_hvp = _best_time(lambda op=op, dtype=dtype: op.matvec(torch.ones(op.dim, dtype=dtype)), args.repeats * 3)

            def run(op=op):
                return verify_operator(op, generator=torch.Generator().manual_seed(0))

            result = run()
            t_ver = _best_time(run, args.repeats)
            err = "n/a" if result.rel_error is None else f"{result.rel_error:.1e}"
            print(f"  {name:10s} {str(dtype)[6:]:8s} {t_ver:.3f} s = {t_ver / t_grad:5.1f} gradients = "
                  f"{t_ver / t_hvp:4.1f} products ({result.verdict}, rel_error {err}, asymmetry "
                  f"{result.asymmetry:.1e}, n_hvp {result.n_hvp}, n_gradients {result.n_gradients})")


if __name__ == "__main__":
    main()
