"""Read TensorBoard event files written by the monitor and draw the figures a researcher wants.

``lightning-rpe report RUN_DIR [RUN_DIR ...]`` (or :func:`write_report`) finds every directory
under the given paths that holds TensorBoard event files (one such directory = one run), reads
all scalars, and writes to the output folder:

* ``<run>_sharpness.png``: sharpness (``rpe/sharpness``) against the stability threshold
  (``rpe/threshold``), the training loss on a twin axis, and the stability ratio below;
* ``<run>_spectrum.png``: the top-k eigenvalues (``rpe/eig_1`` ... ``rpe/eig_k``) and the most
  negative eigenvalue ``rpe/lambda_min`` with its envelope;
* ``<run>_rotation.png``: rotation of the leading eigenvector between consecutive measurements
  (``1 - |cos|`` and the angle in degrees), the top-k subspace similarity, and the polarity with
  its sign flips;
* ``sweep.png`` (two runs or more): final sharpness and test accuracy against the learning rate,
  each run marked by whether its top-k subspace rotated (similarity between the first and the
  final top-k subspace below ``rotation_threshold``, default 0.7);
* ``summary.md`` (a table of the numbers below, with the figures) and ``summary.json`` (the same
  numbers, machine-readable).

Numbers in the summary are read from the event files, never recomputed: "final" is the value at
the largest step of a tag, counts are numbers of logged points, totals are sums of logged values.
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

import numpy as np

__all__ = ["ReportError", "Series", "RunData", "RunSummary", "find_runs", "load_run", "summarize",
           "write_report", "SUBSPACE_TO_FIRST_TAGS"]

# Tags the monitor may use for the similarity between the first and the current top-k subspace.
SUBSPACE_TO_FIRST_TAGS = ("rpe/subspace_similarity_to_first", "rpe/subspace_similarity_first",
                          "rpe/subspace_similarity_initial")
_LOSS_TAGS = ("train_loss", "train_loss_step", "loss")
_TEST_ACC_TAGS = ("test_acc", "val_acc", "val_acc_epoch", "test_acc_epoch")
_LR_TAG_PATTERNS = (r"^rpe/lr(/.*)?$", r"^lr-.*")


class ReportError(Exception):
    """Raised for unusable input (no event files, unreadable paths); the CLI prints its message."""


@dataclass(frozen=True)
class Series:
    """One scalar tag: ``steps`` (int array) and ``values`` (float array), sorted by step."""

    steps: np.ndarray
    values: np.ndarray

    @property
    def last(self) -> float:
        return float(self.values[-1])

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class RunData:
    """All scalars of one run directory plus the hyperparameters found next to it."""

    path: Path
    name: str
    scalars: dict[str, Series]
    hparams: dict[str, Any] = field(default_factory=dict)

    def get(self, *tags: str) -> Series | None:
        """The first of ``tags`` that was logged, else ``None``."""
        for tag in tags:
            if tag in self.scalars and len(self.scalars[tag]):
                return self.scalars[tag]
        return None

    def eig_tags(self) -> list[str]:
        tags = [t for t in self.scalars if re.fullmatch(r"rpe/eig_\d+", t)]
        return sorted(tags, key=lambda t: int(t.rsplit("_", 1)[1]))


@dataclass
class RunSummary:
    """The numbers reported for one run (``None`` where the tag was not logged)."""

    name: str
    path: str
    lr: float | None
    lr_source: str | None
    measurements: int
    final_step: int | None
    final_sharpness: float | None
    max_sharpness: float | None
    final_threshold: float | None
    final_ratio: float | None
    max_ratio: float | None
    min_lambda_min: float | None
    final_train_loss: float | None
    test_acc: float | None
    test_acc_tag: str | None
    final_subspace_similarity_to_first: float | None
    rotated: bool | None
    mean_rotation_angle: float | None
    polarity_flips: float | None
    total_hvps: float | None
    total_measure_seconds: float | None


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


def _hparams_loader() -> Any:
    """A safe YAML loader that also reads the ``!!python/tuple`` tags Lightning writes for tuples."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))
    return Loader


def _read_hparams(run_dir: Path) -> dict[str, Any]:
    for candidate in (run_dir / "hparams.yaml", run_dir.parent / "hparams.yaml"):
        if candidate.is_file():
            try:
                import yaml

                data = yaml.load(candidate.read_text(), Loader=_hparams_loader())  # noqa: S506 - safe loader
            except Exception:  # a broken hparams file must not stop the report
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def load_run(run_dir: str | os.PathLike[str], name: str | None = None) -> RunData:
    """Read every scalar of the event files in ``run_dir`` (all files of the directory merged).

    When a step was written more than once (a resumed run), the last value written wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    try:
        acc.Reload()
    except Exception as err:  # corrupted or unreadable file
        raise ReportError(f"cannot read the event files in {run_dir}: {err}") from err
    scalars: dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        by_step: dict[int, float] = {}
        for ev in acc.Scalars(tag):
            by_step[int(ev.step)] = float(ev.value)
        steps = np.array(sorted(by_step), dtype=np.int64)
        scalars[tag] = Series(steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return RunData(path=run_dir, name=name or _run_name(run_dir), scalars=scalars, hparams=_read_hparams(run_dir))


def _run_name(run_dir: Path) -> str:
    parts = [p for p in run_dir.resolve().parts[-2:] if p]
    if parts and not re.fullmatch(r"(version_\d+|\d+)", parts[-1]):
        parts = parts[-1:]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts)) or "run"


# -- summary -------------------------------------------------------------------------------------
def _run_lr(run: RunData) -> tuple[float | None, str | None]:
    model_hp = run.hparams
    for key in ("lr", "learning_rate"):
        if isinstance(model_hp.get(key), (int, float)):
            return float(model_hp[key]), f"hparams.yaml:{key}"
    opt = model_hp.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("init_args", {}).get("lr"), (int, float)):
        return float(opt["init_args"]["lr"]), "hparams.yaml:optimizer.init_args.lr"
    for pattern in _LR_TAG_PATTERNS:
        for tag in sorted(run.scalars):
            if re.match(pattern, tag) and len(run.scalars[tag]):
                return float(run.scalars[tag].values[0]), tag
    return None, None


def _opt(series: Series | None, fn: Any = None) -> float | None:
    if series is None or not len(series):
        return None
    return float(fn(series.values)) if fn is not None else series.last


def summarize(run: RunData, rotation_threshold: float = 0.7) -> RunSummary:
    """The numbers of one run, read from its scalars (see the module docstring)."""
    sharp = run.get("rpe/sharpness")
    ratio = run.get("rpe/stability_ratio")
    lam_min = run.get("rpe/lambda_min")
    sim_first = run.get(*SUBSPACE_TO_FIRST_TAGS)
    acc_tag = next((t for t in _TEST_ACC_TAGS if run.get(t) is not None), None)
    lr, lr_source = _run_lr(run)
    final_sim = _opt(sim_first)
    return RunSummary(
        name=run.name,
        path=str(run.path),
        lr=lr,
        lr_source=lr_source,
        measurements=len(sharp) if sharp is not None else 0,
        final_step=int(sharp.steps[-1]) if sharp is not None else None,
        final_sharpness=_opt(sharp),
        max_sharpness=_opt(sharp, np.max),
        final_threshold=_opt(run.get("rpe/threshold")),
        final_ratio=_opt(ratio),
        max_ratio=_opt(ratio, np.max),
        min_lambda_min=_opt(lam_min, np.min),
        final_train_loss=_opt(run.get(*_LOSS_TAGS)),
        test_acc=_opt(run.get(acc_tag)) if acc_tag else None,
        test_acc_tag=acc_tag,
        final_subspace_similarity_to_first=final_sim,
        rotated=None if final_sim is None else bool(final_sim < rotation_threshold),
        mean_rotation_angle=_opt(run.get("rpe/rotation_angle"), np.mean),
        polarity_flips=_opt(run.get("rpe/polarity_flips")),
        total_hvps=_opt(run.get("rpe/hvps"), np.sum),
        total_measure_seconds=_opt(run.get("rpe/measure_seconds"), np.sum),
    )


# -- figures ---------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def _missing(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}\nnot logged in this run", ha="center", va="center", transform=ax.transAxes,
            color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_sharpness(run: RunData, out: Path, plt: Any) -> Path:
    fig, (ax, ax_r) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    sharp, thr = run.get("rpe/sharpness"), run.get("rpe/threshold")
    loss = run.get(*_LOSS_TAGS)
    handles = []
    if sharp is None:
        _missing(ax, "rpe/sharpness")
    else:
        handles += ax.plot(sharp.steps, sharp.values, "o-", ms=3, color="C0", label=r"sharpness $\lambda_{max}$")
        if thr is not None:
            handles += ax.plot(thr.steps, thr.values, "--", color="C3", lw=1.6, label="stability threshold (2/lr for GD)")
        pre = run.get("rpe/preconditioned_sharpness")
        if pre is not None:
            handles += ax.plot(pre.steps, pre.values, "s-", ms=2.5, color="C4",
                               label=r"preconditioned sharpness $\lambda_{max}(P^{-1/2}HP^{-1/2})$")
        ax.set_ylabel(r"Hessian eigenvalue (loss / parameter$^2$)")
        ax.set_ylim(bottom=0)
        if loss is not None:
            ax2 = ax.twinx()
            handles += ax2.plot(loss.steps, loss.values, color="0.45", lw=1, alpha=0.8, label="training loss")
            if np.all(loss.values > 0):
                ax2.set_yscale("log")
            ax2.set_ylabel("training loss")
        ax.legend(handles=handles, loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_title(f"{run.name}: sharpness against the stability threshold")
    ax.grid(alpha=0.3)
    ratio = run.get("rpe/stability_ratio")
    if ratio is None:
        _missing(ax_r, "rpe/stability_ratio")
    else:
        ax_r.plot(ratio.steps, ratio.values, "o-", ms=3, color="C0", label="sharpness / threshold")
        ax_r.axhline(1.0, color="C3", ls="--", lw=1.2, label="ratio = 1 (edge of stability)")
        ax_r.set_ylabel("stability ratio")
        ax_r.legend(loc="lower right", fontsize=8)
        ax_r.grid(alpha=0.3)
    ax_r.set_xlabel("optimizer step")
    fig.tight_layout()
    path = out / f"{run.name}_sharpness.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_spectrum(run: RunData, out: Path, plt: Any) -> Path:
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    eig_tags = run.eig_tags()
    if not eig_tags and run.get("rpe/sharpness") is not None:
        eig_tags = ["rpe/sharpness"]
    if not eig_tags:
        _missing(ax, "rpe/eig_1 ... rpe/eig_k")
    else:
        cmap = plt.get_cmap("viridis")
        for i, tag in enumerate(eig_tags):
            s = run.scalars[tag]
            label = rf"$\lambda_{{{i + 1}}}$" if tag != "rpe/sharpness" else r"$\lambda_{max}$"
            ax.plot(s.steps, s.values, "o-", ms=2.5, lw=1.2, color=cmap(i / max(1, len(eig_tags) - 1) * 0.85),
                    label=label)
        thr = run.get("rpe/threshold")
        if thr is not None:
            ax.plot(thr.steps, thr.values, "--", color="C3", lw=1.2, label="stability threshold")
        ax.set_ylabel(r"eigenvalue (loss / parameter$^2$)")
        ax.legend(loc="upper left", fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
    ax.set_title(f"{run.name}: top-{max(1, len(eig_tags))} Hessian spectrum and the most negative eigenvalue")
    lam = run.get("rpe/lambda_min")
    if lam is None:
        _missing(ax_n, "rpe/lambda_min")
    else:
        ax_n.fill_between(lam.steps, lam.values, 0, color="C1", alpha=0.3, label=r"envelope $[\lambda_{min}, 0]$")
        ax_n.plot(lam.steps, lam.values, "o-", ms=2.5, color="C1", label=r"$\lambda_{min}$ (most negative)")
        ax_n.axhline(0, color="0.3", lw=0.8)
        ax_n.set_ylabel(r"$\lambda_{min}$ (loss / parameter$^2$)")
        ax_n.legend(loc="lower left", fontsize=8)
        ax_n.grid(alpha=0.3)
    ax_n.set_xlabel("optimizer step")
    fig.tight_layout()
    path = out / f"{run.name}_spectrum.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_rotation(run: RunData, out: Path, plt: Any) -> Path:
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    ax, ax_s, ax_p = axes
    cos, angle = run.get("rpe/rotation_cos"), run.get("rpe/rotation_angle")
    if cos is None and angle is None:
        _missing(ax, "rpe/rotation_cos and rpe/rotation_angle")
    else:
        handles = []
        if cos is not None:
            one_minus = np.clip(1.0 - np.abs(cos.values), 1e-12, None)
            handles += ax.semilogy(cos.steps, one_minus, "o-", ms=2.5, color="C0",
                                   label=r"$1 - |\cos(v_t, v_{t-1})|$ (left)")
            ax.set_ylabel(r"$1 - |\cos|$ (log scale)")
        if angle is not None:
            ax2 = ax.twinx() if cos is not None else ax
            handles += ax2.plot(angle.steps, angle.values, "s-", ms=2, lw=0.8, color="C1", alpha=0.8,
                                label="rotation angle (right, degrees)")
            ax2.set_ylabel("angle (degrees)")
        ax.legend(handles=handles, loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    ax.set_title(f"{run.name}: rotation of the leading eigenvectors between measurements")
    sim, sim_first = run.get("rpe/subspace_similarity"), run.get(*SUBSPACE_TO_FIRST_TAGS)
    if sim is None and sim_first is None:
        _missing(ax_s, "rpe/subspace_similarity")
    else:
        if sim is not None:
            ax_s.plot(sim.steps, sim.values, "o-", ms=2.5, color="C2", label="top-k subspace: consecutive")
        if sim_first is not None:
            ax_s.plot(sim_first.steps, sim_first.values, "^-", ms=2.5, color="C4", label="top-k subspace: to first")
            ax_s.axhline(0.7, color="0.4", ls=":", lw=1, label="0.7 (rotated below)")
        ax_s.set_ylim(-0.02, 1.02)
        ax_s.set_ylabel("subspace similarity\n(1 = same, 0 = orthogonal)")
        ax_s.legend(loc="lower left", fontsize=8)
        ax_s.grid(alpha=0.3)
    pol, flips = run.get("rpe/polarity"), run.get("rpe/polarity_flips")
    if pol is None:
        _missing(ax_p, "rpe/polarity")
    else:
        ax_p.plot(pol.steps, pol.values, "o-", ms=2.5, lw=1, color="C5", label="polarity (signed)")
        ax_p.axhline(0, color="0.3", lw=0.8)
        sign = np.sign(pol.values)
        flip_idx = np.nonzero((sign[1:] * sign[:-1]) < 0)[0] + 1
        if len(flip_idx):
            ax_p.plot(pol.steps[flip_idx], pol.values[flip_idx], "x", color="C3", ms=6,
                      label=f"sign flip ({len(flip_idx)})")
        ax_p.set_ylabel("polarity (signed angle, degrees)")
        handles, labels = ax_p.get_legend_handles_labels()
        if flips is not None:
            ax_f = ax_p.twinx()
            handles += ax_f.step(flips.steps, flips.values, where="post", color="0.5", lw=1,
                                 label="cumulative flips (right)")
            ax_f.set_ylabel("flips (count)")
        ax_p.legend(handles=handles, loc="upper left", fontsize=8)
        ax_p.grid(alpha=0.3)
    ax_p.set_xlabel("optimizer step")
    fig.tight_layout()
    path = out / f"{run.name}_rotation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sweep(summaries: Sequence[RunSummary], out: Path, plt: Any, rotation_threshold: float) -> Path | None:
    pts = [s for s in summaries if s.lr is not None]
    if len(pts) < 2:
        return None
    fig, (ax, ax_a) = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {True: dict(marker="o", color="C3", label=f"top-k subspace rotated (similarity < {rotation_threshold})"),
              False: dict(marker="o", mfc="none", color="C0", label=f"not rotated (similarity >= {rotation_threshold})"),
              None: dict(marker="x", color="0.4", label="rotation not logged")}
    for axis, key, ylabel in ((ax, "final_sharpness", r"final sharpness $\lambda_{max}$ (loss / parameter$^2$)"),
                              (ax_a, "test_acc", "test accuracy")):
        seen = set()
        for s in pts:
            y = getattr(s, key)
            if y is None:
                continue
            st = dict(styles[s.rotated])
            label = st.pop("label")
            label = label if s.rotated not in seen else None
            seen.add(s.rotated)
            axis.plot([s.lr], [y], ls="none", ms=8, label=label, **st)
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(_ticker().LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(_ticker().FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(_ticker().NullFormatter())
        axis.set_xlabel("learning rate")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3, which="both")
    lrs = np.array(sorted({s.lr for s in pts}))
    grid = np.geomspace(lrs.min() / 1.2, lrs.max() * 1.2, 50)
    ax.plot(grid, 2 / grid, "--", color="C3", lw=1, label="2 / lr (GD threshold)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(_ticker().LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(_ticker().FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(_ticker().NullFormatter())
    ax.set_title("flatness against the learning rate")
    ax_a.set_title("generalisation against the learning rate")
    ax.legend(fontsize=8, loc="best")
    if ax_a.get_legend_handles_labels()[0]:
        ax_a.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def _markdown(summaries: Sequence[RunSummary], figures: dict[str, list[Path]], out: Path,
              rotation_threshold: float) -> str:
    lines = ["# lightning-rpe report", ""]
    lines.append("Numbers are read from the TensorBoard event files: *final* = value at the last logged step, "
                 "*max*/*min* over all measurements, HVPs and measurement seconds summed over measurements. "
                 f"*rotated* = similarity between the first and the final top-k subspace below {rotation_threshold}.")
    lines.append("")
    cols = [("run", "name"), ("lr", "lr"), ("measurements", "measurements"), ("last step", "final_step"),
            ("final sharpness", "final_sharpness"), ("max sharpness", "max_sharpness"),
            ("threshold", "final_threshold"), ("final ratio", "final_ratio"), ("max ratio", "max_ratio"),
            ("min lambda_min", "min_lambda_min"), ("final train loss", "final_train_loss"),
            ("test acc", "test_acc"), ("subspace sim. to first", "final_subspace_similarity_to_first"),
            ("rotated", "rotated"), ("polarity flips", "polarity_flips"), ("HVPs", "total_hvps"),
            ("measure s", "total_measure_seconds")]
    lines.append("| " + " | ".join(c for c, _ in cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for s in summaries:
        lines.append("| " + " | ".join(_fmt(getattr(s, k)) for _, k in cols) + " |")
    lines.append("")
    notes = []
    if any(s.test_acc_tag and s.test_acc_tag.startswith("val") for s in summaries):
        notes.append("test acc: where no `test_acc` was logged, the last `val_acc` is shown.")
    if any(s.rotated is None for s in summaries):
        notes.append("rotated: `-` means the run logged no similarity to the first subspace "
                     f"({', '.join('`' + t + '`' for t in SUBSPACE_TO_FIRST_TAGS[:1])}).")
    if any(s.lr_source and s.lr_source.startswith(("lr-", "rpe/lr")) for s in summaries):
        notes.append("lr: taken from the first logged learning-rate value where no hparams.yaml gave it.")
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    for title, paths in figures.items():
        lines.append(f"## {title}")
        lines.append("")
        for p in paths:
            lines.append(f"![{p.stem}]({os.path.relpath(p, out)})")
            lines.append("")
    return "\n".join(lines)


def write_report(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None,
                 rotation_threshold: float = 0.7) -> dict[str, Any]:
    """Write figures, ``summary.md`` and ``summary.json`` for the runs under ``run_dirs``.

    Args:
        run_dirs: run folders (searched recursively for event files) or event files.
        out: output folder; default ``<run>/report`` for one path, else ``report`` under the
            paths' common parent.
        rotation_threshold: a run counts as rotated when the similarity between its first and final
            top-k subspace is below this value.

    Returns:
        ``{"out": Path, "summaries": [RunSummary, ...], "figures": [Path, ...], "markdown": Path}``.
    """
    if not run_dirs:
        raise ReportError("give at least one run directory")
    if not 0 < rotation_threshold <= 1:
        raise ValueError(f"rotation_threshold must be in (0, 1], got {rotation_threshold!r}")
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
        run = load_run(p)
        name, i = run.name, 1
        while name in names:
            i += 1
            name = f"{run.name}_{i}"
        run.name = name
        names.add(name)
        runs.append(run)
    plt = _plt()
    summaries = [summarize(r, rotation_threshold) for r in runs]
    figures: dict[str, list[Path]] = {}
    for run in runs:
        figures[f"Run {run.name}"] = [_plot_sharpness(run, out, plt), _plot_spectrum(run, out, plt),
                                      _plot_rotation(run, out, plt)]
    sweep = _plot_sweep(summaries, out, plt, rotation_threshold)
    if sweep is not None:
        figures = {"Across runs": [sweep], **figures}
    md = out / "summary.md"
    md.write_text(_markdown(summaries, figures, out, rotation_threshold))
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    return {"out": out, "summaries": summaries, "figures": [p for ps in figures.values() for p in ps],
            "markdown": md}
