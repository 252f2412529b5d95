"""Optimizers: ClippedAdam restores the instabilities that Adam's denominator suppresses."""

from lightning_rpe.optim.clipped_adam import ClippedAdam, ClipStatistics

__all__ = ["ClipStatistics", "ClippedAdam"]
