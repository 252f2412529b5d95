"""lightning-rpe: measure and steer training instabilities (sharpness, stability threshold, RPE)."""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SharpnessMonitor": "lightning_rpe.callbacks.sharpness_monitor",
    "Measurement": "lightning_rpe.callbacks.sharpness_monitor",
    "InstabilityController": "lightning_rpe.callbacks.instability_controller",
    "ClippedAdam": "lightning_rpe.optim.clipped_adam",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import lightning_rpe.curvature` must not import Lightning.
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
