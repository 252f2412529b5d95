"""The run card: what a run actually used, written by the callbacks at train start, read by the report.

``hparams.yaml`` holds the model's constructor arguments, which are not what trained when
LightningCLI builds the optimizer from a top-level ``optimizer:`` section, when a scheduler changes
the lr, or when an :class:`~lightning_rpe.InstabilityController` scales it. The run card records,
at ``on_train_start`` (after the optimizer exists), from the live objects:

* ``optimizer``: its class, and per param group the kind, lr and threshold as
  :func:`lightning_rpe.stability.group_thresholds` reports them, plus ``betas``, ``momentum``,
  ``dampening``, ``nesterov``, ``eps``, ``weight_decay`` (and ClippedAdam's ``clip`` / ``mode``)
  where the group has them, and the number of parameters;
* ``lr_schedulers``: the scheduler classes (the lr logged at each step is then the scheduled one);
* ``monitor``: the SharpnessMonitor's settings and ``prefix``;
* ``controller``: the InstabilityController's settings (``enabled`` says whether it acts), or
  ``None`` when the Trainer has none (its effective lr over time is in the logged ``<prefix>lr`` /
  ``<prefix>lr/pgN`` tags);
* ``run``: the logger's folder, name and version, the step training (re)started at, the seed;
  ``trainer``: max_steps, max_epochs, accumulate_grad_batches, world_size, log_every_n_steps;
  ``model`` / ``data``: class names; ``versions``.

Written as JSON (``run_card.json``) by global rank zero into every logger's ``log_dir`` (the
folder of a TensorBoardLogger's event files, a CSVLogger's ``metrics.csv``). A resumed run
overwrites it with the state at the restart. Non-finite numbers (an ``inf`` threshold at lr 0)
are written as ``null``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_rpe.stability import group_thresholds

__all__ = ["RUN_CARD_FILE", "RUN_CARD_FORMAT", "build_run_card", "read_run_card", "write_run_card"]

RUN_CARD_FILE = "run_card.json"
RUN_CARD_FORMAT = 1

# per-group optimizer hyperparameters copied when present (ClippedAdam's clip settings included)
_GROUP_KEYS = ("betas", "momentum", "dampening", "nesterov", "eps", "weight_decay", "clip", "mode", "amsgrad")
# monitor attributes outside its MeasureSettings
_MONITOR_KEYS = ("prefix", "every_n_steps", "every_n_epochs", "on_fit_start_measure", "on_fit_end_measure",
                 "probe_size", "probe_batch_size", "reference_step", "use_training_step")
_CONTROLLER_KEYS = ("target_ratio", "band", "band_goal", "max_change", "min_lr", "max_lr", "smoothing",
                    "warmup_steps", "start_step", "stop_step", "after_stop", "param_groups", "initial_factor",
                    "rollback", "enabled")


def _plain(value: Any) -> Any:
    """JSON-safe copy: tensors to numbers, tuples to lists, non-finite floats to None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist() if value.numel() != 1 else value.detach().item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _optimizer_card(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    groups = []
    for g, group in zip(group_thresholds(optimizer), optimizer.param_groups):
        entry: dict[str, Any] = {
            "index": g.index, "kind": g.kind, "lr": g.lr, "threshold": g.threshold,
            "threshold_times_lr": g.threshold * g.lr if g.lr > 0 else None,
            "preconditioned": g.preconditioned, "beta": g.beta,
            "n_params": int(sum(p.numel() for p in group["params"])),
        }
        entry.update({k: group[k] for k in _GROUP_KEYS if k in group})
        groups.append(entry)
    return {"class": _qualname(optimizer), "name": type(optimizer).__name__, "groups": groups}


def _controller(trainer: pl.Trainer) -> Any:
    # imported here: instability_controller imports sharpness_monitor, which imports this module
    from lightning_rpe.callbacks.instability_controller import InstabilityController

    return next((c for c in trainer.callbacks if isinstance(c, InstabilityController)), None)  # type: ignore[attr-defined]


def build_run_card(trainer: pl.Trainer, pl_module: pl.LightningModule, monitor: Any) -> dict[str, Any]:
    """The run card of a starting fit as a JSON-safe dict (see the module docstring for the keys).

    ``monitor`` is the :class:`~lightning_rpe.SharpnessMonitor` writing it (its ``settings`` and the
    attributes in ``_MONITOR_KEYS`` are recorded). Call after the optimizers exist
    (``on_train_start``).
    """
    optimizers = list(trainer.optimizers)
    settings = getattr(monitor, "settings", None)
    monitor_card: dict[str, Any] = {"class": _qualname(monitor)}
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        monitor_card.update({k: v for k, v in dataclasses.asdict(settings).items() if k != "owner"})
    monitor_card.update({k: getattr(monitor, k) for k in _MONITOR_KEYS if hasattr(monitor, k)})
    probe = getattr(monitor, "probe", None)
    monitor_card["probe"] = probe if isinstance(probe, str) or probe is None else "loader"
    controller = _controller(trainer)
    controller_card = None
    if controller is not None:
        controller_card = {"class": _qualname(controller)}
        controller_card.update({k: getattr(controller, k) for k in _CONTROLLER_KEYS if hasattr(controller, k)})
    logger = trainer.logger
    datamodule = getattr(trainer, "datamodule", None)
    card = {
        "format": RUN_CARD_FORMAT,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {
            "log_dir": None if logger is None else getattr(logger, "log_dir", None),
            "logger_name": None if logger is None else getattr(logger, "name", None),
            "version": None if logger is None else getattr(logger, "version", None),
            "start_step": int(trainer.global_step),
            "seed": os.environ.get("PL_GLOBAL_SEED"),
        },
        "prefix": getattr(monitor, "prefix", None),
        "optimizer": _optimizer_card(optimizers[0]) if optimizers else None,
        "n_optimizers": len(optimizers),
        "lr_schedulers": [type(cfg.scheduler).__name__ for cfg in trainer.lr_scheduler_configs],
        "monitor": monitor_card,
        "controller": controller_card,
        "trainer": {
            "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
            "accumulate_grad_batches": trainer.accumulate_grad_batches, "world_size": trainer.world_size,
            "log_every_n_steps": getattr(trainer, "log_every_n_steps", None),
        },
        "model": {"class": _qualname(pl_module), "n_params": int(sum(p.numel() for p in pl_module.parameters()))},
        "data": None if datamodule is None else {"class": _qualname(datamodule),
                                                 "batch_size": getattr(datamodule, "batch_size", None)},
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__},
    }
    return _plain(card)  # type: ignore[no-any-return]


def write_run_card(trainer: pl.Trainer, pl_module: pl.LightningModule, monitor: Any) -> list[Path]:
    """Write ``run_card.json`` into the ``log_dir`` of every logger that has one (global rank zero only).

    Returns the files written (empty on other ranks or without a logger with a ``log_dir``). An
    unwritable folder is skipped with a warning: the card must never stop training.
    """
    if not trainer.is_global_zero:
        return []
    dirs: list[Path] = []
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and Path(log_dir) not in dirs:
            dirs.append(Path(log_dir))
    if not dirs:
        return []
    text = json.dumps(build_run_card(trainer, pl_module, monitor), indent=2)
    written = []
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / RUN_CARD_FILE).write_text(text + "\n")
            written.append(d / RUN_CARD_FILE)
        except OSError as err:
            rank_zero_warn(f"SharpnessMonitor: could not write the run card into {d}: {err}")
    return written


def read_run_card(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run card in ``run_dir`` (or its parent), or ``None`` when absent or unreadable."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / RUN_CARD_FILE, run_dir.parent / RUN_CARD_FILE):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None
