"""cProfile of warm-started lambda_max + lambda_min solves (block solver) on the digits MLP.

Run::

    python benchmarks/profile_warm_solve.py [--threads 1]

``MLPClassifier()`` (64-200-200-10 tanh, 55k parameters) after 150 full-batch GD steps at lr 0.05
on the first 1000 digits training samples; a cold solve, 10 more GD steps, then five warm solves
(``eigenpairs(k=1, which="both", tol=1e-3, init=previous, method="block")``) under cProfile,
sorted by own time. ``run_backward`` is the Hessian-vector products (and the graph build); most
of the rest is the solver's dense-vector work. Also prints one product's cost in gradients.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from workloads import DigitsGD


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lightning_rpe.curvature import HessianOperator, eigenpairs

    setup = DigitsGD()
    model, (x, y), loss_fn, gd = setup.model, setup.batch, setup.loss_fn, setup.gd

    def gradient_time() -> float:
        return setup.gradient_time(20)

    gd(150)
    prev = eigenpairs(HessianOperator(model, loss_fn, [(x, y)]), k=1, which="both", tol=1e-3)
    gd(10)

    def warm():
        op = HessianOperator(model, loss_fn, [(x, y)])
        return eigenpairs(op, k=1, which="both", tol=1e-3, init=prev.eigenvectors, method="block")

    for _ in range(2):
        warm()
    g = gradient_time()
    op = HessianOperator(model, loss_fn, [(x, y)])
    v = torch.randn(op.dim, 1, generator=torch.Generator().manual_seed(0))
    op.matmat(v)
    singles = []
    for _ in range(10):
        t0 = time.perf_counter()
        op.matmat(v)
        singles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = warm()
    t_warm = time.perf_counter() - t0
    print(f"gradient {g * 1e3:.2f} ms; one product {statistics.median(singles) / g:.2f} gradients; "
          f"warm solve {res.n_hvp} HVP, {t_warm * 1e3:.1f} ms = {t_warm / g:.1f} gradient-equivalents")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        warm()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
