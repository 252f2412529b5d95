"""The floor under "lambda_max at 1e-4 in half PyHessian's time": products no Krylov solve can save.

Run::

    PYTHONPATH=.benchlibs python benchmarks/engine_oracle_floor.py [--seeds 5] [--threads 1]

On the three engine workloads of ``bench_engine.py`` (``benchmarks/workloads.py``), for each seed:

* the truth: lambda_max by float64 Lanczos at ``tol=1e-10``;
* an *oracle* Lanczos (``workloads.oracle_lanczos``, float64) from ``torch.randn(dim)`` of that seed:
  the first product count ``m`` after which its largest Ritz value is within ``1e-4`` of lambda_max
  (relative). The largest Ritz value of a Krylov space is the largest Rayleigh quotient over it, so
  no method that builds its iterates from ``m`` products starting at that vector (power iteration,
  restarted or block-free Lanczos, any stopping rule) has a better estimate after ``m`` products:
  ``m`` is a lower bound, before any stopping rule has certified anything;
* PyHessian 0.1's default top-1 (power iteration, ``maxIter=100``, ``tol=1e-3``): its products and
  error (only if PyHessian is importable, e.g. ``PYTHONPATH=.benchlibs``);
* lightning-rpe's own ``eigenpairs(k=1, tol=1e-3)`` in float32: products and error.

The time ratio both libraries pay is ``(build + products * product) / (build + P * product)``
with the graph build and one product priced in float32 in the same process (median of 7); the
floor ratio uses ``m``. Both use double backward on a cached graph, so a product costs the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import build_workload, oracle_lanczos, product_prices  # noqa: E402

from lightning_rpe.curvature import HessianOperator, eigenpairs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workloads", nargs="+", default=["mlp_small", "cnn", "mlp_wide"])
    parser.add_argument("--max-products", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import pyhessian  # noqa: F401
        from bench_engine import pyhessian_top1
    except ImportError:
        pyhessian_top1 = None
        print("PyHessian not importable: its columns are left out (PYTHONPATH=.benchlibs)")

    print(f"{args.threads} thread(s); float64 oracle, float32 prices")
    for name in args.workloads:
        w = build_workload(name)
        w64 = w.to(torch.float64)
        op64 = HessianOperator(w64.model, w64.loss_fn, [w64.batch], dtype=torch.float64)
        lmax = float(eigenpairs(op64, k=1, tol=1e-10, max_hvp=min(op64.dim, 800),
                                generator=torch.Generator().manual_seed(123)).eigenvalues[0])
        g, build, prod = product_prices(w.model, w.loss_fn, w.batch)
        rows = []
        for seed in range(args.seeds):
            v0 = torch.randn(op64.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            hist = oracle_lanczos(op64.matvec, v0, args.max_products)
            m = next((i for i, (t, _) in enumerate(hist, start=1) if abs(float(t[-1]) - lmax) <= 1e-4 * abs(lmax)),
                     None)
            ours = eigenpairs(HessianOperator(w.model, w.loss_fn, [w.batch]), k=1, tol=1e-3,
                              generator=torch.Generator().manual_seed(seed))
            row = {"m": m, "ours": ours.n_hvp, "ours_err": abs(float(ours.eigenvalues[0]) - lmax) / abs(lmax)}
            if pyhessian_top1 is not None:
                value, n = pyhessian_top1(w, seed)
                row["ph"] = n
                row["ph_err"] = abs(value - lmax) / abs(lmax)
            rows.append(row)
        print(f"\n{name} ({op64.dim:,} parameters), lambda_max {lmax:.6f}; gradient {g * 1e3:.2f} ms, "
              f"graph build {build / g:.2f}, product {prod / g:.2f} gradient-equivalents")
        for seed, r in enumerate(rows):
            line = f"  seed {seed}: oracle products to 1e-4: {r['m']}; ours (tol 1e-3) {r['ours']} products, err {r['ours_err']:.1e}"
            if "ph" in r:
                floor = (build + (r["m"] or args.max_products) * prod) / (build + r["ph"] * prod)
                line += (f"; PyHessian default {r['ph']} products, err {r['ph_err']:.1e}; "
                         f"floor time ratio {floor:.2f}")
            print(line)
        ms = [r["m"] for r in rows if r["m"] is not None]
        summary = f"  median oracle products {statistics.median(ms):g}"
        if pyhessian_top1 is not None:
            ratios = [(build + r["m"] * prod) / (build + r["ph"] * prod) for r in rows if r["m"] is not None]
            summary += (f", PyHessian median {statistics.median(r['ph'] for r in rows):g}; "
                        f"floor time ratio median {statistics.median(ratios):.2f} (goal <= 0.5)")
        print(summary, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
