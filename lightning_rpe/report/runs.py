"""Reading runs back: the scalars of a run's event files, its run card and its ``hparams.yaml``.

One run = one directory holding ``events.out.tfevents.*`` files. All files of a directory are
merged; when a step of a tag was written twice (a resumed run) the value written last wins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml  # type: ignore[import-untyped]
from tensorboard.backend.event_processing.event_file_loader import (  # type: ignore[import-untyped]
    LegacyEventFileLoader,
)
from tensorboard.util import tensor_util  # type: ignore[import-untyped]

from lightning_rpe.callbacks.run_card import read_run_card
from lightning_rpe.names import DEFAULT_PREFIX, MetricNames

__all__ = ["ReportError", "RunData", "Series", "find_runs", "load_run"]


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
        with label ``""`` for the ungrouped tag and ``"pgN"`` for group N.
        """
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
        lrs = ", ".join(f"{g['lr']:g}" for g in opt["groups"])
        parts = [f"{opt.get('name', '?')} lr={lrs}" + (" (per group)" if len(opt["groups"]) > 1 else "")]
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
    scalar tensors).
    """
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
