"""Learning-rate sweep with full-batch gradient descent: flatness, accuracy and eigenvector rotation.

Claims tested (docs/science.md): training beyond the stability threshold (lr * sharpness > 2) finds
flatter solutions (final sharpness ~ 2/lr instead of the sharpness GD would reach), the leading
Hessian eigenvectors rotate more at larger lr, and test accuracy peaks at large but not excessive
learning rates (a "Goldilocks zone").

The 64-200-200-10 tanh MLP (MSE, 1000 digits) is trained for the same number of steps at each lr.
Per lr (mean ± std over seeds): final sharpness, whether the run reached the edge of stability
(ratio >= 0.95), the largest stability ratio, the most negative eigenvalue seen after the
initial measurement (instabilities make it spike; at initialisation it is set by the random
weights and equal across lrs for one seed), the mean rotation
angle of the leading eigenvector between consecutive measurements, the similarity between the
top-3 eigenvector subspace early in training (after --early-fraction of the steps) and at the end
("rotated" when below 0.7), final training loss and test accuracy.

    python examples/lr_sweep.py                              # 7 lrs from 0.01 to 1, 1500 steps, 1 seed
    python examples/lr_sweep.py --seeds 0,1,2
    python examples/lr_sweep.py --smoke
    lightning-rpe report runs/lr_sweep                       # sweep.png: sharpness/accuracy vs lr
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, mean_std, parse_floats, parse_ints, quiet, run_digits, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Full-batch GD learning-rate sweep on digits: flatness, accuracy, rotation.")
    p.add_argument("--lrs", type=parse_floats, default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
                   help="comma-separated learning rates")
    p.add_argument("--steps", type=int, default=1500, help="gradient-descent steps per run (same for every lr)")
    p.add_argument("--seeds", type=parse_ints, default=[0], help="comma-separated seeds")
    p.add_argument("--every", type=int, default=50, help="measure every this many steps")
    p.add_argument("--early-fraction", type=float, default=0.1, dest="early_fraction",
                   help="the 'early' subspace is taken after this fraction of the steps (0 = at initialisation)")
    p.add_argument("--out", default="runs/lr_sweep", help="folder for the runs' logs, results.md and the report")
    p.add_argument("--no-report", action="store_true", help="skip lightning-rpe report over the runs")
    p.add_argument("--smoke", action="store_true", help="tiny configuration that finishes in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.lrs, args.steps, args.seeds, args.every = [0.05, 0.2], 20, [0], 10
    quiet()
    out = Path(args.out)
    early = int(round(args.early_fraction * args.steps))
    t0 = time.perf_counter()
    results = []
    for lr in args.lrs:
        for seed in args.seeds:
            r = run_digits(out / f"lr{lr:g}_seed{seed}", lr=lr, steps=args.steps, seed=seed, every=args.every,
                           top_k=3, early_step=early, hidden=(200, 200) if not args.smoke else (16,))
            results.append(r)
            print(f"lr={lr:g} seed={seed}: sharpness {r['final_sharpness']:.2f} (2/lr {2 / lr:.1f}), test acc "
                  f"{r['test_acc']:.3f}, similarity early->final {r['similarity_to_first']:.3f}, "
                  f"{r['seconds']:.0f} s", flush=True)
    rows = []
    for lr in args.lrs:
        rs = [r for r in results if r["lr"] == lr]
        ok = [r for r in rs if not r["diverged"]]
        sims = [r["similarity_to_first"] for r in ok if not math.isnan(r["similarity_to_first"])]
        rows.append([
            f"{lr:g}", f"{2 / lr:.1f}", mean_std([r["final_sharpness"] for r in ok]),
            f"{sum(r['crossing_step'] is not None for r in ok)}/{len(rs)}",
            mean_std([r["max_ratio"] for r in ok]),
            mean_std([r["min_lambda_min_after_init"] for r in ok]),
            mean_std([r["mean_rotation_angle"] for r in ok]),
            mean_std(sims), f"{sum(s < 0.7 for s in sims)}/{len(sims)}",
            mean_std([r["final_train_loss"] for r in ok]), mean_std([r["test_acc"] for r in ok]),
            f"{len(rs) - len(ok)}/{len(rs)}",
        ])
    table = markdown_table(["lr", "2/lr", "final sharpness", "reached EoS", "max ratio", "min λ_min (after init)",
                            "mean rotation angle (°)", "subspace sim. early→final", "rotated (<0.7)",
                            "final train loss", "test acc", "diverged"], rows)
    header = (f"LR sweep: {time.strftime('%Y-%m-%d')}, command: python examples/lr_sweep.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}; seeds {args.seeds}; {args.steps} steps; "
              f"measured every {args.every} steps; early subspace at step {early}; "
              f"total {time.perf_counter() - t0:.0f} s")
    write_results(out, header, table, results)
    if not args.no_report:
        from lightning_rpe.report import write_report

        write_report([out / f"lr{lr:g}_seed{s}" for lr in args.lrs for s in args.seeds], out=out / "report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
