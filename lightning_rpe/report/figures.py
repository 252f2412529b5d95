"""The report's figures: per run sharpness, spectrum and rotation; across runs the lr sweep.

Each ``*_figure`` function returns a matplotlib figure (file backend ``Agg``); :func:`figure_labels`
lists what a figure says (legend entries, axis labels, titles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import ticker

from lightning_rpe.names import (
    CLIP_FRACTION,
    CLIP_LEVEL,
    LR,
    STABILITY_RATIO,
    THRESHOLD,
)
from lightning_rpe.report.runs import RunData, Series
from lightning_rpe.report.summary import (
    DEFAULT_WARMUP,
    LOSS_TAGS,
    RunSummary,
    lambda_min_after,
    threshold_label,
)

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # after selecting the file backend

__all__ = ["figure_labels", "rotation_figure", "save_figure", "sharpness_figure", "spectrum_figure", "sweep_figure"]


def _missing(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}\nnot logged in this run", ha="center", va="center", transform=ax.transAxes,
            color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_above(ax: Any, handles: list[Any] | None = None, ncol: int = 2) -> None:
    """A legend in a strip above the axes, so it never covers data (the threshold line included)."""
    if handles is None:
        handles = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01, 1.0, 0.1), mode="expand",
                  ncol=ncol, fontsize=7.5, frameon=False, borderaxespad=0.0)


def _title(fig: Any, run: RunData, what: str) -> None:
    label = run.label()
    fig.suptitle(f"{run.name}: {what}" + (f"\n{label}" if label else ""), fontsize=10)


def _errorbars(ax: Any, series: Series, residual: Series | None, **kw: Any) -> list[Any]:
    if residual is None:
        fmt = kw.pop("fmt", "-")
        return list(ax.plot(series.steps, series.values, fmt, **kw))
    err = residual.at(series.steps)
    container = ax.errorbar(series.steps, series.values, yerr=np.where(np.isnan(err), 0.0, err), capsize=2,
                            elinewidth=0.8, **kw)
    return [container]


def _finite(*arrays: np.ndarray) -> np.ndarray:
    vals = np.concatenate([a[np.isfinite(a)] for a in arrays if a is not None and len(a)] or [np.zeros(0)])
    return vals


def _set_top(ax: Any, *arrays: np.ndarray) -> None:
    vals = _finite(*arrays)
    if len(vals) and vals.max() > 0:
        ax.set_ylim(bottom=0, top=1.08 * vals.max())


def _count_on_twin(ax: Any, counts: Series, label: str, ylabel: str) -> list[Any]:
    """A cumulative count as a grey step line on a twin y axis; its legend handles."""
    twin = ax.twinx()
    twin.set_ylabel(ylabel)
    return list(twin.step(counts.steps, counts.values, where="post", color="0.5", lw=1, label=label))


def _rollback_lines(run: RunData, ax: Any) -> list[Any]:
    """Vertical lines at the steps where the logged rollback count rose; the legend handle (if any)."""
    rb = run.metric("rollbacks")
    if rb is None:
        return []
    steps = rb.steps[np.nonzero(np.diff(np.concatenate([[0.0], rb.values])) > 0)[0]]
    lines = [ax.axvline(s, color="C3", lw=0.8, ls=":", alpha=0.8, label="controller rollback" if i == 0 else None)
             for i, s in enumerate(steps)]
    return lines[:1]


def sharpness_figure(run: RunData) -> Any:
    """Sharpness against the threshold of the optimizer in use, with the ratio (and the controller) below."""
    n = run.names
    pre = run.preconditioned
    eff_lr = run.grouped(LR) or [(t[3:], run.scalars[t]) for t in sorted(run.scalars) if t.startswith("lr-")]
    scale = run.metric("lr_scale")
    clip = run.grouped(CLIP_FRACTION)
    verify = run.metric("verify_error")
    panels = ["main"] + (["raw"] if pre else []) + ["ratio"] + (["lr"] if eff_lr or scale is not None else []) \
        + (["clip"] if clip else []) + (["verify"] if verify is not None else [])
    heights = {"main": 2.4, "raw": 1.1, "ratio": 1.3, "lr": 1.1, "clip": 0.9, "verify": 0.9}
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 1.0 + 2.0 * sum(heights[p] for p in panels)),
                             sharex=True, gridspec_kw={"height_ratios": [heights[p] for p in panels]},
                             layout="constrained")
    axes = np.atleast_1d(axes)
    ax_of = dict(zip(panels, axes))
    ax = ax_of["main"]
    sharp = run.metric("sharpness")
    compared = run.metric("preconditioned_sharpness") if pre else sharp
    thr = run.metric(THRESHOLD)
    thr_text = threshold_label(run)
    ctl = run.controller
    if ctl is not None and ctl.get("enabled", True):
        thr_text += " at the controller's effective lr"
    handles: list[Any] = []
    if compared is None:
        _missing(ax, n.preconditioned_sharpness if pre else n.sharpness)
    else:
        if pre:
            handles += ax.plot(compared.steps, compared.values, "o-", ms=3, color="C4",
                               label=r"preconditioned sharpness $\lambda_{max}(P^{-1/2}HP^{-1/2})$")
        else:
            handles += _errorbars(ax, compared, run.metric("sharpness_residual"), fmt="o-", ms=3, color="C0",
                                  label=r"sharpness $\lambda_{max}(H)$ (bars: solver residual)")
        fd = run.metric("finite_difference")
        if fd is not None and not pre:
            mask = fd.at(compared.steps) > 0.5
            if mask.any():
                handles += ax.plot(compared.steps[mask], compared.values[mask], "x", color="k", ms=6,
                                   label="measured with finite differences")
        bs = run.metric("batch_sharpness")
        if bs is not None:
            handles += _errorbars(ax, bs, run.metric("batch_sharpness_se"), fmt="d-", ms=2.5, lw=0.8, color="C2",
                                  alpha=0.8, label="batch sharpness (bars: standard error)")
        if thr is not None:
            handles += ax.plot(thr.steps, thr.values, "--", color="C3", lw=1.6, drawstyle="steps-post",
                               label=f"stability threshold {thr_text}")
        for g, s in run.grouped(THRESHOLD):
            if g:
                handles += ax.plot(s.steps, s.values, ":", lw=1.0, label=f"threshold {g}")
        ax.set_ylabel("preconditioned sharpness\n" + r"$\lambda_{max}(P^{-1/2}HP^{-1/2})$" if pre
                      else r"$\lambda_{max}(H)$" + "\n(loss / parameter$^2$)")
        _set_top(ax, compared.values, thr.values if thr is not None else np.zeros(0),
                 bs.values if bs is not None else np.zeros(0))
        loss = run.get(*LOSS_TAGS)
        if loss is not None:
            ax2 = ax.twinx()
            handles += ax2.plot(loss.steps, loss.values, color="0.45", lw=0.8, alpha=0.7,
                                label=f"training loss (right; logged at {len(loss)} steps)")
            if np.all(loss.values > 0):
                ax2.set_yscale("log")
            ax2.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    _legend_above(ax, handles)
    if pre:
        ax_raw = ax_of["raw"]
        if sharp is None:
            _missing(ax_raw, n.sharpness)
        else:
            _errorbars(ax_raw, sharp, run.metric("sharpness_residual"), fmt="o-", ms=2.5, color="C0",
                       label=r"raw sharpness $\lambda_{max}(H)$ (not compared with the threshold)")
            ax_raw.set_ylabel(r"$\lambda_{max}(H)$" + "\n(loss / parameter$^2$)")
            _legend_above(ax_raw, ncol=1)
            ax_raw.grid(alpha=0.3)
    ax_r = ax_of["ratio"]
    ratio = run.metric(STABILITY_RATIO)
    if ratio is None:
        _missing(ax_r, n.stability_ratio)
    else:
        groups = (run.optimizer or {}).get("groups", [])
        if len(groups) > 1:  # the exact joint ratio of the per-group learning rates (docs/metrics.md)
            what = r"$\lambda_{max}(S^{1/2}HS^{1/2})$, exact for the groups' lrs"
        else:
            what = "preconditioned sharpness / threshold" if pre else "sharpness / threshold"
        ax_r.plot(ratio.steps, ratio.values, "o-", ms=3, color="C0", label=f"stability ratio = {what}")
        bsr = run.metric("batch_sharpness_ratio")
        if bsr is not None:
            ax_r.plot(bsr.steps, bsr.values, "d-", ms=2.5, lw=0.8, color="C2", label="batch sharpness / threshold")
        ax_r.axhline(1.0, color="C3", ls="--", lw=1.2, label="ratio 1 (edge of stability)")
        low, high, target = run.metric("band_low"), run.metric("band_high"), run.metric("target_ratio")
        card_ctl = run.controller or {}
        band = card_ctl.get("band") if card_ctl.get("enabled", True) else None
        if low is not None and high is not None:
            ax_r.fill_between(low.steps, low.values, high.at(low.steps), step="post", color="C2", alpha=0.15,
                              label="controller band")
        elif band is not None:
            ax_r.axhspan(band[0], band[1], color="C2", alpha=0.15, label="controller band (run card)")
        if target is not None:
            ax_r.plot(target.steps, target.values, "-", color="C2", lw=1, label="controller target")
        elif card_ctl.get("enabled", True) and card_ctl.get("target_ratio") is not None:
            ax_r.axhline(card_ctl["target_ratio"], color="C2", lw=1, label="controller target (run card)")
        cr = run.metric("controller_ratio")
        if cr is not None:
            ax_r.plot(cr.steps, cr.values, "^", ms=4, color="C1", label="ratio seen by the controller at a decision")
        _rollback_lines(run, ax_r)
        ax_r.set_ylabel("stability ratio")
        ax_r.grid(alpha=0.3)
        _legend_above(ax_r, ncol=3)
    if "lr" in ax_of:
        ax_l = ax_of["lr"]
        lr_handles: list[Any] = []
        for g, s in eff_lr:
            lr_handles += ax_l.plot(s.steps, s.values, "-", lw=1.2, drawstyle="steps-post",
                                    label=f"effective lr {g}".strip())
        card_lr = run.optimizer["groups"][0]["lr"] if run.optimizer else None
        if card_lr is not None:
            lr_handles.append(ax_l.axhline(card_lr, color="0.5", ls=":", lw=1, label=f"optimizer lr {card_lr:g}"))
        ax_l.set_ylabel("learning rate")
        if scale is not None:
            ax_s = ax_l.twinx()
            lr_handles += ax_s.plot(scale.steps, scale.values, "--", color="C1", lw=0.9, drawstyle="steps-post",
                                    label="controller factor (right, dashed)")
            ax_s.set_ylabel("factor")
        lr_handles += _rollback_lines(run, ax_l)
        ax_l.grid(alpha=0.3)
        _legend_above(ax_l, lr_handles, ncol=3)
    if "clip" in ax_of:
        ax_c = ax_of["clip"]
        for g, s in clip:
            ax_c.plot(s.steps, s.values, "-", lw=1, label=f"clip fraction {g}".strip())
        levels = run.grouped(CLIP_LEVEL)
        if levels:
            ax_cl = ax_c.twinx()
            for _, s in levels:
                ax_cl.plot(s.steps, s.values, ":", lw=1, color="0.4")
            ax_cl.set_ylabel("clip level (dotted)")
        ax_c.set_ylabel("clipped fraction")
        ax_c.grid(alpha=0.3)
        _legend_above(ax_c, ncol=3)
    if "verify" in ax_of:
        ax_v = ax_of["verify"]
        assert verify is not None
        ax_v.semilogy(verify.steps, np.clip(verify.values, 1e-16, None), "o-", ms=2.5, color="C5",
                      label="relative error of an exact Hessian product against finite differences")
        ax_v.set_ylabel("verify error")
        ax_v.grid(alpha=0.3)
        _legend_above(ax_v, ncol=1)
    axes[-1].set_xlabel("optimizer step")
    _title(fig, run, "sharpness against the stability threshold" + (" (preconditioned)" if pre else ""))
    return fig


def spectrum_figure(run: RunData, warmup: float = DEFAULT_WARMUP) -> Any:
    """Top-k eigenvalues and lambda_min with solver residuals as error bars; the minimum after ``warmup``."""
    n = run.names
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(8.5, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1.3]},
                                   layout="constrained")
    eig_tags = run.eig_tags()
    if not eig_tags and run.metric("sharpness") is not None:
        eig_tags = [n.sharpness]
    handles: list[Any] = []
    if not eig_tags:
        _missing(ax, f"{n.eig(1)} ... {n.eig(2)}")
    else:
        cmap = plt.get_cmap("viridis")
        for i, tag in enumerate(eig_tags):
            s = run.scalars[tag]
            label = rf"$\lambda_{{{i + 1}}}(H)$" if tag != n.sharpness else r"$\lambda_{max}(H)$"
            handles += ax.plot(s.steps, s.values, "o-", ms=2.5, lw=1.2,
                               color=cmap(i / max(1, len(eig_tags) - 1) * 0.85), label=label)
        thr = run.metric(THRESHOLD)
        if thr is not None and not run.preconditioned:
            handles += ax.plot(thr.steps, thr.values, "--", color="C3", lw=1.2, drawstyle="steps-post",
                               label=f"stability threshold {threshold_label(run)}")
        elif run.preconditioned:
            handles += ax.plot([], [], " ", label="(the threshold applies to the preconditioned sharpness: "
                                                   "see the sharpness figure)")
        ax.set_ylabel(r"eigenvalue of $H$ (loss / parameter$^2$)")
        cross = run.metric("eigenvalue_crossings")
        if cross is not None:
            handles += _count_on_twin(ax, cross, "cumulative eigenvalue crossings (right)", "crossings (count)")
        ax.grid(alpha=0.3)
        _legend_above(ax, handles, ncol=4)
    lam = run.metric("lambda_min")
    if lam is None:
        _missing(ax_n, n.lambda_min)
    else:
        res = run.metric("lambda_min_residual")
        err = res.at(lam.steps) if res is not None else np.zeros(len(lam))
        err = np.where(np.isnan(err), 0.0, err)
        within = np.abs(lam.values) <= err
        ax_n.axhline(0, color="0.3", lw=0.8)
        ax_n.errorbar(lam.steps, lam.values, yerr=err if res is not None else None, fmt="-", lw=0.8, color="C1",
                      elinewidth=0.8, capsize=2,
                      label=r"$\lambda_{min}(H)$" + (" (bars: solver residual)" if res is not None else ""))
        ax_n.plot(lam.steps[~within], lam.values[~within], "o", ms=3.5, color="C1", label="resolved")
        if within.any():
            ax_n.plot(lam.steps[within], lam.values[within], "o", ms=4, mfc="white", color="C1",
                      label=f"within its residual of 0 ({int(within.sum())}): no negative curvature resolved")
        pos = (lam.values > 0) & ~within
        if pos.any():
            ax_n.plot(lam.steps[pos], lam.values[pos], "s", ms=4, mfc="none", color="C3",
                      label=f"positive beyond the residual ({int(pos.sum())}; an upper bound of " r"$\lambda_{min}$)")
        cut, value, step, residual = lambda_min_after(run, warmup)
        if cut is not None and cut > lam.steps[0]:
            ax_n.axvspan(lam.steps[0], cut, color="0.85", alpha=0.5, label=f"warm-up (before step {cut})")
        if step is not None and value is not None:
            text = f"min after warm-up: {value:.3g}"
            if residual is not None:  # an upper bound of lambda_min: the residual bounds the distance to an eigenvalue
                text += f" (residual {residual:.2g})" + ("" if value + residual < 0 else ", not resolved")
            ax_n.plot([step], [value], "*", ms=10, color="C3", label=f"{text} at step {step}")
        ax_n.set_ylabel(r"$\lambda_{min}(H)$" + "\n(loss / parameter$^2$)")
        ax_n.grid(alpha=0.3)
        _legend_above(ax_n, ncol=2)
    ax_n.set_xlabel("optimizer step")
    _title(fig, run, f"top-{max(1, len(eig_tags))} Hessian spectrum and the most negative eigenvalue")
    return fig


def rotation_figure(run: RunData, rotation_threshold: float) -> Any:
    """Rotation angle of the leading eigenvector, subspace similarity and polarity with its flips."""
    n = run.names
    fig, (ax, ax_s, ax_p) = plt.subplots(3, 1, figsize=(8.5, 8.5), sharex=True, layout="constrained")
    cos, angle = run.metric("rotation_cos"), run.metric("rotation_angle")
    if angle is None and cos is not None:
        angle = Series(cos.steps, np.degrees(np.arccos(np.clip(np.abs(cos.values), 0.0, 1.0))))
    if angle is None:
        _missing(ax, f"{n.rotation_angle} / {n.rotation_cos}")
    else:
        ax.semilogy(angle.steps, np.clip(angle.values, 1e-4, None), "o-", ms=2.5, color="C0",
                    label=r"angle between $v_1$ at consecutive measurements, $\arccos|\cos(v_t, v_{t-1})|$")
        ax.set_ylabel("rotation angle\n(degrees, log scale)")
        ax.grid(alpha=0.3, which="both")
        _legend_above(ax, ncol=1)
    sim, sim_first = run.metric("subspace_similarity"), run.metric("subspace_similarity_to_first")
    if sim is None and sim_first is None:
        _missing(ax_s, n.subspace_similarity)
    else:
        if sim is not None:
            ax_s.plot(sim.steps, sim.values, "o-", ms=2.5, color="C2", label="top-k subspace: consecutive")
        if sim_first is not None:
            ax_s.plot(sim_first.steps, sim_first.values, "^-", ms=2.5, color="C4", label="top-k subspace: to the first")
            ax_s.axhline(rotation_threshold, color="0.4", ls=":", lw=1, label=f"{rotation_threshold:g} (rotated below)")
        ax_s.set_ylim(-0.02, 1.02)
        ax_s.set_ylabel("subspace similarity\n(1 = same, 0 = orthogonal)")
        ax_s.grid(alpha=0.3)
        _legend_above(ax_s, ncol=3)
    pol, flips = run.metric("polarity"), run.metric("polarity_flips")
    if pol is None:
        _missing(ax_p, n.polarity)
    else:
        handles = list(ax_p.plot(pol.steps, pol.values, "o-", ms=2.5, lw=1, color="C5", label="polarity (signed, degrees)"))
        ax_p.axhline(0, color="0.3", lw=0.8)
        sign = np.sign(pol.values)
        flip_idx = np.nonzero((sign[1:] * sign[:-1]) < 0)[0] + 1
        if len(flip_idx):
            handles += ax_p.plot(pol.steps[flip_idx], pol.values[flip_idx], "x", color="C3", ms=6,
                                 label=f"sign flip ({len(flip_idx)})")
        ax_p.set_ylabel("polarity (degrees)")
        if flips is not None:
            handles += _count_on_twin(ax_p, flips, "cumulative flips (right)", "flips (count)")
        ax_p.grid(alpha=0.3)
        _legend_above(ax_p, handles, ncol=3)
    ax_p.set_xlabel("optimizer step")
    _title(fig, run, "rotation of the leading eigenvectors between measurements")
    return fig


def _series_key(s: RunSummary) -> str:
    opt = s.optimizer or "optimizer not recorded"
    ctl = "no controller" if s.controller is None else f"controller {s.controller}"
    return f"{opt}, {ctl}" if s.optimizer else opt


def _sweep_y(s: RunSummary, attr: str) -> float | None:
    """The run's value on a sweep axis: the sharpness compared with the threshold (preconditioned for
    the Adam family) or ``attr`` itself.
    """
    if attr == "final_sharpness" and s.optimizer_kind in ("adam", "clipped_adam"):
        return s.final_preconditioned_sharpness
    return getattr(s, attr)  # type: ignore[no-any-return]


def sweep_figure(summaries: Sequence[RunSummary], rotation_threshold: float) -> Any:
    """Final sharpness and accuracy against the learning rate: every run, and mean +- sd per lr and series."""
    pts = [s for s in summaries if s.lr is not None]
    if len(pts) < 2:
        return None
    keys = sorted({_series_key(s) for s in pts})
    pre = {s.optimizer_kind in ("adam", "clipped_adam") for s in pts}
    fig, (ax, ax_a) = plt.subplots(1, 2, figsize=(12, 5.2), sharex=True)
    sharp_label = ("final preconditioned sharpness" if pre == {True} else r"final sharpness $\lambda_{max}(H)$"
                   if pre == {False} else "final sharpness compared with the threshold\n(preconditioned for Adam)")
    lrs = np.array(sorted({s.lr for s in pts if s.lr is not None}))
    offsets = np.linspace(-0.04, 0.04, len(keys)) if len(keys) > 1 else np.zeros(1)
    for k, key in enumerate(keys):
        color = f"C{k % 10}"
        members = [s for s in pts if _series_key(s) == key]
        for axis, attr in ((ax, "final_sharpness"), (ax_a, "test_acc")):
            xs, means, stds, counts = [], [], [], []
            for lr in sorted({s.lr for s in members if s.lr is not None}):
                at_lr = [(s, _sweep_y(s, attr)) for s in members if s.lr == lr]
                ys = [y for _, y in at_lr if y is not None]
                if not ys:
                    continue
                x = lr * (1 + offsets[k])
                for s, y in at_lr:
                    if y is not None:
                        axis.plot([x], [y], "o", ms=4, alpha=0.55, color=color,
                                  mfc=color if s.rotated is True else "none")
                xs.append(x)
                means.append(float(np.mean(ys)))
                stds.append(float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0)
                counts.append(len(ys))
            if xs:
                lo, hi = min(counts), max(counts)
                runs = f"{lo}" if lo == hi else f"{lo}-{hi}"
                label = (f"{key} (mean ± sd over {runs} run{'s' if hi > 1 else ''} per lr)"
                         if axis is ax else None)
                axis.errorbar(xs, means, yerr=stds, fmt="_", ms=14, mew=2, capsize=4, color=color, label=label)
    for axis in (ax, ax_a):
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(ticker.FixedLocator(lrs.tolist()))
        axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlim(lrs.min() / 1.3, lrs.max() * 1.3)
        axis.set_xlabel("learning rate (optimizer lr from the run card)")
        axis.grid(alpha=0.3, which="both")
    grid = np.geomspace(lrs.min() / 1.3, lrs.max() * 1.3, 50)
    numerators = sorted({(round(s.final_threshold * s.lr, 6), s.threshold_formula) for s in pts
                         if s.final_threshold is not None and s.lr is not None
                         and s.controller in (None, "disabled")})
    seen_num: set[float] = set()
    for num, formula in numerators:
        if num in seen_num:
            continue
        seen_num.add(num)
        text = formula if formula else f"{num:g}/lr"
        ax.plot(grid, num / grid, "--", color="0.3", lw=1, label=f"threshold {text}")
    ax.plot([], [], "o", color="0.3", ms=4, label=f"one run, filled: top-k subspace rotated (< {rotation_threshold:g})")
    ax.plot([], [], "o", color="0.3", mfc="none", ms=4, label="one run, hollow: not rotated or not logged")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel(sharp_label)
    ax_a.set_ylabel("test accuracy")
    ax.set_title("flatness against the learning rate", fontsize=10)
    ax_a.set_title("generalisation against the learning rate", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(labels) / 2), 1, 1))
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG (100 dpi) to ``path``, close it, return ``path``."""
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure_labels(fig: Any) -> list[str]:
    """Every legend entry, axis label and title of a figure (for checks of what a figure says)."""
    texts = [t.get_text() for t in fig.texts]
    for legend in fig.legends:
        texts += [t.get_text() for t in legend.get_texts()]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_ylabel(), ax.get_xlabel()]
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()]
    return [t for t in texts if t]
