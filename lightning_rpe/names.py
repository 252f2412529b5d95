"""Every logged metric name in one place: the monitor, the controller, the TensorBoard layout and the report.

Pure Python. A logged tag is ``prefix + name`` (``prefix`` defaults to ``"rpe/"``), and a per
param-group value adds ``/pg<i>`` with ``i`` counted from 1 (``pg1`` is ``optimizer.param_groups[0]``).
:class:`MetricNames` builds the tags for one prefix; the report reads runs through the same object,
so a monitor logging with another ``prefix`` is read back correctly.

The definitions of the quantities are in ``docs/metrics.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "MetricNames"]

DEFAULT_PREFIX = "rpe/"

# measurement (SharpnessMonitor)
SHARPNESS = "sharpness"
EIG = "eig_"  # eig_1 .. eig_k
LAMBDA_MIN = "lambda_min"
THRESHOLD = "threshold"
STABILITY_RATIO = "stability_ratio"
PRECONDITIONED_SHARPNESS = "preconditioned_sharpness"
TRACE = "trace"
TRACE_SE = "trace_se"  # standard error of the stochastic trace estimate
ROTATION_COS = "rotation_cos"
ROTATION_ANGLE = "rotation_angle"
SUBSPACE_SIMILARITY = "subspace_similarity"
SUBSPACE_SIMILARITY_TO_FIRST = "subspace_similarity_to_first"
POLARITY = "polarity"
POLARITY_FLIPS = "polarity_flips"
GRAD_ALIGNMENT = "grad_alignment"
PROBE_LOSS = "probe_loss"
HVPS = "hvps"
MEASURE_SECONDS = "measure_seconds"
SHARPNESS_RESIDUAL = "sharpness_residual"  # ||H v_1 - lambda_1 v_1||: bounds |error| of sharpness
LAMBDA_MIN_RESIDUAL = "lambda_min_residual"
EIGENVALUE_CROSSINGS = "eigenvalue_crossings"  # cumulative top-k order swaps (eigenvectors matched by overlap)
BATCH_SHARPNESS = "batch_sharpness"
BATCH_SHARPNESS_SE = "batch_sharpness_se"
BATCH_SHARPNESS_RATIO = "batch_sharpness_ratio"
FINITE_DIFFERENCE = "finite_difference"  # 1 when the finite-difference backend produced the measurement
VERIFY_ERROR = "verify_error"  # relative error of an exact product against finite differences
UNVERIFIED = "unverified"  # 1 when a product check failed and the numbers come from the unchecked path
CLIP_FRACTION = "clip_fraction"  # ClippedAdam: fraction of coordinates whose denominator was clipped
CLIP_LEVEL = "clip_level"
# controller (InstabilityController)
LR_SCALE = "lr_scale"
LR = "lr"
CONTROLLER_RATIO = "controller_ratio"
CONTROLLED_RATIO = "controlled_ratio"  # the stability ratio of the controlled param groups alone
TARGET_RATIO = "target_ratio"
BAND_LOW = "band_low"
BAND_HIGH = "band_high"
ROLLBACKS = "rollbacks"


@dataclass(frozen=True)
class MetricNames:
    """Logged tags for one ``prefix``.

    Attributes are the full tags (``names.sharpness == "rpe/sharpness"``); :meth:`eig` and
    :meth:`group` build indexed ones.
    """

    prefix: str = DEFAULT_PREFIX

    def tag(self, name: str) -> str:
        """``prefix + name``."""
        return self.prefix + name

    def eig(self, i: int) -> str:
        """Tag of the i-th largest eigenvalue (``i`` from 1)."""
        return self.tag(f"{EIG}{i}")

    def group(self, name: str, i: int) -> str:
        """Tag of ``name`` for param group ``i`` (``i`` from 1: ``pg1`` is ``param_groups[0]``)."""
        return self.tag(f"{name}/pg{i}")

    def eig_pattern(self) -> str:
        """Anchored regex matching ``eig_1 .. eig_k``."""
        return f"^{re.escape(self.tag(EIG))}[0-9]+$"

    def grouped_pattern(self, name: str) -> str:
        """Anchored regex matching ``name`` and its per-group variants ``name/pgN``."""
        return f"^{re.escape(self.tag(name))}(/pg[0-9]+)?$"

    def __getattr__(self, attr: str) -> str:
        value = _NAMES.get(attr)
        if value is None:
            raise AttributeError(f"MetricNames has no metric {attr!r}; known: {', '.join(sorted(_NAMES))}")
        return self.prefix + value


_NAMES = {
    key.lower(): value
    for key, value in dict(globals()).items()
    if key.isupper() and isinstance(value, str) and key not in {"DEFAULT_PREFIX", "EIG"}
}
