"""Optimizers: ClippedAdam restores the instabilities that Adam's denominator suppresses."""

from lightning_rpe.optim.clipped_adam import ClippedAdam

__all__ = ["ClippedAdam"]
