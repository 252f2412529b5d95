"""Which loss the SharpnessMonitor measures, and running it without side effects (private).

The loss is ``loss_fn(pl_module, batch)`` when given, else the module's ``compute_loss(batch)``,
else (opt-in) ``training_step`` re-called. While a measurement runs, the module's logging is muted
on every one of these paths (:class:`MutedLogging`), so a loss that calls ``self.log`` never
replaces a logged training value with a probe-batch value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_rpe.measure import LossFunctionError

__all__ = ["MutedLogging", "resolve_loss", "training_step_loss"]


class MutedLogging:
    """Temporarily replace ``pl_module.log`` / ``log_dict`` by no-ops."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        def noop(*args: Any, **kwargs: Any) -> None:
            return None

        self.module.__dict__["log"] = noop
        self.module.__dict__["log_dict"] = noop

    def __exit__(self, *exc: Any) -> None:
        self.module.__dict__.pop("log", None)
        self.module.__dict__.pop("log_dict", None)


def training_step_loss(module: Any, batch: Any) -> Tensor:
    """The loss tensor of ``module.training_step(batch, 0)`` (a tensor or a dict with ``"loss"``)."""
    out = module.training_step(batch, 0)
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("loss"), Tensor):
        return out["loss"]
    raise LossFunctionError(
        "training_step must return the loss tensor or a dict with a 'loss' tensor to be used as the "
        f"measured loss; got {type(out).__name__}"
    )


def resolve_loss(
    pl_module: pl.LightningModule, loss_fn: Callable[[Any, Any], Tensor] | None, use_training_step: bool
) -> tuple[Callable[[Any, Any], Tensor], bool]:
    """The measured loss ``f(model, batch)`` and whether it re-calls ``training_step``.

    Raises:
        ValueError: no loss is available, or ``use_training_step`` under manual optimization.
    """
    if loss_fn is not None:
        user = loss_fn
        return (lambda model, batch: user(model, batch)), False
    if callable(getattr(pl_module, "compute_loss", None)):
        return (lambda model, batch: model.compute_loss(batch)), False
    if use_training_step:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "SharpnessMonitor: use_training_step=True is refused under manual optimization "
                "(training_step would step the optimizer); pass loss_fn=... or define compute_loss(batch)"
            )
        return training_step_loss, True
    raise ValueError(
        f"SharpnessMonitor: no loss for {type(pl_module).__name__}: pass loss_fn=callable(pl_module, batch), "
        "define a compute_loss(batch) method on the LightningModule, or opt in with use_training_step=True"
    )
