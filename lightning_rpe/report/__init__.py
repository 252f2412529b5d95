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
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning_rpe.report.figures import (
    figure_labels,
    rotation_figure,
    save_figure,
    sharpness_figure,
    spectrum_figure,
    sweep_figure,
)
from lightning_rpe.report.runs import ReportError, RunData, Series, find_runs, load_run
from lightning_rpe.report.summary import (
    DEFAULT_WARMUP,
    RunSummary,
    summarize,
    threshold_label,
)

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
                 "residual ||Hv - λv||, an absolute bound on the distance of the value to an eigenvalue; for λ_min "
                 "to *an* eigenvalue: the reported λ_min never lies below the most negative one (it can only err "
                 "toward 0, and by more than its residual in a dense cluster near 0; docs/metrics.md).")
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
            save_figure(sharpness_figure(run), out / f"{run.name}_sharpness.png"),
            save_figure(spectrum_figure(run, warmup), out / f"{run.name}_spectrum.png"),
            save_figure(rotation_figure(run, rotation_threshold), out / f"{run.name}_rotation.png")]
    sweep = sweep_figure(summaries, rotation_threshold)
    if sweep is not None:
        figures = {"Across runs": [save_figure(sweep, out / "sweep.png")], **figures}
    md = out / "summary.md"
    md.write_text(_markdown(summaries, figures, out, rotation_threshold, warmup))
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    return {"out": out, "summaries": summaries, "figures": [p for ps in figures.values() for p in ps],
            "markdown": md}
