"""Read the event files and run cards of monitored runs and draw the figures a researcher wants.

``lightning-rpe report RUN_DIR [RUN_DIR ...]`` (or :func:`write_report`) finds every directory
under the given paths that holds TensorBoard event files (one such directory = one run), reads
all scalars and the run's ``run_card.json`` (written by the monitor at train start, see
:mod:`lightning_rpe.callbacks.run_card`), and writes to the output folder:

* ``<run>_sharpness.png``: the sharpness compared with the stability threshold, labelled by the
  optimizer that was used (``2/lr (GD)``, ``38/lr (Adam, beta1=0.9)``), with solver residuals as
  error bars, the batch sharpness where logged and the training loss on a twin axis; for
  Adam-family runs the raw ``lambda_max(H)`` in its own panel; the stability ratio with the
  controller's band or target; the effective learning rate and the controller's factor when an lr
  was logged; ClippedAdam's clip statistics where logged;
* ``<run>_spectrum.png``: the top-k eigenvalues (with eigenvalue crossings where logged) and the
  most negative eigenvalue with its residual as error bars (hollow markers: within the residual of
  0, so no negative curvature was resolved);
* ``<run>_rotation.png``: the rotation angle of the leading eigenvector between consecutive
  measurements (one axis, degrees), the top-k subspace similarity, and the polarity with its flips;
* ``sweep.png`` (two runs or more with a known lr): final sharpness and test accuracy against the
  learning rate, one series per optimizer/controller setting, mean and standard deviation over the
  runs (seeds) at each lr, every run drawn and labelled in the legend;
* ``summary.md`` (the tables below, with the figures) and ``summary.json`` (the same numbers).

Numbers in the summary are read from the event files and the run card, never recomputed: "final"
is the value at the largest step of a tag, counts are numbers of logged points, totals are sums of
logged values. "min lambda_min" is taken after a warm-up (default: the first 10% of the measured
steps, so the value at initialisation does not dominate). Tags are ``prefix + name`` with the names
of :mod:`lightning_rpe.names`; ``prefix`` defaults to the run card's, else ``"rpe/"``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import yaml  # type: ignore[import-untyped]
from matplotlib import ticker
from tensorboard.backend.event_processing.event_file_loader import (  # type: ignore[import-untyped]
    LegacyEventFileLoader,
)
from tensorboard.util import tensor_util  # type: ignore[import-untyped]

from lightning_rpe.callbacks.run_card import read_run_card
from lightning_rpe.names import (
    CLIP_FRACTION,
    CLIP_LEVEL,
    DEFAULT_PREFIX,
    LR,
    STABILITY_RATIO,
    THRESHOLD,
    MetricNames,
)

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # after selecting the file backend

__all__ = [
    "DEFAULT_WARMUP",
    "ReportError",
    "RunData",
    "RunSummary",
    "Series",
    "figure_labels",
    "find_runs",
    "load_run",
    "summarize",
    "threshold_label",
    "write_report",
]

#: Fraction of the measured step range skipped before "min lambda_min" is taken.
DEFAULT_WARMUP = 0.1
_LOSS_TAGS = ("train_loss", "train_loss_step", "loss")
_TEST_ACC_TAGS = ("test_acc", "val_acc", "val_acc_epoch", "test_acc_epoch")
_KIND_TEXT = {"gd": "GD", "heavy_ball": "SGD heavy-ball", "nesterov": "SGD Nesterov", "adam": "Adam",
              "clipped_adam": "ClippedAdam", "unknown": "unrecognised optimizer, GD assumed"}


class ReportError(Exception):
    """Raised for unusable input (no event files, unreadable paths); the CLI prints its message."""


@dataclass(frozen=True)
class Series:
    """One scalar tag: ``steps`` (int array) and ``values`` (float array), sorted by step."""

    steps: np.ndarray
    values: np.ndarray

    @property
    def last(self) -> float:
        """The value at the largest step."""
        return float(self.values[-1])

    def __len__(self) -> int:
        return len(self.steps)

    def at(self, steps: np.ndarray) -> np.ndarray:
        """Values at ``steps`` (NaN where this tag has no value at that step)."""
        out = np.full(len(steps), np.nan)
        index = {int(s): i for i, s in enumerate(self.steps)}
        for j, s in enumerate(steps):
            i = index.get(int(s))
            if i is not None:
                out[j] = self.values[i]
        return out


@dataclass
class RunData:
    """All scalars of one run directory, its run card and the hyperparameters found next to it."""

    path: Path
    name: str
    scalars: dict[str, Series]
    hparams: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] | None = None
    names: MetricNames = field(default_factory=MetricNames)

    def get(self, *tags: str) -> Series | None:
        """The first of ``tags`` (full tags, e.g. ``run.names.sharpness``) that was logged, else ``None``."""
        for tag in tags:
            if tag in self.scalars and len(self.scalars[tag]):
                return self.scalars[tag]
        return None

    def metric(self, name: str) -> Series | None:
        """The series of ``prefix + name`` (``name`` from :mod:`lightning_rpe.names`), else ``None``."""
        return self.get(self.names.tag(name))

    def eig_tags(self) -> list[str]:
        """``eig_1 .. eig_k`` tags in order."""
        tags = [t for t in self.scalars if re.fullmatch(self.names.eig_pattern(), t)]
        return sorted(tags, key=lambda t: int(t.rsplit("_", 1)[1]))

    def grouped(self, name: str) -> list[tuple[str, Series]]:
        """``prefix + name`` and its per-group tags ``.../pgN`` that were logged: ``[(label, series)]``
        with label ``""`` for the ungrouped tag and ``"pgN"`` for group N."""
        out = []
        for tag in sorted(self.scalars, key=_natural):
            if re.fullmatch(self.names.grouped_pattern(name), tag) and len(self.scalars[tag]):
                out.append((tag[len(self.names.tag(name)):].lstrip("/"), self.scalars[tag]))
        return out

    @property
    def optimizer(self) -> dict[str, Any] | None:
        """The run card's ``optimizer`` entry (class and per-group kind/lr/betas), if any."""
        opt = (self.card or {}).get("optimizer")
        return opt if isinstance(opt, dict) and opt.get("groups") else None

    @property
    def preconditioned(self) -> bool:
        """True when the threshold applies to the preconditioned sharpness (Adam family)."""
        opt = self.optimizer
        if opt is not None:
            return bool(opt["groups"][0].get("preconditioned"))
        return self.metric("preconditioned_sharpness") is not None

    @property
    def controller(self) -> dict[str, Any] | None:
        """The run card's controller settings (``None``: no controller in the Trainer, or no card)."""
        ctl = (self.card or {}).get("controller")
        return ctl if isinstance(ctl, dict) else None

    def label(self) -> str:
        """``"Adam lr=0.005, controller band [1.1, 1.5]"`` from the run card (empty without one)."""
        opt = self.optimizer
        if opt is None:
            return ""
        g = opt["groups"][0]
        parts = [f"{opt.get('name', '?')} lr={g['lr']:g}"]
        ctl = self.controller
        if ctl is None:
            parts.append("no controller")
        elif not ctl.get("enabled", True):
            parts.append("controller disabled")
        elif ctl.get("band") is not None:
            lo, hi = ctl["band"]
            parts.append(f"controller band [{lo:g}, {hi:g}]")
        elif ctl.get("target_ratio") is not None:
            parts.append(f"controller target {ctl['target_ratio']:g}")
        return ", ".join(parts)


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


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


# -- reading ---------------------------------------------------------------------------------------
def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every directory at or below ``paths`` that contains TensorBoard event files, sorted.

    Raises :class:`ReportError` naming the path when a path does not exist or holds no event file.
    """
    runs: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ReportError(f"run directory not found: {path}")
        if path.is_file():
            if ".tfevents." not in path.name:
                raise ReportError(f"not a TensorBoard event file or run directory: {path}")
            runs.append(path.parent)
            continue
        found = sorted({f.parent for f in path.rglob("events.out.tfevents.*")})
        if not found:
            raise ReportError(f"no TensorBoard event files under {path}")
        runs.extend(found)
    unique: list[Path] = []
    for r in runs:
        if r not in unique:
            unique.append(r)
    return unique


class _HparamsLoader(yaml.SafeLoader):
    """A safe YAML loader that also reads the ``!!python/tuple`` tags Lightning writes for tuples."""


_HparamsLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                               lambda loader, node: tuple(loader.construct_sequence(node)))


def _read_hparams(run_dir: Path) -> dict[str, Any]:
    for candidate in (run_dir / "hparams.yaml", run_dir.parent / "hparams.yaml"):
        if candidate.is_file():
            try:
                data = yaml.load(candidate.read_text(), Loader=_HparamsLoader)  # a SafeLoader subclass
            except (OSError, yaml.YAMLError):  # a broken hparams file must not stop the report
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def _event_file_key(path: Path) -> list[Any]:
    # events.out.tfevents.<unix seconds>.<host>.<pid>.<counter>[suffix]: numbers compared as numbers
    return _natural(path.name)


def _scalar_events(path: Path) -> Iterable[tuple[str, int, float, float]]:
    """``(tag, step, wall_time, value)`` of every scalar in one event file (simple values and
    scalar tensors)."""
    for event in LegacyEventFileLoader(str(path)).Load():
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                yield value.tag, int(event.step), float(event.wall_time), float(value.simple_value)
            elif kind == "tensor":
                array = tensor_util.make_ndarray(value.tensor)
                if array.size == 1 and np.issubdtype(array.dtype, np.number):
                    yield value.tag, int(event.step), float(event.wall_time), float(array.reshape(()))


def load_run(run_dir: str | os.PathLike[str], name: str | None = None, prefix: str | None = None) -> RunData:
    """Read every scalar of the event files in ``run_dir`` and its run card.

    When a step of a tag was written more than once (a resumed run), the value written last wins:
    last by the event's wall time, then by the event file's creation time and counter (numbers in
    the file name compared as numbers), then by position in the file. ``prefix`` (default: the run
    card's, else ``"rpe/"``) is the monitor's tag prefix.
    """
    run_dir = Path(run_dir)
    files = sorted((f for f in run_dir.glob("events.out.tfevents.*") if f.is_file()), key=_event_file_key)
    latest: dict[str, dict[int, tuple[tuple[float, int, int], float]]] = {}
    for rank, f in enumerate(files):
        try:
            for position, (tag, step, wall, value) in enumerate(_scalar_events(f)):
                key = (wall, rank, position)
                by_step = latest.setdefault(tag, {})
                if step not in by_step or key >= by_step[step][0]:
                    by_step[step] = (key, value)
        except Exception as err:  # corrupted or unreadable file
            raise ReportError(f"cannot read the event file {f}: {err}") from err
    scalars: dict[str, Series] = {}
    for tag, by_step in latest.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        scalars[tag] = Series(steps, np.array([by_step[int(s)][1] for s in steps], dtype=np.float64))
    card = read_run_card(run_dir)
    if prefix is None:
        card_prefix = None if card is None else card.get("prefix")
        prefix = card_prefix if isinstance(card_prefix, str) else DEFAULT_PREFIX
    return RunData(path=run_dir, name=name or _run_name(run_dir), scalars=scalars, hparams=_read_hparams(run_dir),
                   card=card, names=MetricNames(prefix))


def _run_name(run_dir: Path) -> str:
    parts = [p for p in run_dir.resolve().parts[-2:] if p]
    if parts and not re.fullmatch(r"(version_\d+|\d+)", parts[-1]):
        parts = parts[-1:]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts)) or "run"


# -- summary -------------------------------------------------------------------------------------
def threshold_label(run: RunData) -> str:
    """The threshold in the optimizer's terms from the run card: ``"2/lr (GD)"``,
    ``"38/lr (Adam, beta1=0.9)"``; ``"(optimizer not recorded: no run card)"`` without a card."""
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
    if len(opt["groups"]) > 1:
        text += f"; group 1 of {len(opt['groups'])}"
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
    if series is None or not len(series):
        return None
    return float(fn(series.values)) if fn is not None else series.last


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
    first measurement when there are later ones."""
    first, last = int(steps[0]), int(steps[-1])
    cut = first + warmup * (last - first)
    return math.ceil(cut) if cut > first or len(steps) == 1 else int(steps[1])


def _lambda_min_after(run: RunData, warmup: float) -> tuple[int | None, float | None, int | None, float | None]:
    lam = run.metric("lambda_min")
    if lam is None:
        return None, None, None, None
    cut = _warmup_step(lam.steps, warmup)
    keep = lam.steps >= cut
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
    cut, lam_min, lam_step, lam_res = _lambda_min_after(run, warmup)
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
        final_train_loss=_opt(run.get(*_LOSS_TAGS)),
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


# -- figures ---------------------------------------------------------------------------------------
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


def _rollback_lines(run: RunData, ax: Any) -> list[Any]:
    """Vertical lines at the steps where the logged rollback count rose; the legend handle (if any)."""
    rb = run.metric("rollbacks")
    if rb is None:
        return []
    steps = rb.steps[np.nonzero(np.diff(np.concatenate([[0.0], rb.values])) > 0)[0]]
    lines = [ax.axvline(s, color="C3", lw=0.8, ls=":", alpha=0.8, label="controller rollback" if i == 0 else None)
             for i, s in enumerate(steps)]
    return lines[:1]


def _sharpness_figure(run: RunData) -> Any:
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
        loss = run.get(*_LOSS_TAGS)
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
            for g, s in levels:
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


def _spectrum_figure(run: RunData, warmup: float = DEFAULT_WARMUP) -> Any:
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
            ax_c = ax.twinx()
            handles += ax_c.step(cross.steps, cross.values, where="post", color="0.5", lw=1,
                                 label="cumulative eigenvalue crossings (right)")
            ax_c.set_ylabel("crossings (count)")
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
                      label=f"positive beyond the residual ({int(pos.sum())})")
        cut, value, step, residual = _lambda_min_after(run, warmup)
        if cut is not None and cut > lam.steps[0]:
            ax_n.axvspan(lam.steps[0], cut, color="0.85", alpha=0.5, label=f"warm-up (before step {cut})")
        if step is not None and value is not None:
            text = f"min after warm-up: {value:.3g}"
            if residual is not None:
                text += f" ± {residual:.2g}" + ("" if value + residual < 0 else " (not resolved)")
            ax_n.plot([step], [value], "*", ms=10, color="C3", label=f"{text} at step {step}")
        ax_n.set_ylabel(r"$\lambda_{min}(H)$" + "\n(loss / parameter$^2$)")
        ax_n.grid(alpha=0.3)
        _legend_above(ax_n, ncol=2)
    ax_n.set_xlabel("optimizer step")
    _title(fig, run, f"top-{max(1, len(eig_tags))} Hessian spectrum and the most negative eigenvalue")
    return fig


def _rotation_figure(run: RunData, rotation_threshold: float) -> Any:
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
            ax_f = ax_p.twinx()
            handles += ax_f.step(flips.steps, flips.values, where="post", color="0.5", lw=1,
                                 label="cumulative flips (right)")
            ax_f.set_ylabel("flips (count)")
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
    the Adam family) or ``attr`` itself."""
    if attr == "final_sharpness" and s.optimizer_kind in ("adam", "clipped_adam"):
        return s.final_preconditioned_sharpness
    return getattr(s, attr)  # type: ignore[no-any-return]


def _sweep_figure(summaries: Sequence[RunSummary], rotation_threshold: float) -> Any:
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
                nmax = max(counts)
                label = f"{key} (mean ± sd over {nmax} run{'s' if nmax > 1 else ''} per lr)" if axis is ax else None
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


def _save(fig: Any, path: Path) -> Path:
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


# -- Markdown --------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}g}"
    return str(x)


def _pm(value: float | None, err: float | None) -> str:
    if value is None:
        return "-"
    return _fmt(value) if err is None else f"{_fmt(value)} ± {_fmt(err, 2)}"


def _table(summaries: Sequence[RunSummary], cols: Sequence[tuple[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for s in summaries:
        cells = [fn(s) if callable(fn) else _fmt(getattr(s, fn)) for _, fn in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _markdown(summaries: Sequence[RunSummary], figures: dict[str, list[Path]], out: Path,
              rotation_threshold: float, warmup: float) -> str:
    lines = ["# lightning-rpe report", ""]
    lines.append("The optimizer, its learning rate and the controller's settings are read from each run's "
                 "`run_card.json` (written by the monitor at train start from the live optimizer); the "
                 "measurements from the TensorBoard event files: *final* = value at the last logged step, "
                 "*max* over all measurements, HVPs and measurement seconds summed. ± gives the solver "
                 "residual ||Hv - λv||, an absolute bound on the distance of the value to an eigenvalue.")
    lines.append("")
    lines.append("## Runs")
    lines.append("")
    lines += _table(summaries, [
        ("run", "name"), ("optimizer", "optimizer"), ("lr", "lr"), ("lr from", "lr_source"),
        ("threshold", "threshold_formula"), ("controller", lambda s: s.controller or "none"),
        ("final effective lr", "final_effective_lr"), ("final lr factor", "final_lr_scale"), ("seed", "seed"),
    ])
    lines.append("## Measurements")
    lines.append("")
    lines += _table(summaries, [
        ("run", "name"), ("measurements", "measurements"), ("last step", "final_step"),
        ("final sharpness", lambda s: _pm(s.final_sharpness, s.final_sharpness_residual)),
        ("max sharpness", "max_sharpness"), ("final precond. sharpness", "final_preconditioned_sharpness"),
        ("final threshold", "final_threshold"), ("final ratio", "final_ratio"), ("max ratio", "max_ratio"),
        ("min λ_min after warm-up", lambda s: _pm(s.min_lambda_min, s.min_lambda_min_residual)),
        ("at step", "min_lambda_min_step"), ("final train loss", "final_train_loss"), ("test acc", "test_acc"),
    ])
    lines.append("## Geometry and cost")
    lines.append("")
    geometry: list[tuple[str, Any]] = [
        ("run", "name"), ("subspace sim. to first", "final_subspace_similarity_to_first"), ("rotated", "rotated"),
        ("mean rotation angle (°)", "mean_rotation_angle"), ("polarity flips", "polarity_flips")]
    optional = [("eigenvalue crossings", "eigenvalue_crossings"), ("final batch sharpness", "final_batch_sharpness"),
                ("final batch ratio", "final_batch_sharpness_ratio"), ("final clip fraction", "final_clip_fraction"),
                ("rollbacks", "rollbacks"), ("finite-difference measurements", "finite_difference_measurements"),
                ("max verify error", "max_verify_error")]
    geometry += [c for c in optional if any(getattr(s, c[1]) is not None for s in summaries)]
    geometry += [("HVPs", "total_hvps"), ("measure s", "total_measure_seconds")]
    lines += _table(summaries, geometry)
    notes = [(f"min λ_min after warm-up: the smallest logged λ_min at or after the first {warmup:.0%} of the "
              "measured steps (the value at initialisation is excluded); it counts as resolved negative "
              "curvature only when λ_min + residual < 0.")]
    unresolved = [s.name for s in summaries if s.lambda_min_resolved is False]
    if unresolved:
        notes.append("no negative curvature resolved (λ_min within its residual of 0 or positive) in: "
                     + ", ".join(unresolved) + ".")
    if any(s.test_acc_tag and s.test_acc_tag.startswith("val") for s in summaries):
        notes.append("test acc: where no `test_acc` was logged, the last `val_acc` is shown.")
    if any(s.rotated is None for s in summaries):
        notes.append(f"rotated: `-` means the run logged no similarity to the first subspace "
                     f"(`subspace_similarity_to_first`); rotated = below {rotation_threshold}.")
    if any(s.lr_source and s.lr_source != "run_card" for s in summaries):
        notes.append("lr: runs without a `run_card.json` (written by lightning-rpe 0.1.0's monitor at train start) "
                     "fall back to `hparams.yaml` (the model's arguments, which may differ from the optimizer "
                     "that trained) or to the first logged lr value; the column *lr from* says which.")
    if any(s.controller and s.controller != "disabled" for s in summaries):
        notes.append("controller: the effective lr is the optimizer's lr times the controller's factor, "
                     "from the logged `lr` / `lr_scale` tags.")
    lines += [f"- {n}" for n in notes] + [""]
    for title, paths in figures.items():
        lines.append(f"## {title}")
        lines.append("")
        for p in paths:
            lines.append(f"![{p.stem}]({os.path.relpath(p, out)})")
            lines.append("")
    return "\n".join(lines)


def write_report(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None,
                 rotation_threshold: float = 0.7, prefix: str | None = None,
                 warmup: float = DEFAULT_WARMUP) -> dict[str, Any]:
    """Write figures, ``summary.md`` and ``summary.json`` for the runs under ``run_dirs``.

    Args:
        run_dirs: run folders (searched recursively for event files) or event files.
        out: output folder; default ``<run>/report`` for one path, else ``report`` under the
            paths' common parent.
        rotation_threshold: a run counts as rotated when the similarity between its first and final
            top-k subspace is below this value, in (0, 1].
        prefix: the monitor's tag prefix (default: each run card's, else ``"rpe/"``).
        warmup: fraction of the measured step range skipped before "min lambda_min", in [0, 1).

    Returns:
        ``{"out": Path, "summaries": [RunSummary, ...], "figures": [Path, ...], "markdown": Path}``.

    Raises:
        ReportError: no run directory, a missing path, no event file, an unreadable event file.
        ValueError: ``rotation_threshold``, ``warmup`` or ``prefix`` out of range.
    """
    if not run_dirs:
        raise ReportError("give at least one run directory")
    if not 0 < rotation_threshold <= 1:
        raise ValueError(f"write_report: rotation_threshold must be in (0, 1]; got {rotation_threshold!r}")
    if not 0 <= warmup < 1:
        raise ValueError(f"write_report: warmup must be in [0, 1); got {warmup!r}")
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(f"write_report: prefix must be a str such as 'rpe/' or None; got {prefix!r}")
    runs_paths = find_runs(run_dirs)
    if out is None:
        roots = [Path(p).resolve() for p in run_dirs]
        base = roots[0] if len(roots) == 1 and roots[0].is_dir() else Path(os.path.commonpath(roots))
        if base.is_file():
            base = base.parent
        out = base / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[RunData] = []
    names: set[str] = set()
    for p in runs_paths:
        run = load_run(p, prefix=prefix)
        name, i = run.name, 1
        while name in names:
            i += 1
            name = f"{run.name}_{i}"
        run.name = name
        names.add(name)
        runs.append(run)
    summaries = [summarize(r, rotation_threshold, warmup) for r in runs]
    figures: dict[str, list[Path]] = {}
    for run in runs:
        label = run.label()
        figures[f"Run {run.name}" + (f" ({label})" if label else "")] = [
            _save(_sharpness_figure(run), out / f"{run.name}_sharpness.png"),
            _save(_spectrum_figure(run, warmup), out / f"{run.name}_spectrum.png"),
            _save(_rotation_figure(run, rotation_threshold), out / f"{run.name}_rotation.png")]
    sweep = _sweep_figure(summaries, rotation_threshold)
    if sweep is not None:
        figures = {"Across runs": [_save(sweep, out / "sweep.png")], **figures}
    md = out / "summary.md"
    md.write_text(_markdown(summaries, figures, out, rotation_threshold, warmup))
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    return {"out": out, "summaries": summaries, "figures": [p for ps in figures.values() for p in ps],
            "markdown": md}
