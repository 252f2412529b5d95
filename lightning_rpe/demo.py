"""The embedded edge-of-stability demo behind ``lightning-rpe demo``.

Full-batch gradient descent on a 64-200-200-10 tanh MLP with MSE on one-hot targets, trained on
1000 samples of scikit-learn's bundled digits data (no network). With ``lr = 0.05`` the sharpness
rises from about 4 to the stability threshold ``2 / lr = 40`` within ~1500 steps (progressive
sharpening) and then hovers around it (edge of stability) while the loss keeps falling
non-monotonically. The :class:`~lightning_rpe.SharpnessMonitor` measures every ``every`` steps;
logs go to TensorBoard in the run folder, followed by the figures and summary of
:mod:`lightning_rpe.report`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from lightning_rpe.callbacks import SharpnessMonitor
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.models import MLPClassifier
from lightning_rpe.report import load_run, write_report
from lightning_rpe.validation import check_float, check_int

__all__ = ["DemoResult", "StepProgressBar", "default_run_dir", "format_summary", "run_demo"]


def default_run_dir() -> Path:
    """``runs/demo-YYYYmmdd-HHMMSS`` under the current directory."""
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")


@dataclass
class DemoResult:
    """What the demo measured (numbers read back from its TensorBoard event files)."""

    run_dir: Path
    report_dir: Path | None
    steps: int
    lr: float
    threshold: float | None
    trajectory: list[tuple[int, float]]  # (step, sharpness) of every measurement
    final_sharpness: float | None
    final_ratio: float | None
    max_ratio_after_crossing: float | None
    min_ratio_after_crossing: float | None
    first_crossing_step: int | None  # first measurement with ratio >= 0.95
    measurements: int
    hvps: int
    measure_seconds: float
    test_acc: float | None
    final_train_loss: float | None
    seconds: float


class StepProgressBar(ProgressBar):
    """A progress bar over optimizer steps, with the loss and the monitor's latest sharpness and
    stability ratio.

    Lightning's own bars restart every epoch; with full batches an epoch is one step, so they show
    nothing useful. Use this one instead (from YAML: ``trainer.callbacks: [{class_path:
    lightning_rpe.demo.StepProgressBar}]``). The total is ``trainer.max_steps`` (or ``total``);
    validation and test loops get no bar. When ``stream`` is not a terminal (output redirected to a
    log file), no carriage-return bar is drawn: one plain line is written every 10% of the steps.

    Args:
        total: number of steps the bar counts to (default: ``trainer.max_steps``; unknown = no total).
        stream: where the bar is drawn (default ``sys.stderr``).
        description: text in front of the bar.
    """

    def __init__(self, total: int | None = None, stream: TextIO | None = None,
                 description: str = "training") -> None:
        super().__init__()
        self.total, self.stream, self.description = total, stream, description
        self.bar: Any = None
        self._enabled = True
        self._lines: _LineProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _monitor(self, trainer: pl.Trainer) -> Any:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        return next((c for c in callbacks if isinstance(c, SharpnessMonitor)), None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The monitor's measurement of the initial parameters runs before any bar exists (it is
        # the slowest one: no warm start); say what the wait is for.
        monitor = self._monitor(trainer)
        if (not self._enabled or not trainer.is_global_zero or monitor is None or trainer.global_step != 0
                or not getattr(monitor, "on_fit_start_measure", False)):
            return
        stream = self.stream if self.stream is not None else sys.stderr
        what = f"top-{monitor.top_k} eigenvalues" + (" and lambda_min" if monitor.lambda_min else "")
        stream.write(f"{self.description}: measuring the Hessian of the initial parameters ({what}) before the "
                     "first step; the first measurement has no warm start and takes longest\n")
        stream.flush()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        total = self.total if self.total is not None else (trainer.max_steps if trainer.max_steps > 0 else None)
        stream = self.stream if self.stream is not None else sys.stderr
        if not _is_terminal(stream):
            self._lines = _LineProgress(stream, self.description, total, trainer.global_step)
            return
        self.bar = tqdm(total=total, initial=trainer.global_step, desc=self.description, unit="step",
                        file=stream, dynamic_ncols=True, mininterval=0.5)

    def _postfix(self, trainer: pl.Trainer) -> dict[str, str]:
        post = {}
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            post["loss"] = f"{float(loss):.4f}"
        monitor = self._monitor(trainer)
        m = getattr(monitor, "latest", None)
        if m is not None:
            post["sharpness"] = f"{m.sharpness:.2f}"
            if m.stability_ratio is not None:
                post["ratio"] = f"{m.stability_ratio:.3f}"
            if m.step != trainer.global_step:  # this callback may run before the monitor's measurement of this step
                post["measured at step"] = str(m.step)
        return post

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._lines is not None:
            self._lines.update(trainer.global_step, self._postfix(trainer))
            return
        if self.bar is None:
            return
        self.bar.update(trainer.global_step - self.bar.n)
        self.bar.set_postfix(self._postfix(trainer), refresh=False)
        if self.bar.total is not None and self.bar.n >= self.bar.total:
            # Close now, before Lightning prints its "stopped: max_steps reached" notice.
            self.bar.refresh()
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lines = None
        if self.bar is not None:
            self.bar.update(trainer.global_step - self.bar.n)
            self.bar.close()
            self.bar = None


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed stream
        return False


class _LineProgress:
    """Progress for streams that are not terminals: one line per 10% of ``total`` (or every 100
    steps without a total), no carriage returns.
    """

    def __init__(self, stream: TextIO, description: str, total: int | None, start: int) -> None:
        self.stream, self.description, self.total = stream, description, total
        self.every = max(1, total // 10) if total else 100
        self.next = (start // self.every + 1) * self.every
        self.t0 = time.perf_counter()

    def update(self, step: int, post: dict[str, str]) -> None:
        if step < self.next and step != self.total:
            return
        self.next = (step // self.every + 1) * self.every
        of = f"/{self.total}" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in post.items())
        self.stream.write(f"{self.description}: step {step}{of} ({time.perf_counter() - self.t0:.0f} s{extra})\n")
        self.stream.flush()


def run_demo(
    steps: int = 2500,
    lr: float = 0.05,
    out: str | Path | None = None,
    seed: int = 0,
    every: int = 25,
    top_k: int = 3,
    n_train: int = 1000,
    hidden: tuple[int, ...] = (200, 200),
    report: bool = True,
    progress: bool = True,
    stream: TextIO | None = None,
) -> DemoResult:
    """Train the demo network with the monitor on; return what was measured.

    Args:
        steps: optimizer steps (full batch: one step = one epoch).
        lr: learning rate of plain gradient descent; the stability threshold is ``2 / lr``.
        out: run folder for the TensorBoard files and the report (default
            :func:`default_run_dir`).
        seed: seed of the data split and of the weight initialisation.
        every: measure the Hessian every ``every`` steps (plus at the start and the end).
        top_k: number of leading eigenvalues/eigenvectors tracked.
        n_train: training samples (the other ``1797 - n_train`` are the test set).
        hidden: hidden layer widths of the tanh MLP.
        report: write figures and ``summary.md`` into ``<out>/report``.
        progress: show a progress bar on ``stream``.
        stream: where the progress bar goes (default ``sys.stderr``).
    """
    for name, value in (("steps", steps), ("every", every), ("top_k", top_k)):
        check_int("run_demo", name, value, minimum=1)
    check_float("run_demo", "lr", lr, minimum=0.0, inclusive=False)
    run_dir = Path(out) if out is not None else default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(run_dir.glob("events.out.tfevents.*")):
        raise FileExistsError(f"{run_dir} already holds a run; choose another --out folder or remove it")
    stream = stream if stream is not None else sys.stderr

    if progress:
        # Lightning's start/stop notices would break the progress bar's line.
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(n_train=n_train, seed=seed)
    model = MLPClassifier(hidden=hidden, activation="tanh", loss="mse", optimizer="sgd", lr=lr)
    monitor = SharpnessMonitor(every_n_steps=every, top_k=top_k, lambda_min=True)
    callbacks: list[Callback] = [monitor]
    if progress:
        callbacks.append(StepProgressBar(total=steps, stream=stream, description="full-batch GD"))
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=min(every, 10),
        check_val_every_n_epoch=max(1, steps // 10),
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    logger.experiment.flush()
    seconds = time.perf_counter() - t0

    run = load_run(run_dir)
    sharp = run.metric("sharpness")
    ratio = run.metric("stability_ratio")
    thr = run.metric("threshold")
    hvps = run.metric("hvps")
    msec = run.metric("measure_seconds")
    acc = run.get("test_acc")
    loss = run.get("train_loss")
    trajectory = [(int(s), float(v)) for s, v in zip(sharp.steps, sharp.values)] if sharp is not None else []
    crossing = max_after = min_after = None
    if ratio is not None:
        above = [i for i, r in enumerate(ratio.values) if r >= 0.95]
        if above:
            crossing = int(ratio.steps[above[0]])
            after = ratio.values[above[0]:]
            max_after, min_after = float(after.max()), float(after.min())
    report_dir = None
    if report:
        report_dir = write_report([run_dir], out=run_dir / "report")["out"]
    return DemoResult(
        run_dir=run_dir,
        report_dir=report_dir,
        steps=int(trainer.global_step),
        lr=float(lr),
        threshold=thr.last if thr is not None else None,
        trajectory=trajectory,
        final_sharpness=sharp.last if sharp is not None else None,
        final_ratio=ratio.last if ratio is not None else None,
        max_ratio_after_crossing=max_after,
        min_ratio_after_crossing=min_after,
        first_crossing_step=crossing,
        measurements=len(sharp) if sharp is not None else 0,
        hvps=int(hvps.values.sum()) if hvps is not None else 0,
        measure_seconds=float(msec.values.sum()) if msec is not None else 0.0,
        test_acc=acc.last if acc is not None else None,
        final_train_loss=loss.last if loss is not None else None,
        seconds=seconds,
    )


def format_summary(res: DemoResult, points: int = 11) -> str:
    """The closing summary printed by ``lightning-rpe demo``."""
    lines = []
    lines.append(f"Finished {res.steps} steps of full-batch gradient descent (lr = {res.lr:g}) in {res.seconds:.1f} s; "
                 f"{res.measurements} Hessian measurements took {res.measure_seconds:.1f} s "
                 f"and {res.hvps} Hessian-vector products.")
    if res.trajectory:
        n = len(res.trajectory)
        idx = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)}) if n > 1 else [0]
        pts = [res.trajectory[i] for i in idx]
        w = max(max(len(str(s)) for s, _ in pts), max(len(f"{v:.1f}") for _, v in pts))
        lines.append("  step      " + " ".join(f"{s:>{w}}" for s, _ in pts))
        lines.append("  sharpness " + " ".join(f"{v:>{w}.1f}" for _, v in pts))
    if res.final_sharpness is not None and res.threshold is not None:
        lines.append(f"Final sharpness {res.final_sharpness:.2f} against the threshold 2/lr = {res.threshold:.2f}: "
                     f"stability ratio {res.final_ratio:.3f}.")
    if res.first_crossing_step is not None:
        lines.append(f"Progressive sharpening reached the edge of stability (ratio >= 0.95) at step "
                     f"{res.first_crossing_step}; afterwards the ratio stayed in "
                     f"[{res.min_ratio_after_crossing:.3f}, {res.max_ratio_after_crossing:.3f}].")
    elif res.trajectory:
        lines.append("The sharpness did not reach the threshold in this run (try more --steps or a larger --lr).")
    if res.test_acc is not None:
        lines.append(f"Test accuracy {res.test_acc:.3f}; final training loss {res.final_train_loss:.4f}.")
    lines.append(f"Run folder: {res.run_dir}")
    lines.append(f"  TensorBoard: tensorboard --logdir {res.run_dir}")
    if res.report_dir is not None:
        lines.append(f"  Report:      {res.report_dir / 'summary.md'}")
    return "\n".join(lines)
