"""The numbers of one run (:class:`RunSummary`), read from its scalars and run card, never recomputed.

"final" is the value at the largest step of a tag, "max" over all logged values, totals are sums
of logged values; "min lambda_min" is taken after a warm-up (:data:`DEFAULT_WARMUP`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_rpe.names import CLIP_FRACTION, LR, STABILITY_RATIO, THRESHOLD
from lightning_rpe.report.runs import RunData, Series

__all__ = ["DEFAULT_WARMUP", "LOSS_TAGS", "RunSummary", "lambda_min_after", "summarize", "threshold_label"]

#: Fraction of the measured step range skipped before "min lambda_min" is taken.
DEFAULT_WARMUP = 0.1
LOSS_TAGS = ("train_loss", "train_loss_step", "loss")
_TEST_ACC_TAGS = ("test_acc", "val_acc", "val_acc_epoch", "test_acc_epoch")
_KIND_TEXT = {"gd": "GD", "heavy_ball": "SGD heavy-ball", "nesterov": "SGD Nesterov", "adam": "Adam",
              "clipped_adam": "ClippedAdam", "unknown": "unrecognised optimizer, GD assumed"}


@dataclass
class RunSummary:
    """The numbers reported for one run (``None`` where the tag was not logged)."""

    name: str
    path: str
    label: str
    optimizer: str | None
    optimizer_kind: str | None
    lr: float | None
    lr_source: str | None
    threshold_formula: str | None
    controller: str | None
    final_effective_lr: float | None
    final_lr_scale: float | None
    measurements: int
    final_step: int | None
    final_sharpness: float | None
    final_sharpness_residual: float | None
    max_sharpness: float | None
    final_preconditioned_sharpness: float | None
    final_threshold: float | None
    final_ratio: float | None
    max_ratio: float | None
    warmup_step: int | None
    min_lambda_min: float | None
    min_lambda_min_step: int | None
    min_lambda_min_residual: float | None
    lambda_min_resolved: bool | None
    final_train_loss: float | None
    test_acc: float | None
    test_acc_tag: str | None
    final_subspace_similarity_to_first: float | None
    rotated: bool | None
    mean_rotation_angle: float | None
    polarity_flips: float | None
    eigenvalue_crossings: float | None
    final_batch_sharpness: float | None
    final_batch_sharpness_ratio: float | None
    final_clip_fraction: float | None
    rollbacks: float | None
    finite_difference_measurements: int | None
    max_verify_error: float | None
    total_hvps: float | None
    total_measure_seconds: float | None
    seed: str | None


def threshold_label(run: RunData) -> str:
    """The threshold in the optimizer's terms from the run card: ``"2/lr (GD)"``,
    ``"38/lr (Adam, beta1=0.9)"``; ``"(optimizer not recorded: no run card)"`` without a card.
    """
    opt = run.optimizer
    if opt is None:
        return "(optimizer not recorded: no run card)"
    g = opt["groups"][0]
    num = g.get("threshold_times_lr")
    kind = g.get("kind", "unknown")
    text = _KIND_TEXT.get(kind, kind)
    if kind in ("adam", "clipped_adam") and g.get("beta") is not None:
        text = f"{opt.get('name', text)}, beta1={g['beta']:g}"
    elif kind in ("heavy_ball", "nesterov") and g.get("beta") is not None:
        text += f", momentum={g['beta']:g}"
    if len(opt["groups"]) > 1:  # rpe/threshold is the smallest (most restrictive) group threshold
        return f"smallest of the {len(opt['groups'])} groups' thresholds ({text})"
    return f"{num:.3g}/lr ({text})" if num is not None else f"threshold ({text})"


def _run_lr(run: RunData) -> tuple[float | None, str | None]:
    opt = run.optimizer
    if opt is not None:
        return float(opt["groups"][0]["lr"]), "run_card"
    model_hp = run.hparams
    for key in ("lr", "learning_rate"):
        if isinstance(model_hp.get(key), (int, float)):
            return float(model_hp[key]), f"hparams.yaml:{key}"
    hp_opt = model_hp.get("optimizer")
    if isinstance(hp_opt, dict) and isinstance(hp_opt.get("init_args", {}).get("lr"), (int, float)):
        return float(hp_opt["init_args"]["lr"]), "hparams.yaml:optimizer.init_args.lr"
    for pattern in (run.names.grouped_pattern(LR), r"^lr-.*"):
        for tag in sorted(run.scalars):
            if re.match(pattern, tag) and len(run.scalars[tag]):
                return float(run.scalars[tag].values[0]), tag
    return None, None


def _opt(series: Series | None, fn: Any = None) -> float | None:
    """``fn`` over the series' finite values (None when there are none), or its last value.

    The monitor writes finite values only; event files written or merged by other tools may hold
    NaN or inf, which must not turn a maximum or a sum into NaN.
    """
    if series is None or not len(series):
        return None
    if fn is None:
        return series.last
    finite = series.values[np.isfinite(series.values)]
    return float(fn(finite)) if finite.size else None


def _controller_text(run: RunData) -> str | None:
    ctl = run.controller
    if ctl is None:
        return None
    if not ctl.get("enabled", True):
        return "disabled"
    if ctl.get("band") is not None:
        return f"band [{ctl['band'][0]:g}, {ctl['band'][1]:g}]"
    if ctl.get("target_ratio") is not None:
        return f"target {ctl['target_ratio']:g}"
    return "on"


def _warmup_step(steps: np.ndarray, warmup: float) -> int:
    """First step counted after the warm-up: ``first + warmup * (last - first)``, and never the
    first measurement when there are later ones.
    """
    first, last = int(steps[0]), int(steps[-1])
    cut = first + warmup * (last - first)
    return math.ceil(cut) if cut > first or len(steps) == 1 else int(steps[1])


def lambda_min_after(run: RunData, warmup: float) -> tuple[int | None, float | None, int | None, float | None]:
    """``(warm-up step, min lambda_min after it, its step, its residual)``; ``None`` where not logged."""
    lam = run.metric("lambda_min")
    if lam is None:
        return None, None, None, None
    cut = _warmup_step(lam.steps, warmup)
    keep = (lam.steps >= cut) & np.isfinite(lam.values)
    if not keep.any():
        return cut, None, None, None
    i = int(np.argmin(np.where(keep, lam.values, np.inf)))
    res = run.metric("lambda_min_residual")
    residual = None
    if res is not None:
        r = res.at(lam.steps[i:i + 1])[0]
        residual = None if math.isnan(r) else float(r)
    return cut, float(lam.values[i]), int(lam.steps[i]), residual


def summarize(run: RunData, rotation_threshold: float = 0.7, warmup: float = DEFAULT_WARMUP) -> RunSummary:
    """The numbers of one run, read from its scalars and run card (see the module docstring)."""
    n = run.names
    sharp = run.metric("sharpness")
    ratio = run.metric(STABILITY_RATIO)
    sim_first = run.metric("subspace_similarity_to_first")
    acc_tag = next((t for t in _TEST_ACC_TAGS if run.get(t) is not None), None)
    lr, lr_source = _run_lr(run)
    final_sim = _opt(sim_first)
    cut, lam_min, lam_step, lam_res = lambda_min_after(run, warmup)
    eff = run.grouped(LR)
    fd = run.metric("finite_difference")
    res = run.metric("sharpness_residual")
    opt = run.optimizer
    clip = run.grouped(CLIP_FRACTION)
    return RunSummary(
        name=run.name,
        path=str(run.path),
        label=run.label(),
        optimizer=None if opt is None else opt.get("name"),
        optimizer_kind=None if opt is None else opt["groups"][0].get("kind"),
        lr=lr,
        lr_source=lr_source,
        threshold_formula=threshold_label(run) if opt is not None else None,
        controller=_controller_text(run),
        final_effective_lr=eff[0][1].last if eff else None,
        final_lr_scale=_opt(run.metric("lr_scale")),
        measurements=len(sharp) if sharp is not None else 0,
        final_step=int(sharp.steps[-1]) if sharp is not None else None,
        final_sharpness=_opt(sharp),
        final_sharpness_residual=None if res is None or sharp is None else _nan_none(res.at(sharp.steps[-1:])[0]),
        max_sharpness=_opt(sharp, np.max),
        final_preconditioned_sharpness=_opt(run.metric("preconditioned_sharpness")),
        final_threshold=_opt(run.metric(THRESHOLD)),
        final_ratio=_opt(ratio),
        max_ratio=_opt(ratio, np.max),
        warmup_step=cut,
        min_lambda_min=lam_min,
        min_lambda_min_step=lam_step,
        min_lambda_min_residual=lam_res,
        lambda_min_resolved=None if lam_min is None or lam_res is None else bool(lam_min + lam_res < 0),
        final_train_loss=_opt(run.get(*LOSS_TAGS)),
        test_acc=_opt(run.get(acc_tag)) if acc_tag else None,
        test_acc_tag=acc_tag,
        final_subspace_similarity_to_first=final_sim,
        rotated=None if final_sim is None else bool(final_sim < rotation_threshold),
        mean_rotation_angle=_opt(run.metric("rotation_angle"), np.mean),
        polarity_flips=_opt(run.metric("polarity_flips")),
        eigenvalue_crossings=_opt(run.metric("eigenvalue_crossings")),
        final_batch_sharpness=_opt(run.metric("batch_sharpness")),
        final_batch_sharpness_ratio=_opt(run.metric("batch_sharpness_ratio")),
        final_clip_fraction=clip[0][1].last if clip else None,
        rollbacks=_opt(run.metric("rollbacks"), np.max),
        finite_difference_measurements=None if fd is None else int(np.sum(fd.values > 0.5)),
        max_verify_error=_opt(run.metric("verify_error"), np.max),
        total_hvps=_opt(run.get(n.hvps), np.sum),
        total_measure_seconds=_opt(run.get(n.measure_seconds), np.sum),
        seed=None if run.card is None else (run.card.get("run") or {}).get("seed"),
    )


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)
