"""Warm-started re-solves along a training trajectory: how many products the monitor's solve needs.

Run::

    python benchmarks/warm_start_trajectory.py [--steps 300] [--every 10] [--threads 1]

Trains ``lightning_rpe.models.MLPClassifier()`` (64-200-200-10 tanh, MSE, 55k parameters) with
full-batch GD at lr 0.05 on the first 1000 digits training samples (plain PyTorch loop, the same
updates as the Lightning run of ``bench_monitor.py``) and, every ``--every`` steps, solves for
lambda_max and lambda_min at tol 1e-3 three ways on the same operator:

* ``cold``: Lanczos from a random vector (``eigenpairs(which="both")``);
* ``lobpcg``: the block solver warm-started from the previous LOBPCG eigenvectors (what
  ``SharpnessMonitor`` does with ``warm_start=True``: ``method="auto"`` with ``init``);
* ``lanczos_warm``: Lanczos started from the previous eigenvectors (``method="lanczos"`` with
  ``init``: their normalised sum plus 10 % random).

It prints products and wall time per measurement, then medians (measurements after the first)
and the cost in gradient-equivalents (one gradient of the mean loss over the 1000 samples, timed
right before each measurement: median of 3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lightning.pytorch as pl

    from lightning_rpe.curvature import HessianOperator, eigenpairs
    from lightning_rpe.data import DigitsDataModule
    from lightning_rpe.models import MLPClassifier

    pl.seed_everything(0, verbose=False)
    model = MLPClassifier(lr=args.lr)
    dm = DigitsDataModule(n_train=1000)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(module, batch):
        return module.compute_loss(batch)

    methods = {"cold": "lanczos", "lobpcg": "auto", "lanczos_warm": "lanczos"}
    prev: dict[str, torch.Tensor] = {}
    hvps: dict[str, list[int]] = {k: [] for k in methods}
    secs: dict[str, list[float]] = {k: [] for k in methods}
    grad_units: list[float] = []

    def gradient_time() -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.autograd.grad(model.compute_loss((x, y)), params)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print("step  " + "  ".join(f"{k:>20}" for k in methods) + "   lambda_max  lambda_min")
    for step in range(args.steps + 1):
        if step % args.every == 0:
            if step > 0:
                grad_units.append(gradient_time())
            cells = []
            for name, method in methods.items():
                op = HessianOperator(model, loss_fn, [(x, y)])
                init = None if name == "cold" else prev.get(name)
                t0 = time.perf_counter()
                res = eigenpairs(op, k=1, which="both", tol=1e-3, init=init, method=method if init is not None
                                 else "lanczos", generator=torch.Generator().manual_seed(step))
                dt = time.perf_counter() - t0
                prev[name] = res.eigenvectors
                if step > 0:
                    hvps[name].append(res.n_hvp)
                    secs[name].append(dt)
                ok = "" if res.all_converged else " (not converged)"
                cells.append(f"{res.n_hvp:4d} HVP {dt * 1e3:7.1f} ms{ok}")
            print(f"{step:4d}  " + "  ".join(f"{c:>20}" for c in cells)
                  + f"   {res.lambda_max:10.4f}  {res.lambda_min:10.4f}", flush=True)
        grads = torch.autograd.grad(model.compute_loss((x, y)), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=args.lr)
    print(f"\none gradient (timed before each measurement, median): {statistics.median(grad_units) * 1e3:.2f} ms "
          f"({args.threads} thread(s))")
    for name in methods:
        eq = [t / g for t, g in zip(secs[name], grad_units)]
        print(f"{name:>12}: median {statistics.median(hvps[name]):g} HVP (max {max(hvps[name])}), "
              f"median {statistics.median(secs[name]) * 1e3:.1f} ms = {statistics.median(eq):.1f} "
              f"gradient-equivalents, {statistics.median(e / h for e, h in zip(eq, hvps[name])):.2f} per HVP")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
