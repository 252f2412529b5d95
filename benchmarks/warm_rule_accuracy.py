"""Products and accuracy of the warm solves under each stopping rule, along a GD trajectory (issue 12).

Run::

    python benchmarks/warm_rule_accuracy.py [--steps 200] [--every 10] [--threads 1]

``lightning_rpe.models.MLPClassifier()`` (64-200-200-10 tanh, MSE, 55,210 parameters) trained by
full-batch GD at lr 0.05 on the first 1000 digits training samples (the trajectory of
``bench_monitor.py``). After a cold Lanczos solve (lambda_max at tol 1e-3, lambda_min at 1e-2),
every ``--every`` steps each variant re-solves from its own previous eigenvectors and gap estimates,
as the monitor does: Lanczos or the block solver, with the residual rule, the eigenvalue rule on
every pair, or the eigenvalue rule on the lambda_min pair only (what ``criterion="auto"`` does with
SGD). Against a tight float64 Lanczos solve (tol 1e-7) of the same Hessian it prints, over the warm
solves: median and max products, the largest errors of lambda_max and lambda_min (relative to
lambda_max) and the median and largest angle between the returned and the true ``v_1`` in degrees.
Products do not depend on the machine's load; nothing here is timed.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from workloads import DigitsGD

VARIANTS = {
    "lanczos, residual": ("lanczos", "residual", None),
    "lanczos, eigenvalue (both pairs)": ("lanczos", "eigenvalue", "both"),
    "lanczos, eigenvalue (lambda_min only)": ("lanczos", "eigenvalue", "min"),
    "block, residual": ("block", "residual", None),
    "block, eigenvalue (both pairs)": ("block", "eigenvalue", "both"),
    "block, eigenvalue (lambda_min only)": ("block", "eigenvalue", "min"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lightning_rpe.curvature import HessianOperator, eigenpairs
    from lightning_rpe.measure import stopping_rule

    setup = DigitsGD()
    kw = {"k": 1, "which": "both", "tol": 1e-3, "tol_smallest": 1e-2}
    cold = eigenpairs(HessianOperator(setup.model, setup.loss_fn, [setup.batch]), method="lanczos", **kw)
    state = {name: (cold.eigenvectors, tuple(float(g) for g in cold.gaps)) for name in VARIANTS}
    rows: dict[str, list[tuple[int, float, float, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.every, args.steps + 1, args.every):
        setup.gd(args.every)
        ref = eigenpairs(HessianOperator(setup.model, setup.loss_fn, [setup.batch], dtype=torch.float64), k=1,
                         which="both", tol=1e-7, max_hvp=400, method="lanczos", max_basis=60)
        lam1, lmin, u1 = float(ref.eigenvalues[0]), float(ref.eigenvalues[1]), ref.eigenvectors[:, 0]
        op = HessianOperator(setup.model, setup.loss_fn, [setup.batch])
        op.loss_and_gradient()
        for name, (method, rule, which) in VARIANTS.items():
            init, gaps = state[name]
            criterion, gap = "residual", None
            if rule == "eigenvalue":
                criterion, gap = stopping_rule("eigenvalue" if which == "both" else "auto", gaps, 2, 1)
            res = eigenpairs(op, init=init, method=method, criterion=criterion, gap=gap, **kw)
            state[name] = (res.eigenvectors, tuple(float(g) for g in res.gaps) if res.gaps is not None else gaps)
            cos = abs(float(res.eigenvectors[:, 0].double() @ u1))
            rows[name].append((res.n_hvp, abs(float(res.eigenvalues[0]) - lam1) / lam1,
                               abs(float(res.eigenvalues[1]) - lmin) / lam1, math.degrees(math.acos(min(1.0, cos)))))
    print(f"digits MLP, GD lr 0.05, warm solves every {args.every} steps up to step {args.steps} "
          f"({len(next(iter(rows.values())))} solves), {torch.get_num_threads()} thread(s)")
    print("| warm solve | median HVP | max HVP | max error lambda_max | max error lambda_min | v_1 angle median | v_1 angle max |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        h = [r[0] for r in rs]
        print(f"| {name} | {statistics.median(h):g} | {max(h)} | {max(r[1] for r in rs):.1e} | {max(r[2] for r in rs):.1e} | "
              f"{statistics.median(r[3] for r in rs):.2f} deg | {max(r[3] for r in rs):.2f} deg |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
