"""Edge of stability at several learning rates (full-batch gradient descent on digits).

Claim (Cohen et al. 2021; docs/science.md): with full-batch GD the sharpness rises until it reaches
the stability threshold 2 / lr, then hovers there while the loss keeps falling. Here the 64-200-200-10
tanh MLP (MSE on one-hot targets, 1000 digits) is trained at each learning rate; the table gives,
per lr, the step where the stability ratio first reached 0.95 and the ratio's mean, min and max
from then on (mean ± std over seeds).

    python examples/edge_of_stability.py                    # lrs 0.05,0.1,0.2, 2000 steps, 1 seed
    python examples/edge_of_stability.py --seeds 0,1,2 --steps 3000
    python examples/edge_of_stability.py --smoke            # seconds; checks that it runs
    lightning-rpe report runs/edge_of_stability             # figures of every run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, mean_std, parse_floats, parse_ints, quiet, run_digits, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sharpness settles at 2/lr under full-batch GD, for several lrs.")
    p.add_argument("--lrs", type=parse_floats, default=[0.05, 0.1, 0.2], help="comma-separated learning rates")
    p.add_argument("--steps", type=int, default=2000, help="gradient-descent steps per run")
    p.add_argument("--seeds", type=parse_ints, default=[0], help="comma-separated seeds")
    p.add_argument("--every", type=int, default=50, help="measure every this many steps")
    p.add_argument("--out", default="runs/edge_of_stability", help="folder for the runs' logs and results.md")
    p.add_argument("--smoke", action="store_true", help="tiny configuration that finishes in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.lrs, args.steps, args.seeds, args.every = [0.2], 20, [0], 10
    quiet()
    out = Path(args.out)
    t0 = time.perf_counter()
    results = []
    for lr in args.lrs:
        for seed in args.seeds:
            r = run_digits(out / f"lr{lr:g}_seed{seed}", lr=lr, steps=args.steps, seed=seed, every=args.every,
                           top_k=1, hidden=(200, 200) if not args.smoke else (16,))
            results.append(r)
            print(f"lr={lr:g} seed={seed}: final sharpness {r['final_sharpness']:.2f} (2/lr = {2 / lr:.1f}), "
                  f"ratio {r['final_ratio']:.3f}, crossing step {r['crossing_step']}, {r['seconds']:.0f} s",
                  flush=True)
    rows = []
    for lr in args.lrs:
        rs = [r for r in results if r["lr"] == lr]
        crossed = [r for r in rs if r["crossing_step"] is not None]
        rows.append([f"{lr:g}", f"{2 / lr:.1f}", mean_std([r["final_sharpness"] for r in rs]),
                     f"{len(crossed)}/{len(rs)}",
                     mean_std([float(r["crossing_step"]) for r in crossed]),
                     mean_std([r["ratio_after_crossing_mean"] for r in crossed]),
                     mean_std([r["ratio_after_crossing_min"] for r in crossed]),
                     mean_std([r["ratio_after_crossing_max"] for r in crossed]),
                     mean_std([r["final_train_loss"] for r in rs]), mean_std([r["test_acc"] for r in rs])])
    table = markdown_table(["lr", "2/lr", "final sharpness", "reached 0.95·2/lr", "first step ratio ≥ 0.95",
                            "ratio after (mean)", "ratio after (min)", "ratio after (max)", "final train loss",
                            "test acc"], rows)
    header = (f"Edge of stability: {time.strftime('%Y-%m-%d')}, command: python examples/edge_of_stability.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}; seeds {args.seeds}; {args.steps} steps; "
              f"measured every {args.every} steps; total {time.perf_counter() - t0:.0f} s")
    write_results(out, header, table, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
