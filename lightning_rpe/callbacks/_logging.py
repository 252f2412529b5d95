"""Logging helpers shared by the lightning-rpe callbacks (private).

- :func:`log_to_loggers`: write a dict of scalars to every logger of the Trainer at an explicit
  x-axis step, on global rank zero only (Lightning's own loggers are rank-zero-only as well; a
  custom logger that is not still gets nothing from other ranks).
- :func:`publish_callback_metrics`: put the same values into ``trainer.callback_metrics`` (as
  float32 scalar tensors, like ``self.log``) on every rank, so ``ModelCheckpoint``,
  ``EarlyStopping`` or an LR scheduler can monitor them.
- :func:`add_custom_scalars`: TensorBoard custom-scalars layout. The TensorBoard plugin shows one
  layout per run (the most recent one written), so every callback registers its categories here
  and the merged layout of everything registered so far is written again each time a category
  is added. Charts are ``Multiline`` charts whose entries are anchored regular expressions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_rpe.names import CLIP_FRACTION, CLIP_LEVEL, LAMBDA_MIN, STABILITY_RATIO, THRESHOLD, MetricNames

__all__ = [
    "add_custom_scalars",
    "batches_that_stepped",
    "log_to_loggers",
    "monitor_layout",
    "publish_callback_metrics",
    "tag_regex",
]

_LAYOUT_ATTR = "_lightning_rpe_custom_scalars"


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """Lightning's x axis for training-step metrics (the value ``self.log`` uses for ``train_loss``)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def log_to_loggers(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """``logger.log_metrics(metrics, step)`` for every logger, on global rank zero only."""
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def publish_callback_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Make the values visible in ``trainer.callback_metrics`` (every rank)."""
    target = trainer.callback_metrics  # the live dict of the logger connector
    for name, value in metrics.items():
        target[name] = torch.tensor(float(value), dtype=torch.float32)


def tag_regex(*tags: str) -> str:
    """An anchored regex matching exactly the given tags (for a Multiline chart)."""
    return "^(" + "|".join(re.escape(t) for t in tags) + ")$"


def add_custom_scalars(trainer: pl.Trainer, categories: Mapping[str, Mapping[str, Sequence[str]]]) -> bool:
    """Register ``{category: {chart title: [tag regex, ...]}}`` and write the merged layout.

    Writes to every ``TensorBoardLogger`` of the trainer, on global rank zero only. Returns True
    when at least one layout was written.
    """
    if not trainer.is_global_zero:
        return False
    written = False
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        if not hasattr(writer, "add_custom_scalars"):
            continue
        merged: dict[str, dict[str, list[Any]]] = getattr(writer, _LAYOUT_ATTR, None) or {}
        for category, charts in categories.items():
            slot = merged.setdefault(category, {})
            for title, regexes in charts.items():
                slot[title] = ["Multiline", list(regexes)]
        setattr(writer, _LAYOUT_ATTR, merged)
        writer.add_custom_scalars(merged)
        writer.flush()
        written = True
    return written


def monitor_layout(n: MetricNames) -> dict[str, dict[str, list[str]]]:
    """The SharpnessMonitor's custom-scalars category for the tags of ``n`` (anchored regexes)."""
    return {
        n.tag("curvature").rstrip("/"): {
            "sharpness vs stability threshold": [
                tag_regex(n.sharpness, n.preconditioned_sharpness, n.batch_sharpness),
                n.grouped_pattern(THRESHOLD),
            ],
            "spectrum: top-k and lambda_min": [n.eig_pattern(), tag_regex(n.tag(LAMBDA_MIN))],
            "stability ratio": [n.grouped_pattern(STABILITY_RATIO), tag_regex(n.batch_sharpness_ratio)],
            "rotation and polarity (degrees)": [tag_regex(n.rotation_angle, n.polarity)],
            "rotation cosines and alignment": [
                tag_regex(n.rotation_cos, n.subspace_similarity, n.subspace_similarity_to_first, n.grad_alignment)
            ],
            "solver residuals and product checks": [
                tag_regex(n.sharpness_residual, n.lambda_min_residual, n.verify_error),
            ],
            "crossings, backend, unverified": [tag_regex(n.eigenvalue_crossings, n.finite_difference, n.unverified)],
            "ClippedAdam: fraction clipped and clip level": [
                n.grouped_pattern(CLIP_FRACTION), n.grouped_pattern(CLIP_LEVEL),
            ],
        }
    }
