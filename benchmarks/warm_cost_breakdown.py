"""Where the time of a warm measurement goes, in gradient-equivalents (issue 12).

Run::

    python benchmarks/warm_cost_breakdown.py [--threads 1] [--steps 100] [--repeats 7]

Trains ``lightning_rpe.models.MLPClassifier()`` (64-200-200-10 tanh, MSE, 55k parameters) by
full-batch GD (lr 0.05) on the first 1000 digits training samples for ``--steps`` steps after a
cold solve, then times, ``--repeats`` times each (median), the pieces of what
``SharpnessMonitor`` does per warm measurement at its defaults (``top_k=1``, ``lambda_min=True``,
tol 1e-3, ``lambda_min_tol`` 1e-2, warm Lanczos): building the ``HessianOperator`` (parameter
snapshot), ``loss_and_gradient()`` (which builds the double-backward graph), the warm
``eigenpairs`` solve with the residual and with the eigenvalue-error rule (gap from the cold solve),
and one product on the built graph. Every time is divided by one gradient of the mean loss over
the same 1000 samples (forward + backward, timed in the same rounds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from workloads import DigitsGD


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lightning_rpe.curvature import HessianOperator, eigenpairs

    setup = DigitsGD()
    model, batch, params, loss_fn, gd = setup.model, setup.batch, setup.params, setup.loss_fn, setup.gd

    kw = {"k": 1, "which": "both", "tol": 1e-3, "tol_smallest": 1e-2, "method": "lanczos"}
    prev = eigenpairs(HessianOperator(model, loss_fn, [batch]), **kw)  # cold
    gd(args.steps - args.every)
    prev = eigenpairs(HessianOperator(model, loss_fn, [batch]), init=prev.eigenvectors, **kw)
    gd(args.every)
    rows: dict[str, list[float]] = {k: [] for k in ("gradient", "operator", "graph", "product", "warm residual",
                                                    "warm eigenvalue")}
    hvps: dict[str, list[int]] = {"warm residual": [], "warm eigenvalue": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        torch.autograd.grad(model.compute_loss(batch), params)
        rows["gradient"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        op = HessianOperator(model, loss_fn, [batch])
        rows["operator"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        op.loss_and_gradient()
        rows["graph"].append(time.perf_counter() - t0)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        op.matvec(v)
        rows["product"].append(time.perf_counter() - t0)
        for name, extra in (("warm residual", {}), ("warm eigenvalue", {"criterion": "eigenvalue", "gap": prev.gaps})):
            t0 = time.perf_counter()
            res = eigenpairs(op, init=prev.eigenvectors, **kw, **extra)
            rows[name].append(time.perf_counter() - t0)
            hvps[name].append(res.n_hvp)
    g = statistics.median(rows["gradient"])
    print(f"digits MLP 55,210 parameters, step {args.steps}, {args.threads} thread(s), median of {args.repeats}; "
          f"one gradient {g * 1e3:.2f} ms")
    for name, times in rows.items():
        extra = f", {statistics.median(hvps[name]):g} HVP" if name in hvps else ""
        print(f"{name:>16}: {statistics.median(times) * 1e3:8.2f} ms = {statistics.median(times) / g:5.2f} gradients{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
