"""Cost of one ``EigenvectorTracker.update`` (rotation, subspace similarities, polarity) at real size.

The tracker runs after every measurement on the eigenvectors where the model is (on the CPU here):
its float64 passes over the vectors are time that no product hides.
Synthetic unit vectors, ``top_k=1`` with ``lambda_min``, a reference subspace, 3 timed updates after
two untimed ones; one torch thread unless ``--threads``.

Run: ``python benchmarks/tracker_update.py [--dims 5383142 31109952] [--threads 1]``
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_rpe.geometry import EigenvectorTracker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[5_383_142, 31_109_952])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for dim in args.dims:
        g = torch.Generator().manual_seed(0)

        def unit(n: int = 1) -> torch.Tensor:
            v = torch.randn(dim, n, generator=g)
            return v / v.norm(dim=0)

        tracker, base, minimum = EigenvectorTracker(), unit(), unit()[:, 0]
        tracker.update(0, base, minimum, k=1)
        times = []
        for s in range(1, 5):
            top = base + 0.05 * unit()
            top /= top.norm(dim=0)
            t0 = time.perf_counter()
            tracker.update(10 * s, top, minimum + 0.05 * unit()[:, 0], k=1)
            times.append(time.perf_counter() - t0)
        print(f"dim {dim:>11,}: update {min(times[1:]):.3f} s (min of 3; {args.threads} thread(s))", flush=True)


if __name__ == "__main__":
    main()
