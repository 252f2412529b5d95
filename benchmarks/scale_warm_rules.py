"""Warm measurements of the monitor on bench_scale's ResNet (or MLP) under each stopping rule (issue 12).

Run::

    python benchmarks/scale_warm_rules.py [--workload resnet] [--threads 1] residual eigenvalue auto

Runs only the ``train+monitor`` part of ``bench_scale.py`` (its own subprocess per rule: Lightning
SGD, batch 256, lr 0.01, 6 steps, ``SharpnessMonitor(every_n_steps=2, probe_size=P)``, so one cold
and three warm measurements) with ``SharpnessMonitor(criterion=RULE)``, and prints every
measurement's products, wall time and gradient-equivalents (over one gradient of the mean probe
loss timed right after it) and eigenvalues, then the median of the warm ones. The training-only,
PyHessian and memory parts of ``bench_scale.py`` are not run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import bench_scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rules", nargs="+", choices=["residual", "eigenvalue", "auto"])
    parser.add_argument("--workload", default="resnet", choices=list(bench_scale.WORKLOADS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=3000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="bench_scale's tiny widths and probes (a smoke run)")
    args = parser.parse_args()
    probe = 64 if args.quick else (1000 if args.workload == "mlp" else 256)
    out = {}
    for rule in args.rules:
        cfg = {"workload": args.workload, "quick": args.quick, "threads": args.threads, "probe": probe,
               "n_train": max(probe, 512), "steps": args.steps, "tol": 1e-3, "top_k": 1, "criterion": rule}
        t0 = time.time()
        r = bench_scale.run_part("train", cfg, args.timeout)
        out[rule] = r
        print(f"[{time.strftime('%H:%M:%S')}] {args.workload} criterion={rule}: {time.time() - t0:.0f} s, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        if "error" in r:
            print("   ERROR", r["error"])
            continue
        ms = r["measurements"]
        for m in ms:
            print(f"   {m['n_hvp']} HVP, {m['seconds']:.2f} s, gradient {m['grad']:.3f} s -> "
                  f"{m['seconds'] / m['grad']:.1f} grad-eq; lambda_max {m['lambda_max']:.6g}, lambda_min {m['lambda_min']:.4g}")
        if len(ms) > 1:
            print(f"   warm: median {statistics.median(m['n_hvp'] for m in ms[1:]):g} HVP, "
                  f"{statistics.median(m['seconds'] / m['grad'] for m in ms[1:]):.1f} grad-eq")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
