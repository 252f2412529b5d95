"""Cost of SharpnessMonitor during training (issue 3, "Cost").

Run::

    python benchmarks/bench_monitor.py           # 200 GD steps, 3 runs with and 3 without
    python benchmarks/bench_monitor.py --quick   # 60 steps

The digits tanh MLP of :mod:`lightning_rpe.models` (``MLPClassifier()``: 64-200-200-10, MSE on
one-hot targets, SGD at lr 0.05) is trained with full-batch gradient descent on the first 1000
training samples of :class:`lightning_rpe.data.DigitsDataModule` for a fixed number of steps, with
and without ``SharpnessMonitor(every_n_steps=10, top_k=1, lambda_min=True, probe="fixed",
probe_size=1000)`` (all other options at their defaults: warm start on, gradient alignment on,
measurements at fit start and fit end). Both runs log to TensorBoard in a temporary directory, so
the logging cost of the training loss is in both.

Reported (``torch.set_num_threads(2)``; runs alternate with/without, medians over runs):

* wall-time ratio of the whole ``trainer.fit`` (with / without);
* per measurement once warm (every measurement after the first one): median HVPs, median wall
  time (the monitor's own ``Measurement.seconds``) and that time in gradient-equivalents, i.e.
  divided by the time of one gradient of the mean loss over the same 1000-sample probe set
  (forward + backward, median of 3, timed right after each measurement by a recorder callback
  whose own time is subtracted from the wall time of the run);
* state memory: bytes of all tensors in the monitor's ``state_dict()`` against the parameter
  bytes; goal ``<= (k + 3) x`` the parameter bytes.

``--criterion`` sets ``SharpnessMonitor(criterion=...)``: the stopping rule of the warm solves
(``auto``, the default and the monitor's: the eigenvalue rule only for the pairs whose vectors feed no
reported number; ``residual``: every pair to the residual tolerance, the monitor's default before
2026-11-29; ``eigenvalue``: every warm pair stops on the eigenvalue error with the previous
measurement's gap estimates).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

GOAL_GRAD_EQUIV = 5.0


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict/list/tuple (storages counted once)."""
    seen: set[tuple[int, int]] = set()

    def walk(o: Any) -> int:
        if isinstance(o, torch.Tensor):
            key = (o.untyped_storage().data_ptr(), o.untyped_storage().nbytes())
            if key in seen:
                return 0
            seen.add(key)
            return o.untyped_storage().nbytes()
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(walk(v) for v in o)
        return 0

    return walk(obj)


def make_model(hidden: Sequence[int], lr: float, seed: int, optimizer: str = "sgd") -> Any:
    import lightning.pytorch as pl

    from lightning_rpe.models import MLPClassifier

    pl.seed_everything(seed, verbose=False)
    return MLPClassifier(hidden=tuple(hidden), lr=lr, optimizer=optimizer)


def make_data(n_train: int) -> Any:
    from lightning_rpe.data import DigitsDataModule

    dm = DigitsDataModule(n_train=n_train, batch_size=None)
    dm.setup("fit")
    return dm


class _Recorder:
    """Collects every new ``monitor.latest`` and, right after it, times one gradient of the mean
    loss over the probe samples (median of 3), so each measurement has a paired gradient time
    (``pl_module.compute_loss(probe)``; CUDA is synchronised around it when the probe lives there).
    The recorder's own time is reported so that it can be subtracted from the run's wall time."""

    def __new__(cls, monitor: Any, probe: tuple[Any, ...]) -> Any:
        import lightning.pytorch as pl

        cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in probe)

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        class Recorder(pl.Callback):
            def __init__(self) -> None:
                self.monitor = monitor
                self.measurements: list[Any] = []
                self.grad_times: list[float] = []
                self.own_seconds = 0.0

            def _grab(self, pl_module: Any) -> None:
                m = self.monitor.latest
                if m is None or (self.measurements and self.measurements[-1] is m):
                    return
                start = time.perf_counter()
                self.measurements.append(m)
                params = [p for p in pl_module.parameters() if p.requires_grad]
                times = []
                with torch.enable_grad():
                    for _ in range(3):
                        sync()
                        t0 = time.perf_counter()
                        torch.autograd.grad(pl_module.compute_loss(probe), params)
                        sync()
                        times.append(time.perf_counter() - t0)
                self.grad_times.append(statistics.median(times))
                self.own_seconds += time.perf_counter() - start

            def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
                self._grab(pl_module)

            def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
                self._grab(pl_module)

        return Recorder()


def _quiet_lightning() -> None:
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fit_once(steps: int, hidden: Sequence[int], lr: float, n_train: int, monitor_kwargs: dict | None,
             seed: int = 0, optimizer: str = "sgd", accelerator: str = "cpu") -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_rpe import SharpnessMonitor

    _quiet_lightning()
    model = make_model(hidden, lr, seed, optimizer)
    dm = make_data(n_train)
    callbacks: list[Any] = []
    monitor = recorder = None
    if monitor_kwargs is not None:
        monitor = SharpnessMonitor(**monitor_kwargs)
        x, y = probe_tensors(dm, monitor_kwargs.get("probe_size", 1000))
        if accelerator != "cpu":  # the recorder's gradient runs where the monitor's probe lives
            x, y = x.cuda(), y.cuda()
        recorder = _Recorder(monitor, (x, y))
        callbacks = [monitor, recorder]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=1, callbacks=callbacks,
            logger=TensorBoardLogger(tmp, name="bench"), enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            wall = time.perf_counter() - t0
    out: dict[str, Any] = {"wall": wall, "steps": trainer.global_step, "model": model, "datamodule": dm}
    if monitor is not None:
        out["wall"] = wall - recorder.own_seconds
        out["measurements"] = list(recorder.measurements)
        out["grad_times"] = list(recorder.grad_times)
        out["state_bytes"] = tensor_bytes(monitor.state_dict())
        out["n_skipped"] = monitor.n_skipped
        out["top_k"] = monitor.top_k
    return out


def probe_tensors(dm: Any, n_probe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_probe`` training samples (what the fixed probe set holds)."""
    xs, ys, n = [], [], 0
    for batch in dm.train_dataloader():
        xs.append(batch[0])
        ys.append(batch[1])
        n += len(batch[0])
        if n >= n_probe:
            break
    return torch.cat(xs)[:n_probe], torch.cat(ys)[:n_probe]


def run(steps: int, runs: int, hidden: Sequence[int], lr: float, n_train: int, every: int, probe_size: int,
        verbose: bool = True, optimizer: str = "sgd", solver: str | None = None,
        lambda_min_tol: float | None = None, criterion: str = "auto", accelerator: str = "cpu") -> dict[str, Any]:
    monitor_kwargs: dict[str, Any] = dict(every_n_steps=every, top_k=1, lambda_min=True, probe="fixed",
                                          probe_size=probe_size)
    if solver is not None:
        monitor_kwargs["solver"] = solver
    if lambda_min_tol is not None:
        monitor_kwargs["lambda_min_tol"] = lambda_min_tol
    monitor_kwargs["criterion"] = criterion
    walls_with, walls_without, grad_times, warm, first, states = [], [], [], [], [], []
    skipped = 0
    n_params = top_k = None
    fit_once(min(steps, 20), hidden, lr, n_train, monitor_kwargs, optimizer=optimizer, accelerator=accelerator)  # warm-up
    for r in range(runs):
        base = fit_once(steps, hidden, lr, n_train, None, optimizer=optimizer, accelerator=accelerator)
        mon = fit_once(steps, hidden, lr, n_train, monitor_kwargs, optimizer=optimizer, accelerator=accelerator)
        walls_without.append(base["wall"])
        walls_with.append(mon["wall"])
        ms = mon["measurements"]
        gts = mon["grad_times"]
        grad_times.extend(gts)
        first.append((ms[0], gts[0]))
        warm.extend(zip(ms[1:], gts[1:]))
        states.append(mon["state_bytes"])
        skipped += mon["n_skipped"]
        top_k = mon["top_k"]
        n_params = sum(p.numel() for p in mon["model"].parameters() if p.requires_grad)
        param_bytes = sum(p.numel() * p.element_size() for p in mon["model"].parameters() if p.requires_grad)
        if verbose:
            print(f"[{time.strftime('%H:%M:%S')}] run {r}: without {base['wall']:.2f} s, with {mon['wall']:.2f} s, "
                  f"{len(ms)} measurements, HVPs {[m.n_hvp for m in ms]}, "
                  f"gradient {statistics.median(gts) * 1e3:.2f} ms",
                  flush=True)
    grad_t = statistics.median(grad_times)
    warm_secs = [m.seconds for m, _ in warm]
    warm_eq = [m.seconds / g for m, g in warm]
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "steps": steps, "runs": runs, "hidden": list(hidden), "lr": lr, "optimizer": optimizer, "solver": solver or "default",
        "lambda_min_tol": "default" if lambda_min_tol is None else lambda_min_tol, "n_params": n_params,
        "criterion": criterion,
        "every_n_steps": every, "probe_size": probe_size, "top_k": top_k,
        "wall_without": statistics.median(walls_without), "wall_with": statistics.median(walls_with),
        "wall_ratio": statistics.median(a / b for a, b in zip(walls_with, walls_without)),
        "n_measurements_per_run": (len(warm) + len(first)) / runs,
        "first_hvp": statistics.median(m.n_hvp for m, _ in first),
        "first_seconds": statistics.median(m.seconds for m, _ in first),
        "first_grad_equiv": statistics.median(m.seconds / g for m, g in first),
        "warm_hvp_median": statistics.median(m.n_hvp for m, _ in warm) if warm else None,
        "warm_hvp_max": max((m.n_hvp for m, _ in warm), default=None),
        "warm_hvp_min": min((m.n_hvp for m, _ in warm), default=None),
        "warm_seconds_median": statistics.median(warm_secs) if warm else None,
        "grad_time": grad_t,
        "warm_grad_equiv_median": statistics.median(warm_eq) if warm else None,
        "warm_grad_equiv_per_hvp_median": statistics.median(e / m.n_hvp for e, (m, _) in zip(warm_eq, warm))
        if warm else None,
        "skipped": skipped,
        "state_bytes": max(states), "param_bytes": param_bytes,
        "state_over_params": max(states) / param_bytes,
        "state_goal": top_k + 3,
        "load": os.getloadavg(),
    }


def format_table(r: dict[str, Any], markdown: bool = False) -> str:
    ok_cost = r["warm_grad_equiv_median"] is not None and r["warm_grad_equiv_median"] <= GOAL_GRAD_EQUIV
    ok_mem = r["state_over_params"] <= r["state_goal"]
    rows = [
        ["training wall time, with / without monitor",
         f"{r['wall_with']:.2f} s / {r['wall_without']:.2f} s", f"{r['wall_ratio']:.2f}x", "(info)", "-"],
        ["measurements per run (fit start, every 10 steps, fit end)", f"{r['n_measurements_per_run']:g}", "-",
         "(info)", "-"],
        ["first (cold) measurement", f"{r['first_hvp']:g} HVP, {r['first_seconds'] * 1e3:.1f} ms",
         f"{r['first_grad_equiv']:.1f} grad-eq", "(info)", "-"],
        ["warm measurements, HVPs: median (min-max)",
         f"{r['warm_hvp_median']:g} ({r['warm_hvp_min']:g}-{r['warm_hvp_max']:g})",
         f"{r['warm_grad_equiv_per_hvp_median']:.2f} grad-eq per HVP", "(info)", "-"],
        ["warm measurement, median cost",
         f"{r['warm_seconds_median'] * 1e3:.1f} ms (gradient {r['grad_time'] * 1e3:.2f} ms)",
         f"{r['warm_grad_equiv_median']:.1f} grad-eq", f"<= {GOAL_GRAD_EQUIV:g} grad-eq",
         "PASS" if ok_cost else "MISS"],
        ["monitor state memory (state_dict tensors)",
         f"{r['state_bytes']:,} B vs params {r['param_bytes']:,} B", f"{r['state_over_params']:.2f}x",
         f"<= (k + 3) = {r['state_goal']}x", "PASS" if ok_mem else "MISS"],
    ]
    return render_table(["measure", "value", "ratio", "goal", "status"], rows, markdown)


def render_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Rows of strings as a markdown table or as aligned plain-text columns."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 steps, 3 runs each")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hidden", type=int, nargs="*", default=[200, 200])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw", "clipped_adam"],
                        help="sgd = full-batch GD (the issue's setting); adam adds the preconditioned solve")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"],
                        help="where training and the monitor run (gpu: one CUDA device; gradients timed with synchronisation)")
    parser.add_argument("--solver", default=None, choices=["auto", "lanczos", "block"],
                        help="SharpnessMonitor(solver=...); default: the monitor's own default")
    parser.add_argument("--lambda-min-tol", type=float, default=None,
                        help="SharpnessMonitor(lambda_min_tol=...); default: the monitor's own default")
    parser.add_argument("--criterion", default="auto", choices=["residual", "eigenvalue", "auto"],
                        help="SharpnessMonitor(criterion=...): stopping rule of the warm solves (default: the monitor's, auto)")
    parser.add_argument("--probe-size", type=int, default=1000)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (use 1 on a machine loaded by other processes)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be >= 3 (the table reports medians)")
    torch.set_num_threads(args.threads)
    steps = args.steps or (60 if args.quick else 200)
    r = run(steps, args.runs, args.hidden, args.lr, args.n_train, args.every, args.probe_size,
            optimizer=args.optimizer, solver=args.solver, lambda_min_tol=args.lambda_min_tol, criterion=args.criterion,
            accelerator=args.accelerator)
    print()
    print(f"SharpnessMonitor cost, {r['date']}, torch {r['torch']}, {args.accelerator}, {r['threads']} threads; MLP 64-"
          f"{'-'.join(map(str, r['hidden']))}-10 ({r['n_params']:,} parameters), full-batch {r['optimizer']} lr {r['lr']}, "
          f"{r['steps']} steps, solver {r['solver']}, lambda_min_tol {r['lambda_min_tol']}, criterion {r['criterion']}, median of {r['runs']} runs; measurements skipped: {r['skipped']}")
    print(format_table(r))
    if args.markdown:
        print()
        print(format_table(r, markdown=True))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
