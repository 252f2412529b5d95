"""ClippedAdam ("Clipped-Ada"): Adam whose denominator is clipped, restoring GD-like instabilities.

Pure PyTorch (no Lightning). Update for every coordinate, at step t (t = 1, 2, ...), gradient g::

    g      <- g + wd * theta                          (coupled L2, decoupled_weight_decay=False)
    theta  <- theta * (1 - lr * wd)                   (decoupled, AdamW, decoupled_weight_decay=True)
    m      <- beta1 * m + (1 - beta1) * g
    v      <- beta2 * v + (1 - beta2) * g^2
    m_hat  =  m / (1 - beta1^t),   v_hat = v / (1 - beta2^t)
    D      =  min(sqrt(v_hat), c_t)  (mode="upper")   or   max(sqrt(v_hat), c_t)  (mode="lower")
    theta  <- theta - lr * m_hat / (D + eps)

This is the Clipped-Ada update ``theta <- theta - eta m_hat / (min(sqrt(v_hat), c) + eps)`` of
Wang & Roberts (2025, arXiv 2511.12558), with a lower-clip mirror as a control.

The clip level c_t (units of the gradient, like sqrt(v_hat)) is either

* **absolute** (``clip=c``): c_t = c at every step; or
* **relative** (``clip_quantile=q``): recomputed at every step from the current distribution of
  sqrt(v_hat) over the n coordinates of the param group that are updated at this step::

      c_t = s * x_(k),   k = max(1, ceil(q * n)),   x_(1) <= ... <= x_(n) the sorted sqrt(v_hat)

  (the inverted-CDF q-quantile times ``clip_scale`` s; s = 1 is the plain quantile, q = 0.5 with
  s > 1 a multiple of the median). With s = 1 and mode "upper" a fraction of about 1 - q of the
  coordinates is clipped at every step, whatever the scale of the gradients; with mode "lower"
  about q. For the first ``clip_warmup`` steps of the group (t <= clip_warmup) the relative clip
  does not act (plain Adam). x_(k) is an exact order statistic (``torch.kthvalue``) when
  n <= ``EXACT_QUANTILE_MAX`` (2^20); above that it is the same order statistic of a fixed
  uniform subsample (with replacement) of ``QUANTILE_SAMPLE`` = 2^20 coordinates, drawn once from
  a private generator with a fixed seed (never the global RNG), so runs stay reproducible and a
  resumed run is bit-identical; its rank error has standard deviation sqrt(q (1 - q) / 2^20)
  <= 5e-4. The level used at a parameter's last step is kept in its state (``clip_level``, a
  0-dim tensor) so that the preconditioner and :meth:`ClippedAdam.clip_statistics` read it back.

Why a relative clip: sqrt(v_hat) is in gradient units and shrinks by an order of magnitude or
more during training, so an absolute c either never acts (c above the largest sqrt(v_hat): the
run is bit-identical to Adam with a float lr) or, set where it acts late in training, clips nearly every
coordinate in the first steps, when the gradients are largest, and the run diverges. A quantile
follows the scale of the gradients and fixes the fraction of clipped coordinates instead.
``examples/RESULTS_clipped_adam_relative.md`` has the measurements behind the example settings.
Cost of the relative clip per step, beyond Adam's: one ``kthvalue`` over at most 2^20 values per
group, plus the concatenation of those values (no full-size copy of v for larger groups).

``upper`` (the paper's Clipped-Ada): the per-coordinate effective learning rate lr / (D + eps) is
never below lr / (c_t + eps): where sqrt(v_hat) > c_t the optimizer acts like momentum GD with
learning rate lr / (c_t + eps) and Adam's self-stabilisation (a growing denominator) is capped, so
the GD instabilities come back. ``lower`` (a stable control): the effective learning rate is at
most lr / (c_t + eps).

``clip = inf`` with ``upper``, ``clip = 0`` with ``lower``, and ``clip_quantile = 1`` (s = 1)
with ``upper`` give exactly ``torch.optim.Adam`` (or ``AdamW`` with
``decoupled_weight_decay=True``). ``beta1 = 0`` gives a clipped RMSProp (with bias correction of
v). State keys are those of ``torch.optim.Adam`` (``step``, a scalar tensor; ``exp_avg``, m;
``exp_avg_sq``, v), plus ``clip_level`` in relative mode, so tools that read Adam's state read
this one too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["EXACT_QUANTILE_MAX", "QUANTILE_SAMPLE", "ClipStatistics", "ClippedAdam"]

_MODES = ("upper", "lower")
#: Largest number of coordinates in a group whose quantile is computed exactly (torch.kthvalue).
EXACT_QUANTILE_MAX = 2**20
#: Size of the fixed subsample used for larger groups.
QUANTILE_SAMPLE = 2**20
_SAMPLE_SEED = 0x5EED
_NEW_KEYS = {"clip_quantile": None, "clip_scale": 1.0, "clip_warmup": 0}


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float_or_same(value: Any) -> Any:
    """Ints become floats (so that checkpoints hold one type); anything else is left to _validate."""
    return float(value) if _is_real(value) else value


def _validate(g: dict[str, Any]) -> None:
    """Raise ValueError naming ClippedAdam, the option and its accepted values."""
    lr, betas = g["lr"], g["betas"]
    try:
        lr_f = _as_float(lr)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"ClippedAdam: lr must be a finite float >= 0, got {lr!r}") from None
    if not (math.isfinite(lr_f) and lr_f >= 0.0):
        raise ValueError(f"ClippedAdam: lr must be a finite float >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"ClippedAdam: betas must be a pair (beta1, beta2) with each in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        bf = _as_float(b)
        if not (0.0 <= bf < 1.0):
            raise ValueError(f"ClippedAdam: betas[{i}] must be in [0, 1), got {b!r}")
    for name in ("eps", "weight_decay"):
        x = g[name]
        if not (_is_real(x) and math.isfinite(x) and x >= 0.0):
            raise ValueError(f"ClippedAdam: {name} must be a finite float >= 0, got {x!r}")
    mode, clip, q = g["mode"], g["clip"], g["clip_quantile"]
    if mode not in _MODES:
        raise ValueError(f"ClippedAdam: mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(g["decoupled_weight_decay"], bool):
        raise ValueError(f"ClippedAdam: decoupled_weight_decay must be True or False, got {g['decoupled_weight_decay']!r}")
    s = g["clip_scale"]
    if not (_is_real(s) and math.isfinite(s) and s > 0.0):
        raise ValueError(f"ClippedAdam: clip_scale must be a finite float > 0, got {s!r}")
    w = g["clip_warmup"]
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise ValueError(f"ClippedAdam: clip_warmup must be an integer >= 0 (steps), got {w!r}")
    if q is None:
        if not _is_real(clip) or math.isnan(clip):
            raise ValueError(f"ClippedAdam: clip must be a float, got {clip!r}")
        if mode == "upper" and not clip > 0.0:
            raise ValueError(f"ClippedAdam: clip must be > 0 (float('inf') allowed) with mode='upper', got {clip!r}")
        if mode == "lower" and not (clip >= 0.0 and math.isfinite(clip)):
            raise ValueError(f"ClippedAdam: clip must be finite and >= 0 with mode='lower', got {clip!r}")
        return
    if clip is not None:
        raise ValueError(
            f"ClippedAdam: give either clip (absolute level) or clip_quantile (relative level), not both; "
            f"got clip={clip!r} and clip_quantile={q!r}"
        )
    if not (_is_real(q) and 0.0 < q <= 1.0):
        raise ValueError(f"ClippedAdam: clip_quantile must be a float in (0, 1] or None, got {q!r}")


@dataclass(frozen=True)
class ClipStatistics:
    """What the clip did at the last step of one param group (see :meth:`ClippedAdam.clip_statistics`).

    Attributes:
        index: position of the group in ``optimizer.param_groups``.
        relative: True for a relative clip (``clip_quantile``), False for an absolute one.
        mode: "upper" or "lower".
        step: the group's step count t (the largest over its parameters); 0 before the first step.
        level: the clip level c_t used at the last step, in gradient units (those of sqrt(v_hat));
            ``inf`` ("upper") or ``0.0`` ("lower") while a relative clip is in its warm-up; NaN
            before the first step.
        active: False while a relative clip is in its warm-up or before the first step.
        fraction: fraction of the group's coordinates whose denominator the clip replaced at their
            last step (upper: sqrt(v_hat) > c_t; lower: sqrt(v_hat) < c_t), in [0, 1]; NaN
            before the first step.
        numel: number of coordinates counted (those with optimizer state).
    """

    index: int
    relative: bool
    mode: str
    step: int
    level: float
    active: bool
    fraction: float
    numel: int


class ClippedAdam(Optimizer):
    """Bias-corrected Adam with the denominator ``sqrt(v_hat)`` clipped at a level c_t (module doc).

    Args:
        params: parameters or param groups (each group may override any option below).
        lr: learning rate (>= 0); a tensor lr is read as a Python float at every step (torch's Adam
            does tensor arithmetic with it, so runs then differ from it in the last digits: 7.5e-8).
        betas: (beta1, beta2), each in [0, 1). beta1 = 0 gives a clipped RMSProp.
        eps: added to the clipped denominator (>= 0).
        weight_decay: L2 coefficient (>= 0).
        decoupled_weight_decay: False: coupled L2 as ``torch.optim.Adam`` (g += wd * theta);
            True: decoupled as ``torch.optim.AdamW`` (theta *= 1 - lr * wd).
        clip: absolute level c, in gradient units. ``mode="upper"``: c > 0, ``float("inf")``
            allowed (= Adam); ``mode="lower"``: finite c >= 0 (c = 0 is Adam). Default (None):
            1.0, unless ``clip_quantile`` is given.
        mode: ``"upper"``: D = min(sqrt(v_hat), c_t), restored instabilities (the paper's
            Clipped-Ada); ``"lower"``: D = max(sqrt(v_hat), c_t), a more stable control.
        clip_quantile: q in (0, 1]: a relative clip, c_t = clip_scale * (q-quantile of the group's
            sqrt(v_hat) at step t). Exclusive with ``clip``. A group that sets one of ``clip`` /
            ``clip_quantile`` overrides the other's default.
        clip_scale: s > 0, multiplies the quantile (relative clip only).
        clip_warmup: number of steps (>= 0) before a relative clip acts; plain Adam until then.
        maximize: maximise the objective instead of minimising it.

    Raises:
        ValueError: an option outside its accepted values (the message names ClippedAdam, the
            option and what is accepted), or both ``clip`` and ``clip_quantile`` given.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        clip: float | None = None,
        mode: str = "upper",
        *,
        clip_quantile: float | None = None,
        clip_scale: float = 1.0,
        clip_warmup: int = 0,
        maximize: bool = False,
    ) -> None:
        if not isinstance(maximize, bool):
            raise ValueError(f"ClippedAdam: maximize must be True or False, got {maximize!r}")
        if clip is None and clip_quantile is None:
            clip = 1.0
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "clip": _float_or_same(clip),
            "mode": mode,
            "clip_quantile": _float_or_same(clip_quantile),
            "clip_scale": _float_or_same(clip_scale),
            "clip_warmup": clip_warmup,
            "maximize": maximize,
        }
        _validate(defaults)
        self._samples: dict[tuple[int, tuple[int, ...]], list[Tensor]] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        explicit = set(param_group)
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        # an explicit choice of one kind of clip in a group overrides the other kind's default
        if "clip_quantile" in explicit and g["clip_quantile"] is not None and "clip" not in explicit:
            g["clip"] = None
        if "clip" in explicit and g["clip"] is not None and "clip_quantile" not in explicit:
            g["clip_quantile"] = None
        if g["clip"] is None and g["clip_quantile"] is None:
            g["clip"] = 1.0
        _validate(g)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_samples", {})
        for g in self.param_groups:  # checkpoints written before the relative clip existed
            for key, value in _NEW_KEYS.items():
                g.setdefault(key, value)

    @staticmethod
    def denominator(
        exp_avg_sq: Tensor, step: float, beta2: float, clip: float | Tensor, mode: str, eps: float
    ) -> Tensor:
        """``clip(sqrt(v / (1 - beta2^step)), c) + eps`` (min for "upper", max for "lower").

        ``exp_avg_sq``: v, any shape; ``clip``: c as a float or a 0-dim tensor (gradient units).
        Returns a new tensor of v's shape. Raises ValueError for an unknown ``mode``.
        """
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
        root = exp_avg_sq.sqrt() / bias_correction2_sqrt
        if mode == "upper":
            if isinstance(clip, Tensor):
                root = torch.minimum(root, clip)
            elif math.isfinite(clip):
                root = root.clamp(max=clip)
        elif mode == "lower":
            root = torch.maximum(root, clip) if isinstance(clip, Tensor) else root.clamp(min=clip)
        else:
            raise ValueError(f"ClippedAdam: mode must be one of {_MODES}, got {mode!r}")
        return root.add_(eps)

    @staticmethod
    def clip_used(group: dict[str, Any], state: dict[str, Any]) -> float | Tensor:
        """The clip level c used at the last step of the parameter with ``state`` in ``group``.

        Absolute clip: ``group["clip"]`` (float). Relative clip: ``state["clip_level"]`` (a 0-dim
        tensor on the parameter's device; ``inf`` / ``0`` during the warm-up). Raises KeyError
        when a relative group's parameter has no step yet.
        """
        if group.get("clip_quantile") is None:
            return float(group["clip"])
        return state["clip_level"]

    def _sample_indices(self, group_index: int, params: list[Tensor]) -> list[Tensor] | None:
        """Fixed per-parameter subsample positions for a group with more than EXACT_QUANTILE_MAX
        coordinates (None: use every coordinate). Drawn once per group layout from a private
        generator with a fixed seed, so they are the same after a restart.
        """
        numels = tuple(p.numel() for p in params)
        total = sum(numels)
        if total <= EXACT_QUANTILE_MAX:
            return None
        key = (group_index, numels)
        if key not in self._samples:
            gen = torch.Generator().manual_seed(_SAMPLE_SEED)
            flat = torch.randint(total, (QUANTILE_SAMPLE,), generator=gen).sort().values
            offsets = torch.tensor((0, *numels)).cumsum(0)
            out = []
            for i, p in enumerate(params):
                lo, hi = torch.searchsorted(flat, offsets[i : i + 2]).tolist()
                out.append((flat[lo:hi] - offsets[i]).to(p.device))
            self._samples[key] = out
        return self._samples[key]

    def _relative_level(self, group_index: int, group: dict[str, Any], entries: list[tuple[Tensor, float]]) -> Tensor:
        """c_t of a relative group from ``entries`` = (v, t) of the parameters updated at this step.

        sqrt(v_hat) is formed only at the sampled positions of a large group, so the cost per step
        is O(min(n, QUANTILE_SAMPLE)) beyond Adam's own.
        """
        beta2 = _as_float(group["betas"][1])
        idx = self._sample_indices(group_index, [v for v, _ in entries])
        flat = [v.reshape(-1) for v, _ in entries] if idx is None else [v.reshape(-1)[i] for (v, _), i in zip(entries, idx)]
        values = torch.cat([f.sqrt() / math.sqrt(1.0 - beta2**t) for f, (_, t) in zip(flat, entries)])
        n = values.numel()
        k = min(n, max(1, math.ceil(group["clip_quantile"] * n)))
        level = values.kthvalue(k).values
        return level * group["clip_scale"] if group["clip_scale"] != 1.0 else level

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; ``closure`` re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            lr = _as_float(group["lr"])
            beta1, beta2 = (_as_float(b) for b in group["betas"])
            eps, wd, mode = group["eps"], group["weight_decay"], group["mode"]
            decoupled, maximize = group["decoupled_weight_decay"], group.get("maximize", False)
            relative = group.get("clip_quantile") is not None
            pending = []  # relative clip: (param view, m, v, step, state) until c_t is known
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
                if relative:
                    pending.append((param, exp_avg, exp_avg_sq, step, state))
                    continue
                denom = self.denominator(exp_avg_sq, step, beta2, group["clip"], mode, eps)
                param.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))
            if not pending:
                continue
            t_group = max(step for _, _, _, step, _ in pending)
            if t_group <= group["clip_warmup"]:
                level = torch.tensor(math.inf if mode == "upper" else 0.0, dtype=pending[0][2].dtype,
                                     device=pending[0][2].device)
            else:
                level = self._relative_level(group_index, group, [(v, step) for _, _, v, step, _ in pending])
            for param, exp_avg, exp_avg_sq, step, state in pending:
                state["clip_level"] = level.to(exp_avg_sq.device, copy=True)
                denom = self.denominator(exp_avg_sq, step, beta2, state["clip_level"], mode, eps)
                param.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))
        return loss

    @torch.no_grad()
    def clip_statistics(self) -> list[ClipStatistics]:
        """Per param group: the clip level and the fraction of coordinates clipped at the last step.

        Computed from the optimizer state (v, t and the stored level), so it is exact for the
        last step, survives a checkpoint round trip, and costs one pass over v per call (one
        device synchronisation per group); nothing is computed during :meth:`step`.
        """
        out = []
        for index, group in enumerate(self.param_groups):
            beta2 = _as_float(group["betas"][1])
            mode, relative = group["mode"], group.get("clip_quantile") is not None
            clipped: Tensor | int = 0
            numel, t_group, level = 0, 0, math.nan
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "exp_avg_sq" not in state:
                    continue
                t = _as_float(state["step"])
                if t < 1:
                    continue
                v = state["exp_avg_sq"]
                v = torch.view_as_real(v) if torch.is_complex(v) else v
                c = self.clip_used(group, state)
                root = v.sqrt() / math.sqrt(1.0 - beta2**t)
                hit = root > c if mode == "upper" else root < c
                clipped = clipped + hit.sum()
                numel += v.numel()
                if t >= t_group:
                    t_group, level = int(t), _as_float(c)
            fraction = _as_float(clipped) / numel if numel else math.nan
            active = numel > 0 and not (relative and t_group <= group["clip_warmup"])
            out.append(ClipStatistics(index, relative, mode, t_group, level, active, fraction, numel))
        return out
