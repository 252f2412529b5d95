"""Where a SharpnessMonitor warm measurement spends its time, piece by piece, in CPU time (issue 12).

Run::

    python benchmarks/warm_pieces.py [--steps 200] [--criterion auto] [--threads 1]

The run of ``bench_monitor.py`` (digits tanh MLP 64-200-200-10, 55,210 parameters, full-batch GD at
lr 0.05, ``SharpnessMonitor(every_n_steps=10, top_k=1, lambda_min=True, probe_size=1000)``) with
the functions a measurement calls wrapped in timers: the operator's construction, the graph build
with the probe gradient (``loss_and_gradient``), the products (``HessianOperator._matmat``), the
rest of the eigen-solve (``eigenpairs`` less its products; its warm start vector separately), the
crossing check, thresholds, step scales, gradient alignment, the tracker's update and the whole
``_run``. Times are **CPU time of the thread** (``time.thread_time``), so that other processes on a
loaded machine do not enter them; gradient-equivalents divide by one gradient of the mean loss over
the 1000 probe samples, also in CPU time (median of 21, timed after the fit). Medians over the warm
measurements (all but the first). With ``--threads 1`` the thread's CPU time is all the work.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def _timed(name: str, fn: Callable[..., Any], cur: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            cur[name] = cur.get(name, 0.0) + time.thread_time() - t0

    return wrapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--criterion", default=None, choices=["residual", "eigenvalue", "auto"],
                        help="SharpnessMonitor(criterion=...); default: not passed (the monitor's default)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import bench_monitor as bm

    from lightning_rpe import geometry, measure
    from lightning_rpe.callbacks import sharpness_monitor as smod
    from lightning_rpe.curvature import eigen, hessian

    cur: dict[str, float] = {}
    rows: dict[str, list[float]] = collections.defaultdict(list)
    patches = [
        (measure, "HessianOperator", "operator construction"),
        (measure, "eigenpairs", "eigen-solve"),
        (measure, "previous_still_eigenvector", "crossing check"),
        (measure, "group_thresholds", "thresholds"),
        (measure, "step_scales", "step scales"),
        (measure, "gradient_alignment", "gradient alignment"),
        (hessian.HessianOperator, "loss_and_gradient", "graph build + probe gradient"),
        (hessian.HessianOperator, "_matmat", "products"),
        (eigen, "_warm_start_vector", "warm start vector"),
        (geometry.EigenvectorTracker, "update", "tracker update"),
    ]
    for owner, attr, name in patches:
        setattr(owner, attr, _timed(name, getattr(owner, attr), cur))
    original = smod.SharpnessMonitor._run
    hvps: list[int] = []

    def run(self: Any, trainer: Any, pl_module: Any, batches: Any, trigger: str) -> None:
        cur.clear()
        t0 = time.thread_time()
        original(self, trainer, pl_module, batches, trigger)
        total = time.thread_time() - t0
        if self.n_measurements >= 2 and self.latest is not None and self.latest.step == trainer.global_step:
            cur["whole measurement (_run, logging included)"] = total
            for key, value in cur.items():
                rows[key].append(value)
            hvps.append(self.latest.n_hvp)

    smod.SharpnessMonitor._run = run
    kwargs: dict[str, Any] = dict(every_n_steps=10, top_k=1, lambda_min=True, probe="fixed", probe_size=1000)
    if args.criterion is not None:
        kwargs["criterion"] = args.criterion
    out = bm.fit_once(args.steps, [200, 200], 0.05, 1000, kwargs)
    model, dm = out["model"], out["datamodule"]
    x, y = bm.probe_tensors(dm, 1000)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for _ in range(21):
        t0 = time.thread_time()
        torch.autograd.grad(model.compute_loss((x, y)), params)
        grads.append(time.thread_time() - t0)
    g = statistics.median(grads)
    solver = [e - p - w for e, p, w in zip(rows["eigen-solve"], rows["products"], rows["warm start vector"])]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), load {os.getloadavg()[0]:.2f}; criterion {args.criterion or 'default'}; {len(hvps)} warm measurements, "
          f"HVPs median {statistics.median(hvps):g} ({min(hvps)}-{max(hvps)}); one gradient {g * 1e3:.2f} ms CPU")
    order = ["operator construction", "graph build + probe gradient", "warm start vector", "products",
             "eigen-solve", "crossing check", "thresholds", "step scales", "gradient alignment", "tracker update",
             "whole measurement (_run, logging included)"]
    for key in order:
        if rows.get(key):
            m = statistics.median(rows[key])
            print(f"| {key} | {m * 1e3:.2f} ms | {m / g:.2f} |")
    m = statistics.median(solver)
    print(f"| solver work besides products and start vector | {m * 1e3:.2f} ms | {m / g:.2f} |")
    per = statistics.median(p / h for p, h in zip(rows["products"], hvps))
    print(f"| one product (products / HVPs) | {per * 1e3:.2f} ms | {per / g:.2f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
