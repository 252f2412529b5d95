"""SGD batch-size sweep with the learning rate scaled linearly with the batch size.

Claim tested (docs/science.md, claim 5): the flattening caused by instabilities persists under SGD and
outweighs minibatch noise. With lr = base_lr * B / 1000 the gradient-noise scale lr / B is the
same for every batch size B, so differences in the final sharpness come from the learning rate
(the instability), not from the noise. If instabilities flatten, the final sharpness should fall
roughly like 2 / lr as B (and lr) grow; if noise dominated, it would stay put.

Every run sees the same number of epochs of the 1000 digits (steps = epochs * 1000 / B, shuffled,
last partial batch dropped). Sharpness is measured on the fixed probe set (all 1000 training
samples) about 20 times per run. Table: mean ± std over seeds.

    python examples/batch_size_sweep.py                       # B = 100,250,500,1000, base lr 0.2, 400 epochs
    python examples/batch_size_sweep.py --seeds 0,1,2
    python examples/batch_size_sweep.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, mean_std, parse_ints, quiet, run_digits, write_results  # noqa: E402

N_TRAIN = 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="SGD batch-size sweep with lr proportional to the batch size.")
    p.add_argument("--batch-sizes", type=parse_ints, default=[100, 250, 500, 1000], dest="batch_sizes",
                   help="comma-separated batch sizes (1000 = full batch)")
    p.add_argument("--base-lr", type=float, default=0.2, dest="base_lr",
                   help="learning rate at batch size 1000; lr = base_lr * B / 1000")
    p.add_argument("--epochs", type=int, default=400, help="passes over the 1000 training samples, every run")
    p.add_argument("--seeds", type=parse_ints, default=[0], help="comma-separated seeds")
    p.add_argument("--measurements", type=int, default=20, help="about this many measurements per run")
    p.add_argument("--out", default="runs/batch_size_sweep", help="folder for the runs' logs and results.md")
    p.add_argument("--smoke", action="store_true", help="tiny configuration that finishes in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.epochs, args.seeds, args.measurements = [250, 1000], 3, [0], 2
    quiet()
    out = Path(args.out)
    t0 = time.perf_counter()
    results = []
    for b in args.batch_sizes:
        lr = args.base_lr * b / N_TRAIN
        steps = args.epochs * (N_TRAIN // b)
        every = max(1, steps // args.measurements)
        for seed in args.seeds:
            r = run_digits(out / f"bs{b}_lr{lr:g}_seed{seed}", lr=lr, steps=steps, seed=seed,
                           batch_size=None if b >= N_TRAIN else b, every=every, top_k=1,
                           hidden=(200, 200) if not args.smoke else (16,))
            r["batch"] = b
            results.append(r)
            print(f"B={b} lr={lr:g} seed={seed}: final sharpness {r['final_sharpness']:.2f} (2/lr {2 / lr:.1f}), "
                  f"test acc {r['test_acc']:.3f}, {r['seconds']:.0f} s", flush=True)
    rows = []
    for b in args.batch_sizes:
        rs = [r for r in results if r["batch"] == b]
        lr = rs[0]["lr"]
        rows.append([str(b), f"{lr:g}", str(rs[0]["steps"]), f"{2 / lr:.1f}", mean_std([r["final_sharpness"] for r in rs]),
                     mean_std([r["max_sharpness"] for r in rs]), mean_std([r["final_ratio"] for r in rs]),
                     mean_std([r["max_ratio"] for r in rs]), mean_std([r["final_probe_loss"] for r in rs]),
                     mean_std([r["test_acc"] for r in rs])])
    table = markdown_table(["batch", "lr", "steps", "2/lr", "final sharpness", "max sharpness", "final ratio",
                            "max ratio", "final loss (all 1000)", "test acc"], rows)
    header = (f"Batch-size sweep: {time.strftime('%Y-%m-%d')}, command: python examples/batch_size_sweep.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}; seeds {args.seeds}; {args.epochs} epochs; "
              f"lr = {args.base_lr:g} * B / 1000; total {time.perf_counter() - t0:.0f} s")
    write_results(out, header, table, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
