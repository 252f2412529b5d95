"""Shared code of the example scripts: one monitored training run on the digits data, and tables.

Each run writes TensorBoard logs (readable by ``lightning-rpe report``) to its own folder and
returns the numbers the examples tabulate, read back from those event files.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_rpe import SharpnessMonitor
from lightning_rpe.curvature import HessianOperator, eigenpairs
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.models import MLPClassifier
from lightning_rpe.report import load_run


def run_digits(
    out_dir: Path,
    lr: float,
    steps: int,
    seed: int = 0,
    batch_size: int | None = None,
    every: int = 100,
    top_k: int = 3,
    early_step: int = 0,
    n_train: int = 1000,
    hidden: Sequence[int] = (200, 200),
) -> dict[str, Any]:
    """Train the digits tanh MLP (MSE, plain SGD/GD at ``lr``) with the monitor; return its numbers.

    ``batch_size=None`` is full-batch gradient descent. The monitor measures on a fixed probe set
    (the whole training set) every ``every`` optimizer steps, at the start and at the end; its
    top-k subspace measured first at or after ``early_step`` is the reference of
    ``rpe/subspace_similarity_to_first`` (the early -> final similarity in the tables).
    """
    out_dir = Path(out_dir)
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(n_train=n_train, batch_size=batch_size, seed=seed, drop_last=batch_size is not None)
    data.setup()
    model = MLPClassifier(hidden=tuple(hidden), lr=lr)
    monitor = SharpnessMonitor(every_n_steps=every, top_k=top_k, lambda_min=True, probe_size=n_train,
                               probe_batch_size=n_train, reference_step=early_step)
    logger = TensorBoardLogger(save_dir=str(out_dir), name="", version="", default_hp_metric=False)
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[monitor], log_every_n_steps=10, check_val_every_n_epoch=10**9,
                         num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    (test,) = trainer.test(model, datamodule=data, verbose=False)
    logger.experiment.flush()
    seconds = time.perf_counter() - t0
    run = load_run(out_dir)
    sharp, ratio, angle = run.get("rpe/sharpness"), run.get("rpe/stability_ratio"), run.get("rpe/rotation_angle")
    lam_min = run.get("rpe/lambda_min")
    loss = run.get("train_loss")
    probe_loss = run.get("rpe/probe_loss")
    to_first = run.get("rpe/subspace_similarity_to_first")
    crossing = None
    after: list[float] = []
    if ratio is not None:
        idx = [i for i, r in enumerate(ratio.values) if r >= 0.95]
        if idx:
            crossing = int(ratio.steps[idx[0]])
            after = [float(r) for r in ratio.values[idx[0]:]]
    diverged = loss is None or not math.isfinite(loss.last)
    return {
        "lr": lr,
        "seed": seed,
        "batch_size": batch_size,
        "threshold": 2.0 / lr,
        "steps": int(trainer.global_step),
        "final_sharpness": sharp.last if sharp is not None else float("nan"),
        "max_sharpness": float(sharp.values.max()) if sharp is not None else float("nan"),
        "final_ratio": ratio.last if ratio is not None else float("nan"),
        "max_ratio": float(ratio.values.max()) if ratio is not None else float("nan"),
        "crossing_step": crossing,
        "ratio_after_crossing_mean": statistics.fmean(after) if after else float("nan"),
        "ratio_after_crossing_min": min(after) if after else float("nan"),
        "ratio_after_crossing_max": max(after) if after else float("nan"),
        "mean_rotation_angle": float(angle.values.mean()) if angle is not None else float("nan"),
        "max_rotation_angle": float(angle.values.max()) if angle is not None else float("nan"),
        "min_lambda_min": float(lam_min.values.min()) if lam_min is not None else float("nan"),
        "min_lambda_min_after_init": float(lam_min.values[lam_min.steps > 0].min())
        if lam_min is not None and (lam_min.steps > 0).any() else float("nan"),
        "similarity_to_first": to_first.last if to_first is not None else float("nan"),
        "final_train_loss": loss.last if loss is not None else float("nan"),
        "final_probe_loss": probe_loss.last if probe_loss is not None else float("nan"),
        "test_acc": float(test["test_acc"]),
        "diverged": diverged,
        "measurements": len(sharp) if sharp is not None else 0,
        "seconds": seconds,
        "run_dir": str(out_dir),
    }


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` over seeds (just the value for one seed); NaNs are skipped."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    if len(vals) == 1:
        return _num(vals[0])
    return f"{_num(statistics.fmean(vals))} ± {_num(statistics.stdev(vals))}"


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dict_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    """A Markdown table of the ``cols`` of each row dict (floats to 4 significant digits)."""
    return markdown_table(cols, [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows])


def write_results(out: Path, header: str, table: str, results: Any) -> None:
    """Write ``results.md`` (header and table) and ``results.json`` to ``out`` and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(header)
    print(table)


def final_sharpness(model: MLPClassifier, batch: Any) -> float:
    """lambda_max of the Hessian of the training loss on ``batch`` (float64 Lanczos, tol 1e-6)."""
    op = HessianOperator(model, lambda m, b: m.compute_loss(b), [batch], dtype=torch.float64)
    res = eigenpairs(op, k=1, tol=1e-6, generator=torch.Generator().manual_seed(0))
    return float(res.eigenvalues[0])


def parse_floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def quiet() -> None:
    """Silence Lightning's informational output in the examples."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
