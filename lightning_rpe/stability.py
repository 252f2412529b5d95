"""Stability thresholds of the optimizer in use, per param group, and the Adam-family preconditioner.

Pure PyTorch, no Lightning. On a quadratic with Hessian H, an update rule is stable along an
eigendirection with curvature lambda iff lambda < threshold; the stability ratio is
``sharpness / threshold`` (above 1: unstable along the top eigendirection). Every threshold is
proportional to 1 / lr, so ``ratio(s * lr) = s * ratio(lr)``. Derivations and the exact
definitions: ``docs/metrics.md``.

===============  =============================================  =============================
kind             update (PyTorch)                               threshold on lambda
===============  =============================================  =============================
``gd``           w -= lr g                                      2 / lr
``heavy_ball``   b = beta b + (1 - d) g;  w -= lr b              (2 + 2 beta) / ((1 - d) lr)
``nesterov``     b = beta b + (1 - d) g;  w -= lr (g + beta b)   (2 + 2 beta) / ((1 + (2 - d) beta) lr)
``adam``         Adam / AdamW, preconditioned (see below)       (2 + 2 beta1) / ((1 - beta1) lr)
``clipped_adam`` ClippedAdam, preconditioned                    (2 + 2 beta1) / ((1 - beta1) lr)
``unknown``      anything else: assumed GD                      2 / lr
===============  =============================================  =============================

(d = dampening; with d = 0 these are the textbook (2 + 2 beta) / lr and
(2 + 2 beta) / ((1 + 2 beta) lr).) For the Adam family the threshold applies to the preconditioned
sharpness lambda_max(P^-1/2 H P^-1/2), with P from :func:`adam_preconditioner` (Cohen et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_rpe.optim.clipped_adam import ClippedAdam

__all__ = [
    "GroupThreshold",
    "KINDS",
    "StepScales",
    "adam_preconditioner",
    "dimensionless_threshold",
    "group_thresholds",
    "stability_ratio",
    "step_scales",
]

KINDS = ("gd", "heavy_ball", "nesterov", "adam", "clipped_adam", "unknown")


@dataclass(frozen=True)
class GroupThreshold:
    """Stability threshold of one param group.

    Attributes:
        index: position of the group in ``optimizer.param_groups``.
        kind: one of ``KINDS``: "gd", "heavy_ball", "nesterov", "adam", "clipped_adam", "unknown".
        lr: effective learning rate (the group's lr times its lr scale).
        threshold: the largest stable curvature, in loss units per parameter unit squared (1/lr
            units); ``inf`` when lr is 0 (or dampening is 1: the gradient never enters the update).
        preconditioned: True for the Adam family: compare lambda_max(P^-1/2 H P^-1/2), not
            lambda_max(H), with the threshold.
        beta: momentum (SGD) or beta1 (Adam family); None for "gd" and "unknown".
        note: for kind "unknown", the sentence a caller should emit once as a warning (which
            threshold was assumed); None otherwise.
    """

    index: int
    kind: str
    lr: float
    threshold: float
    preconditioned: bool
    beta: float | None
    note: str | None = None

    @property
    def assumed(self) -> bool:
        """True when the optimizer was not recognised and the GD threshold 2 / lr was assumed."""
        return self.kind == "unknown"


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def _over_lr(numerator: float, lr: float) -> float:
    return math.inf if lr == 0.0 else numerator / lr


def _sgd(index: int, group: dict[str, Any], lr: float) -> GroupThreshold:
    beta = _scalar(group.get("momentum", 0.0), f"param_groups[{index}]['momentum']")
    if beta == 0.0:
        return GroupThreshold(index, "gd", lr, _over_lr(2.0, lr), False, None)
    d = _scalar(group.get("dampening", 0.0), f"param_groups[{index}]['dampening']")
    if group.get("nesterov", False):
        denom = 1.0 + (2.0 - d) * beta
        return GroupThreshold(index, "nesterov", lr, _over_lr((2.0 + 2.0 * beta) / denom, lr), False, beta)
    if d >= 1.0:
        return GroupThreshold(index, "heavy_ball", lr, math.inf, False, beta)
    return GroupThreshold(index, "heavy_ball", lr, _over_lr((2.0 + 2.0 * beta) / (1.0 - d), lr), False, beta)


def _adam(index: int, group: dict[str, Any], lr: float, kind: str) -> GroupThreshold:
    beta1 = _scalar(group["betas"][0], f"param_groups[{index}]['betas'][0]")
    thr = math.inf if beta1 >= 1.0 else _over_lr((2.0 + 2.0 * beta1) / (1.0 - beta1), lr)
    return GroupThreshold(index, kind, lr, thr, True, beta1)


def group_thresholds(optimizer: Optimizer, lr_scales: Sequence[float] | None = None) -> list[GroupThreshold]:
    """Stability threshold of every param group of ``optimizer`` at its current learning rate.

    ``lr_scales`` (one factor per group, >= 0) multiplies each group's lr, giving the effective lr
    (for example the scheduled lr times an InstabilityController's factor). Recognised:
    ``torch.optim.SGD`` (plain, heavy-ball with any dampening, Nesterov), ``torch.optim.Adam`` and
    ``AdamW`` (and their subclasses), :class:`~lightning_rpe.optim.ClippedAdam`. Any other optimizer
    gets kind "unknown", the GD threshold 2 / lr on the unpreconditioned sharpness, and a ``note``
    the caller should emit once as a warning.
    """
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    groups = optimizer.param_groups
    if lr_scales is None:
        scales = [1.0] * len(groups)
    else:
        scales = [_scalar(s, "lr_scales[i]") for s in lr_scales]
        if len(scales) != len(groups):
            raise ValueError(f"lr_scales must have one factor per param group ({len(groups)}), got {len(scales)}")
        for i, s in enumerate(scales):
            if not (math.isfinite(s) and s >= 0.0):
                raise ValueError(f"lr_scales[{i}] must be a finite number >= 0, got {s!r}")
    out = []
    for i, (group, scale) in enumerate(zip(groups, scales)):
        lr = _scalar(group["lr"], f"param_groups[{i}]['lr']") * scale
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"the effective lr of param group {i} must be finite and >= 0, got {lr!r}")
        if isinstance(optimizer, ClippedAdam):
            out.append(_adam(i, group, lr, "clipped_adam"))
        elif isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass of Adam
            out.append(_adam(i, group, lr, "adam"))
        elif isinstance(optimizer, torch.optim.SGD):
            out.append(_sgd(i, group, lr))
        else:
            note = (
                f"optimizer {type(optimizer).__name__} is not SGD, Adam, AdamW or ClippedAdam: "
                "assumed the plain gradient-descent threshold 2 / lr on the unpreconditioned sharpness"
            )
            out.append(GroupThreshold(i, "unknown", lr, _over_lr(2.0, lr), False, None, note))
    return out


def adam_preconditioner(optimizer: Optimizer) -> dict[nn.Parameter, Tensor] | None:
    """The diagonal preconditioner P of the last Adam / AdamW / ClippedAdam step, per parameter.

    With t = ``state["step"]`` and v = ``state["exp_avg_sq"]`` (``max_exp_avg_sq`` with amsgrad)::

        Adam, AdamW:  P = (1 - beta1^t) * (sqrt(v / (1 - beta2^t)) + eps)
        ClippedAdam:  P = (1 - beta1^t) * (clip(sqrt(v / (1 - beta2^t)), c_t) + eps)
                      (clip = min for mode "upper", max for mode "lower"; c_t the level used at
                      the last step: the absolute clip, or the relative clip's level stored in
                      the state, see ClippedAdam.clip_used)

    so that the step just taken was ``theta <- theta - lr * P^-1 * exp_avg`` (before weight decay).
    Keys are the trainable parameters (``requires_grad``) that have optimizer state, values have
    their shape, dtype and device. A parameter that has never received a gradient has no state and
    no key (it takes no step); None before the first step of any parameter. Raises ValueError for
    other optimizers.
    """
    is_clipped = isinstance(optimizer, ClippedAdam)
    if not (is_clipped or isinstance(optimizer, torch.optim.Adam)):
        raise ValueError(
            f"optimizer must be torch.optim.Adam, torch.optim.AdamW or lightning_rpe.optim.ClippedAdam, "
            f"got {type(optimizer).__name__}"
        )
    out: dict[nn.Parameter, Tensor] = {}
    for group in optimizer.param_groups:
        beta1 = _scalar(group["betas"][0], "betas[0]")
        beta2 = _scalar(group["betas"][1], "betas[1]")
        eps = _scalar(group["eps"], "eps")
        amsgrad = bool(group.get("amsgrad", False))
        for p in group["params"]:
            if not p.requires_grad:
                continue
            state = optimizer.state.get(p)
            if not state or "step" not in state or "exp_avg_sq" not in state:
                continue  # never stepped (no gradient yet): takes no step, see step_scales
            t = _scalar(state["step"], "state['step']")
            if t < 1:
                continue
            v = state["max_exp_avg_sq"] if amsgrad and "max_exp_avg_sq" in state else state["exp_avg_sq"]
            v = v.detach()
            if is_clipped:
                if "clip_level" not in state and group.get("clip_quantile") is not None:
                    return None  # a relative group whose parameter has not been stepped since
                denom = ClippedAdam.denominator(v, t, beta2, ClippedAdam.clip_used(group, state), group["mode"], eps)
            else:
                denom = (v.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
            out[p] = denom.mul_(1.0 - beta1**t)
    return out or None


def stability_ratio(sharpness: float, threshold: float) -> float:
    """``sharpness / threshold`` (dimensionless; > 1: unstable along the top eigendirection).

    An infinite threshold (lr 0) gives 0.0 for finite sharpness; a NaN sharpness gives NaN.
    Raises ValueError for a threshold that is NaN or <= 0.
    """
    s, thr = float(sharpness), float(threshold)
    if math.isnan(thr) or thr <= 0.0:
        raise ValueError(f"threshold must be > 0 (inf allowed), got {threshold!r}")
    if math.isinf(thr):
        return 0.0 if math.isfinite(s) else math.nan
    return s / thr


@dataclass(frozen=True)
class StepScales:
    """Per-coordinate step sizes that turn every supported optimizer into one stability test.

    The update of every supported rule is ``w <- w - D u`` with ``D`` diagonal (each coordinate's
    lr, divided by ``P`` for the Adam family) and ``u`` a linear combination of the gradient and the
    rule's buffers with the same scalar coefficients for every coordinate of a group. With
    ``x = D^-1/2 w`` the iteration on a quadratic of Hessian ``H`` is the same rule with lr 1 on
    ``D^1/2 H D^1/2``, so it is stable iff ``lambda_max(D^1/2 H D^1/2) < K``, ``K`` the rule's
    dimensionless threshold (threshold times lr: 2 for GD, 2 + 2 beta for heavy ball,
    (2 + 2 beta1) / (1 - beta1) for Adam; the Adam case holds P fixed, as in Cohen et al. 2022,
    "Adaptive Gradient Methods at the Edge of Stability"). With ``s = lr / (K [P])`` per coordinate
    the stability ratio is therefore ``lambda_max(S^1/2 H S^1/2)``: exact when all groups share an
    update rule (the same K), whatever their learning rates. When groups differ in the rule
    (momentum, Nesterov, beta1), the ratio still marks exactly where a period-2 mode (iteration
    eigenvalue -1, the way these rules lose stability on a positive-definite quadratic) appears:
    substituting ``w_t = (-1)^t x`` into the rule gives ``S^1/2 H S^1/2 y = y`` (derivation in
    docs/metrics.md; tested against the spectral radius of PyTorch SGD's iteration).

    Attributes:
        scales: ``s`` per trainable parameter (same shapes), in lr / K units; 0 for coordinates that
            take no step (not in the optimizer, lr 0, no optimizer state, a zero second moment).
        inverse_preconditioner: ``P^-1`` per parameter for the Adam family (0 where the coordinate
            takes no step), None otherwise.
        uniform: ``c`` when ``s = c * 1`` (or ``s = c * P^-1``) on every coordinate: the ratio is then
            ``c`` times the (preconditioned) sharpness and needs no solve of its own; else None.
        frozen: number of coordinates that take no step (for the Adam family also those whose
            gradient RMS ``sqrt(v_hat)`` is at most ``eps``, see :func:`_moves`).
        no_state: names of trainable parameters left out because the optimizer has no state for them.
    """

    scales: tuple[Tensor, ...]
    inverse_preconditioner: tuple[Tensor, ...] | None
    uniform: float | None
    frozen: int
    no_state: tuple[str, ...]


def dimensionless_threshold(group: GroupThreshold) -> float:
    """``K = threshold * lr`` of a group (2 for GD), or 0.0 when the group takes no step (lr 0, inf threshold)."""
    if group.lr == 0.0 or not math.isfinite(group.threshold):
        return 0.0
    return group.threshold * group.lr


def step_scales(
    optimizer: Optimizer,
    parameters: Sequence[nn.Parameter],
    groups: Sequence[GroupThreshold],
    names: Sequence[str] | None = None,
) -> StepScales | None:
    """The per-coordinate ``s = lr / (K [P])`` of :class:`StepScales` for ``parameters``.

    Returns None for an Adam-family optimizer before its first step (no preconditioner exists).

    Args:
        optimizer: the optimizer in use; its param groups decide each parameter's lr and rule.
        parameters: the trainable parameters in the order of the flat vector.
        groups: :func:`group_thresholds` of ``optimizer`` (at the effective lrs).
        names: parameter names for the ``no_state`` report (default: their positions).

    Raises:
        ValueError: ``groups`` does not have one entry per param group.
    """
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"groups must have one entry per param group ({len(optimizer.param_groups)}), got {len(groups)}")
    preconditioned = any(g.preconditioned for g in groups)
    pre = adam_preconditioner(optimizer) if preconditioned else None
    if preconditioned and pre is None:  # before the first step: no preconditioner exists yet
        return None
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    labels = list(names) if names is not None else [str(i) for i in range(len(parameters))]
    scales: list[Tensor] = []
    inverses: list[Tensor] = []
    no_state: list[str] = []
    values: set[float] = set()
    frozen = 0
    for p, label in zip(parameters, labels):
        index = group_of.get(id(p))
        k = 0.0 if index is None else dimensionless_threshold(groups[index])
        c = 0.0 if k == 0.0 else groups[index].lr / k  # type: ignore[index]
        if preconditioned:
            denom = None if pre is None else pre.get(p)
            if denom is None:
                if index is not None:
                    no_state.append(label)
                inv = torch.zeros_like(p, dtype=torch.float64)
            else:
                inv = torch.where(_moves(optimizer, p), 1.0 / denom.double(), 0.0)
            inverses.append(inv)
            s = c * inv
            if bool((inv != 0).any()):
                values.add(c)
        else:
            s = torch.full(p.shape, c, dtype=torch.float64, device=p.device)
            values.add(c)
        frozen += int((s == 0).sum())
        scales.append(s)
    # uniform: s is c * 1 (or c * P^-1) on every coordinate, so no solve of its own is needed
    uniform = values.pop() if len(values) == 1 else (0.0 if not values else None)
    return StepScales(tuple(scales), tuple(inverses) if preconditioned else None, uniform, frozen, tuple(no_state))


def _moves(optimizer: Optimizer, p: nn.Parameter) -> Tensor:
    """Coordinates of ``p`` whose Adam-family step responds to the gradient: ``sqrt(v_hat) > eps``.

    ``v_hat = v / (1 - beta2^t)`` is the running mean of squared gradients. Where it is 0 every
    gradient so far was 0 and the step is 0; where ``sqrt(v_hat) <= eps`` the gradients are below
    the optimizer's own resolution (in practice rounding noise of a gradient that is 0 in exact
    arithmetic, such as a bias followed by batch-statistics BatchNorm), and ``P ~ eps`` would make
    ``P^-1`` about ``1 / eps``: such coordinates take no curvature-driven step and are left out.
    """
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    state = optimizer.state[p]
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) and "max_exp_avg_sq" in state else state["exp_avg_sq"]
    t = _scalar(state["step"], "state['step']")
    beta2 = _scalar(group["betas"][1], "betas[1]")
    eps = _scalar(group["eps"], "eps")
    return (v.detach().double() / (1.0 - beta2**t)).sqrt() > eps
