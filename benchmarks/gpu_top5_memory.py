"""Where a monitor run's peak CUDA memory comes from: the solve and the tracker update, apart (diagnostic).

Run on a CUDA machine, from the repository root::

    PYTHONPATH=$PWD:$PWD/benchmarks python benchmarks/gpu_top5_memory.py [--top-k 5] [--steps 12] [--max-hvp N]

Trains ``gpu_scale.vision_run``'s 5.38M-parameter MLP with the monitor and prints, for every
measurement, the allocated CUDA memory before, at the peak of and after ``measure.solve`` and
``EigenvectorTracker.update`` (peak statistics reset before each), then the run's summary. A solve
that fails (a skipped measurement) is printed as well. ``--max-hvp`` forces skips.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from gpu_scale import vision_run

import lightning_rpe.callbacks.sharpness_monitor as monitor_module
from lightning_rpe.geometry import EigenvectorTracker


def _mib(x: int) -> str:
    return f"{x / 2**20:.0f} MiB"


def _traced(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            return fn(*args, **kwargs)
        finally:
            print(f"{name}: before {_mib(before)}, peak {_mib(torch.cuda.max_memory_allocated())}, "
                  f"after {_mib(torch.cuda.memory_allocated())}", flush=True)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-hvp", type=int, default=None)
    args = parser.parse_args()
    monitor_module.solve = _traced("solve", monitor_module.solve)  # type: ignore[attr-defined]
    EigenvectorTracker.update = _traced("tracker.update", EigenvectorTracker.update)  # type: ignore[method-assign]
    if args.max_hvp is not None:
        init = monitor_module.SharpnessMonitor.__init__

        def capped(self: Any, *a: Any, **k: Any) -> None:
            k.setdefault("max_hvp", args.max_hvp)
            init(self, *a, **k)

        monitor_module.SharpnessMonitor.__init__ = capped  # type: ignore[method-assign]
    r = vision_run("mlp", False, args.steps, args.top_k)
    print("RESULT", {k: v for k, v in r.items() if k not in ("measurements", "warnings")},
          [w[:150] for w in r.get("warnings", [])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
