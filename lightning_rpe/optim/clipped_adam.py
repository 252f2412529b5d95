"""ClippedAdam ("Clipped-Ada"): Adam whose denominator is clipped, restoring GD-like instabilities.

Pure PyTorch (no Lightning). Update for every coordinate, at step t (t = 1, 2, ...), gradient g::

    g      <- g + wd * theta                          (coupled L2, decoupled_weight_decay=False)
    theta  <- theta * (1 - lr * wd)                   (decoupled, AdamW, decoupled_weight_decay=True)
    m      <- beta1 * m + (1 - beta1) * g
    v      <- beta2 * v + (1 - beta2) * g^2
    m_hat  =  m / (1 - beta1^t),   v_hat = v / (1 - beta2^t)
    D      =  min(sqrt(v_hat), c)  (mode="upper")   or   max(sqrt(v_hat), c)  (mode="lower")
    theta  <- theta - lr * m_hat / (D + eps)

``upper`` (the paper's Clipped-Ada): the per-coordinate effective learning rate lr / (D + eps) is
never below lr / (c + eps), so the step is at least lr |m_hat| / (c + eps): where gradients are
large (sqrt(v_hat) > c) the optimizer acts like momentum GD with learning rate lr / (c + eps) and
Adam's self-stabilisation (a growing denominator) is capped, so the GD instabilities come back.
``lower`` (a stable control): the effective learning rate is at most lr / (c + eps), i.e. the
step is at most lr |m_hat| / (c + eps).

``c = inf`` with ``upper`` and ``c = 0`` with ``lower`` give exactly ``torch.optim.Adam`` (or
``AdamW`` with ``decoupled_weight_decay=True``). ``beta1 = 0`` gives a clipped RMSProp (with bias
correction of v). State keys are those of ``torch.optim.Adam``: ``step`` (a scalar tensor),
``exp_avg`` (m) and ``exp_avg_sq`` (v), so tools that read Adam's state read this one too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ClippedAdam"]

_MODES = ("upper", "lower")


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _validate(lr: Any, betas: Any, eps: Any, weight_decay: Any, clip: Any, mode: Any, decoupled: Any) -> None:
    try:
        lr_f = _as_float(lr)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}") from None
    if not (math.isfinite(lr_f) and lr_f >= 0.0):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2) with each in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        bf = _as_float(b)
        if not (0.0 <= bf < 1.0):
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(decoupled, bool):
        raise ValueError(f"decoupled_weight_decay must be True or False, got {decoupled!r}")
    if not isinstance(clip, (int, float)) or math.isnan(clip):
        raise ValueError(f"clip must be a float, got {clip!r}")
    if mode == "upper" and not clip > 0.0:
        raise ValueError(f"clip must be > 0 (float('inf') allowed) with mode='upper', got {clip!r}")
    if mode == "lower" and not (clip >= 0.0 and math.isfinite(clip)):
        raise ValueError(f"clip must be finite and >= 0 with mode='lower', got {clip!r}")


class ClippedAdam(Optimizer):
    """Bias-corrected Adam with the denominator ``sqrt(v_hat)`` clipped at ``clip`` (see module doc).

    Args:
        params: parameters or param groups (each group may override any option below).
        lr: learning rate (>= 0).
        betas: (beta1, beta2), each in [0, 1). beta1 = 0 gives a clipped RMSProp.
        eps: added to the clipped denominator (>= 0).
        weight_decay: L2 coefficient (>= 0).
        decoupled_weight_decay: False: coupled L2 as ``torch.optim.Adam`` (g += wd * theta);
            True: decoupled as ``torch.optim.AdamW`` (theta *= 1 - lr * wd).
        clip: c. ``mode="upper"``: c > 0, ``float("inf")`` allowed (= Adam);
            ``mode="lower"``: finite c >= 0 (c = 0 is Adam).
        mode: ``"upper"``: D = min(sqrt(v_hat), c), restored instabilities (the paper's
            Clipped-Ada); ``"lower"``: D = max(sqrt(v_hat), c), a more stable control.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        clip: float = 1.0,
        mode: str = "upper",
        *,
        maximize: bool = False,
    ) -> None:
        _validate(lr, betas, eps, weight_decay, clip, mode, decoupled_weight_decay)
        if not isinstance(maximize, bool):
            raise ValueError(f"maximize must be True or False, got {maximize!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            clip=float(clip),
            mode=mode,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _validate(g["lr"], g["betas"], g["eps"], g["weight_decay"], g["clip"], g["mode"], g["decoupled_weight_decay"])

    @staticmethod
    def denominator(exp_avg_sq: Tensor, step: float, beta2: float, clip: float, mode: str, eps: float) -> Tensor:
        """``clip(sqrt(v / (1 - beta2^step)), c) + eps`` (min for "upper", max for "lower")."""
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
        root = exp_avg_sq.sqrt() / bias_correction2_sqrt
        if mode == "upper":
            if math.isfinite(clip):
                root = root.clamp(max=clip)
        elif mode == "lower":
            root = root.clamp(min=clip)
        else:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        return root.add_(eps)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; ``closure`` re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = _as_float(group["lr"])
            beta1, beta2 = (_as_float(b) for b in group["betas"])
            eps, wd = group["eps"], group["weight_decay"]
            clip, mode = group["clip"], group["mode"]
            decoupled, maximize = group["decoupled_weight_decay"], group.get("maximize", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if not maximize else -p.grad
                if grad.is_sparse:
                    raise RuntimeError("ClippedAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    state["step"] = torch.tensor(0.0, dtype=dtype)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                step_t += 1
                param = p
                if wd != 0:
                    if decoupled:
                        param.mul_(1 - lr * wd)
                    else:
                        grad = grad.add(param, alpha=wd)
                if torch.is_complex(param):
                    grad = torch.view_as_real(grad)
                    exp_avg = torch.view_as_real(exp_avg)
                    exp_avg_sq = torch.view_as_real(exp_avg_sq)
                    param = torch.view_as_real(param)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                step = _as_float(step_t)
                step_size = lr / (1.0 - beta1**step)
                denom = self.denominator(exp_avg_sq, step, beta2, clip, mode, eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)
        return loss
