"""What a tighter ``lambda_min`` tolerance buys and costs on a warm-started trajectory.

Run::

    python benchmarks/lambda_min_tolerance.py [--steps 200] [--every 10] [--threads 1]

The trajectory of ``bench_monitor.py`` (``workloads.DigitsGD``: the 64-200-200-10 tanh MLP, full-batch
GD at lr 0.05 on 1000 digits). Every ``--every`` steps the truth is a float64 Lanczos solve at
``tol=1e-10``; then, for each ``tol_smallest`` in ``--tols``, a float32 Lanczos solve of lambda_max
(tol 1e-3) and lambda_min warm-started from that setting's previous vectors, as the monitor solves
them. Printed per setting: products (median, max), the error of lambda_min relative to lambda_max
(median, max), and how many reported values lie further from the exact lambda_min than their own
residual (docs/metrics.md, "Solver residuals": the residual bounds the distance to *an* eigenvalue).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import DigitsGD  # noqa: E402

from lightning_rpe.curvature import HessianOperator, eigenpairs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = DigitsGD()
    x, y = run.batch
    previous: dict[float, torch.Tensor] = {}
    rows: dict[float, list[tuple[int, float, bool]]] = {t: [] for t in args.tols}
    for step in range(args.steps + 1):
        if step % args.every == 0:
            op64 = HessianOperator(copy.deepcopy(run.model).double(), run.loss_fn, [(x.double(), y)], dtype=torch.float64)
            truth = eigenpairs(op64, k=1, which="both", tol=1e-10, max_hvp=800,
                               generator=torch.Generator().manual_seed(step))
            l1, lmin = float(truth.eigenvalues[0]), float(truth.eigenvalues[-1])
            for tol in args.tols:
                res = eigenpairs(HessianOperator(run.model, run.loss_fn, [run.batch]), k=1, which="both", tol=1e-3,
                                 tol_smallest=tol, init=previous.get(tol), method="lanczos",
                                 generator=torch.Generator().manual_seed(step))
                previous[tol] = res.eigenvectors
                if step > 0:
                    got, r = float(res.eigenvalues[-1]), float(res.residuals[-1])
                    rows[tol].append((res.n_hvp, abs(got - lmin) / abs(l1), abs(got - lmin) > r))
        run.gd(1)
    print(f"{len(rows[args.tols[0]])} warm measurements, {args.threads} thread(s)")
    for tol, rr in rows.items():
        print(f"tol_smallest {tol:g}: products median {statistics.median(r[0] for r in rr):g} (max {max(r[0] for r in rr)}), "
              f"lambda_min error / lambda_max median {statistics.median(r[1] for r in rr):.1e} "
              f"(max {max(r[1] for r in rr):.1e}), further than the residual: {sum(r[2] for r in rr)} of {len(rr)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
