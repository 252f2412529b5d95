"""Products a capped (thick-restart) Lanczos basis costs, against the unbounded one (issue 12).

Run::

    python benchmarks/basis_cap_sweep.py [--workloads mlp_small cnn] [--threads 1]

For each workload of :mod:`workloads` (digits, after its short GD warm-up), a reference lambda_max
and lambda_min from a tight float64 solve, then float32 Lanczos solves from random vectors (seeds
0, 1, 2) with ``max_basis`` 6, 8, 12 (the default for one or two pairs), 16, 24 and unbounded (the
budget): lambda_max at tol 1e-3, and lambda_max + lambda_min with ``tol_smallest`` 1e-2 (the
monitor's default) and 1e-3. Prints the largest product count over the seeds and the largest
relative errors (lambda_max; lambda_min relative to lambda_max).
"""

from __future__ import annotations

import argparse

import torch
from workloads import WORKLOADS, build_workload

from lightning_rpe.curvature import HessianOperator, eigenpairs

CAPS = (6, 8, 12, 16, 24, 400)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="*", default=["mlp_small", "cnn"], choices=WORKLOADS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.workloads:
        w = build_workload(name)

        def operator(dtype: torch.dtype = torch.float32, w=w) -> HessianOperator:
            return HessianOperator(w.model, w.loss_fn, [w.batch], dtype=dtype)

        ref = eigenpairs(operator(torch.float64), k=1, which="both", tol=1e-9, max_hvp=400, max_basis=400)
        l1, lmin = ref.eigenvalues.tolist()
        print(f"{name} ({w.n_params:,} parameters): lambda_max {l1:.6g}, lambda_min {lmin:.6g}", flush=True)
        for which, tol_smallest in (("largest", None), ("both", 1e-2), ("both", 1e-3)):
            cells = []
            for cap in CAPS:
                hvps, e1, e2 = [], [], []
                for seed in range(3):
                    r = eigenpairs(operator(), k=1, which=which, tol=1e-3, tol_smallest=tol_smallest, max_hvp=400,
                                   max_basis=cap, generator=torch.Generator().manual_seed(seed))
                    hvps.append(r.n_hvp)
                    e1.append(abs(r.lambda_max - l1) / abs(l1))
                    if which == "both":
                        e2.append(abs(r.lambda_min - lmin) / abs(l1))
                err = f"{max(e1):.0e}" + (f"/{max(e2):.0e}" if e2 else "")
                cells.append(f"cap {cap if cap < 400 else 'inf'}: {max(hvps)} HVP ({err})")
            print(f"  {which:8s} tol_smallest={tol_smallest}: " + "; ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
