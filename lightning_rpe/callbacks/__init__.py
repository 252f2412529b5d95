"""Lightning callbacks: the measuring SharpnessMonitor and the InstabilityController."""

from lightning_rpe.callbacks.instability_controller import InstabilityController
from lightning_rpe.callbacks.sharpness_monitor import Measurement, SharpnessMonitor

__all__ = ["InstabilityController", "Measurement", "SharpnessMonitor"]
