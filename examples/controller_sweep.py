"""The InstabilityController under minibatch SGD, momentum and Adam: batch sharpness, gauges, safety.

Digits MLP (``MLPClassifier()``: 64-200-200-10 tanh, MSE), ``DigitsDataModule(n_train=1000)``,
1 torch thread. Every run measures every ``--every`` steps with the SharpnessMonitor (probe = all
1000 training samples): lambda_max of the full training loss and the batch sharpness (mean of
``g_B^T H_B g_B / |g_B|^2`` over ``--bs-batches`` mini-batches of the training batch size drawn from
the probe set; preconditioned for Adam). Three experiments:

* ``trajectories``: uncontrolled runs of the batch-size sweep (B = 16, 32, 64, 128, 1000) at a fixed
  lr (0.1) and with the lr scaled with B: lambda_max, batch sharpness and 2/lr over training.
* ``controller``: the same runs with the recommended ``InstabilityController(gauge=G, stop_step=0.9)``
  for each gauge G (the gauge's default band, :data:`lightning_rpe.control.DEFAULT_BANDS`; other
  options by ``--option``): fraction of the measurements after warm-up whose ratio (of
  the gauge the controller steers) is in the band, rollbacks, divergence, test accuracy against the
  uncontrolled twin (same seed, same data order).
* ``snippet``: the README snippet ``InstabilityController(stop_step=0.9)`` (all defaults) with
  SGD, SGD + momentum 0.9 and Adam at B = 32, and its uncontrolled twins.

Each finished run is appended to ``<out>/runs.jsonl`` (so several processes can share the work with
``--part k/n``); ``--table`` reads that file and writes ``<out>/results.md``.

    python examples/controller_sweep.py --experiment trajectories --seeds 0,1,2 --part 1/2   # and 2/2
    python examples/controller_sweep.py --experiment controller --seeds 0,1,2 --part 1/2     # and 2/2
    python examples/controller_sweep.py --experiment snippet --seeds 0,1,2
    python examples/controller_sweep.py --table
    python examples/controller_sweep.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, mean_std, parse_ints, quiet

from lightning_rpe import InstabilityController, SharpnessMonitor
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.measure import Measurement
from lightning_rpe.models import MLPClassifier

N_TRAIN = 1000
BAND = (1.1, 1.5)  # counted for the uncontrolled runs (the sharpness gauge's default band)
RECOMMENDED: dict[str, Any] = {"stop_step": 0.9}  # the README's controller: release the lr for the last 10 %
BATCHES = (16, 32, 64, 128, 1000)
OTHER_OPTIMIZERS = (("momentum", 0.01), ("adam", 0.01))  # SGD + momentum 0.9 (effective lr 0.1), Adam (issue 9)


def scaled_lr(batch: int) -> float:
    """lr proportional to B: 0.2 * B / 128 up to B = 128; 0.2 at B = 1000 (linear scaling would give
    1.56 there, above 2 / the initial sharpness of about 8: divergence at the first steps)."""
    return 0.2 if batch >= N_TRAIN else 0.2 * batch / 128


class Recorder(pl.Callback):
    """Every new measurement as the monitor's listener sees it: the ratios at the lr the steps before
    it used (a controller registered earlier has decided, but the measurement is not restated yet)."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor = monitor
        self.rows: list[dict[str, float]] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.monitor.listeners.append(self.record)

    def record(self, trainer: pl.Trainer, m: Measurement) -> None:
        if m.trigger != "step":
            return
        nan = math.nan
        self.rows.append({"step": m.step, "sharpness": m.sharpness, "ratio": m.ratios[0], "lr": m.lrs[0],
                          "threshold": m.thresholds[0],
                          "bs": nan if m.batch_sharpness is None else m.batch_sharpness,
                          "bs_se": nan if m.batch_sharpness_se is None else m.batch_sharpness_se,
                          "bs_ratio": nan if m.batch_sharpness_ratio is None else m.batch_sharpness_ratio})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def run(cfg: dict[str, Any], every: int, n_bs: int) -> dict[str, Any]:
    """One training run; returns its configuration, series and summary numbers."""
    batch, lr, seed, steps = cfg["batch"], cfg["lr"], cfg["seed"], cfg["steps"]
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(n_train=N_TRAIN, batch_size=None if batch >= N_TRAIN else batch, seed=seed,
                          drop_last=batch < N_TRAIN)
    dm.setup()
    opt = cfg["optimizer"]
    model = MLPClassifier(lr=lr, optimizer="adam" if opt == "adam" else "sgd",
                          momentum=0.9 if opt == "momentum" else 0.0)
    monitor_kwargs: dict[str, Any] = {"every_n_steps": every, "top_k": 1, "lambda_min": False, "grad_alignment": False,
                                      "on_fit_end": False, "custom_scalars": False, "probe": [dm.full_train_batch()]}
    monitor = SharpnessMonitor(**monitor_kwargs, batch_sharpness=n_bs)
    recorder = Recorder(monitor)
    callbacks: list[pl.Callback] = [monitor]
    controller = None
    if cfg["gauge"] != "none":
        options = {**RECOMMENDED, **(cfg.get("options") or {})}
        controller = InstabilityController(gauge=cfg["gauge"], **options)
        callbacks.append(controller)
    callbacks.append(recorder)
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                         callbacks=callbacks, check_val_every_n_epoch=10**9, num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    (test,) = trainer.test(model, datamodule=dm, verbose=False)
    losses = recorder.losses
    warm = controller.settings.warmup_steps if controller is not None else 100
    stop = controller.stop_step if controller is not None and controller.stop_step is not None else math.inf
    after = [r for r in recorder.rows if warm < r["step"] <= stop]  # measurements of the controlled phase
    gauge = controller.active_gauge if controller is not None else None
    band = controller.band if controller is not None else BAND  # the band the controller used

    def in_band(key: str) -> float:
        vals = [r[key] for r in after if math.isfinite(r.get(key, math.nan))]
        return sum(band[0] <= v <= band[1] for v in vals) / len(vals) if vals else math.nan

    return {
        **cfg,
        "active_gauge": gauge,
        "band": list(band),
        "rows": recorder.rows,
        "test_acc": float(test["test_acc"]),
        "final_loss": losses[-1] if losses else math.nan,
        "diverged": (not losses) or not math.isfinite(losses[-1]),
        "nonfinite_steps": sum(not math.isfinite(v) for v in losses),
        "rollbacks": controller.state.n_rollbacks if controller is not None else 0,
        "snapshot_bytes": controller.snapshot_bytes if controller is not None else None,
        "final_factor": controller.state.factor if controller is not None else 1.0,
        "in_band_sharpness": in_band("ratio"),
        "in_band_bs": in_band("bs_ratio"),
        "seconds": time.perf_counter() - t0,
    }


def configs(experiment: str, seeds: list[int], steps: int, gauges: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if experiment in ("trajectories", "controller"):
        pairs = sorted({(b, 0.1) for b in BATCHES} | {(b, scaled_lr(b)) for b in BATCHES})
        for seed in seeds:
            for b, lr in pairs:
                for gauge in (["none"] if experiment == "trajectories" else gauges):
                    out.append({"experiment": experiment, "batch": b, "lr": lr, "optimizer": "sgd", "seed": seed,
                                "steps": steps, "gauge": gauge})
        if experiment == "controller":  # which gauge for momentum and Adam (twins: the snippet's runs)
            for seed in seeds:
                for opt, lr in OTHER_OPTIMIZERS:
                    for gauge in gauges:
                        out.append({"experiment": experiment, "batch": 32, "lr": lr, "optimizer": opt, "seed": seed,
                                    "steps": steps, "gauge": gauge})
    elif experiment == "snippet":
        for seed in seeds:
            for opt, lr in (("sgd", 0.1), *OTHER_OPTIMIZERS):
                for gauge in ("none", "auto"):
                    out.append({"experiment": experiment, "batch": 32, "lr": lr, "optimizer": opt, "seed": seed,
                                "steps": steps, "gauge": gauge})
    return out


def _key(cfg: dict[str, Any]) -> str:
    key = {k: cfg[k] for k in ("experiment", "batch", "lr", "optimizer", "seed", "steps", "gauge")}
    if cfg.get("options"):
        key["options"] = cfg["options"]
    return json.dumps(key, sort_keys=True)


def _done(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_key(r): r for r in rows}


def _twin(r: dict[str, Any], done: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    for experiment in (r["experiment"], "trajectories", "snippet", "controller"):
        key = _key({**r, "experiment": experiment, "gauge": "none", "options": None})
        if key in done:
            return done[key]
    return None


def _series_stats(rs: list[dict[str, Any]], key: str, start: int) -> list[float]:
    """Per run: the mean of ``key`` over the measurements at steps >= ``start``."""
    out = []
    for r in rs:
        vals = [row[key] for row in r["rows"] if row["step"] >= start and math.isfinite(row.get(key, math.nan))]
        out.append(statistics.fmean(vals) if vals else math.nan)
    return out


def tables(out: Path, steps: int) -> str:
    done = _done(out / "runs.jsonl")
    runs = [r for r in done.values() if r["steps"] == steps]
    parts = []
    traj = [r for r in runs if r["experiment"] == "trajectories"]
    if traj:
        rows = []
        for b, lr in sorted({(r["batch"], r["lr"]) for r in traj}):
            rs = [r for r in traj if r["batch"] == b and r["lr"] == lr]
            steps = rs[0]["steps"]
            rows.append([str(b), f"{lr:g}", f"{2 / lr:.1f}", str(len(rs)),
                         mean_std(_series_stats(rs, "sharpness", steps // 2)),
                         mean_std(_series_stats(rs, "bs", steps // 2)),
                         mean_std(_series_stats(rs, "ratio", steps // 2)),
                         mean_std(_series_stats(rs, "bs_ratio", steps // 2)),
                         mean_std([max(row["bs_ratio"] for row in r["rows"]) for r in rs]),
                         mean_std([r["test_acc"] for r in rs]),
                         str(sum(r["diverged"] for r in rs))])
        parts.append("### Uncontrolled: lambda_max, batch sharpness (BS) and 2/lr (means over the second half "
                     "of training)\n\n" + markdown_table(
                         ["batch", "lr", "2/lr", "seeds", "lambda_max", "BS", "lambda_max·lr/2", "BS·lr/2",
                          "max BS·lr/2", "test acc", "diverged"], rows))
    for experiment in ("controller", "snippet"):
        ctl = [r for r in runs if r["experiment"] == experiment and r["gauge"] != "none"]
        if not ctl:
            continue
        rows = []
        groups = sorted({(r["optimizer"], r["batch"], r["lr"], r["gauge"], json.dumps(r.get("options") or {}))
                         for r in ctl})
        for opt, b, lr, gauge, options in groups:
            rs = [r for r in ctl if (r["optimizer"], r["batch"], r["lr"], r["gauge"],
                                     json.dumps(r.get("options") or {})) == (opt, b, lr, gauge, options)]
            twins = [_twin(r, done) for r in rs]
            delta = [100 * (r["test_acc"] - t["test_acc"]) for r, t in zip(rs, twins) if t is not None]
            steered = ["in_band_bs" if r["active_gauge"] == "batch_sharpness" else "in_band_sharpness" for r in rs]
            extra = ", ".join(f"{k}={v}" for k, v in json.loads(options).items())
            rows.append([opt, str(b), f"{lr:g}", gauge + (f" ({extra})" if extra else ""), "/".join(sorted({str(r["active_gauge"]) for r in rs})),
                         str(len(rs)),
                         mean_std([r[k] for r, k in zip(rs, steered)]),
                         mean_std([r["in_band_sharpness"] for r in rs]), mean_std([r["in_band_bs"] for r in rs]),
                         mean_std([r["final_factor"] for r in rs]),
                         str(sum(r["rollbacks"] for r in rs)), str(sum(r["diverged"] for r in rs)),
                         mean_std([r["test_acc"] for r in rs]),
                         mean_std([t["test_acc"] for t in twins if t is not None]),
                         mean_std(delta), f"{min(delta):+.1f}" if delta else "-"])
        title = ("### Controller, `InstabilityController(gauge=G, stop_step=0.9)`, per gauge" if experiment == "controller"
                 else "### README snippet `InstabilityController(stop_step=0.9)`, B = 32")
        parts.append(title + "\n\n" + markdown_table(
            ["optimizer", "batch", "lr", "gauge", "steered", "seeds", "in band (steered gauge)",
             "in band (λmax ratio)", "in band (BS ratio)", "final factor", "rollbacks", "diverged", "test acc",
             "uncontrolled test acc", "Δ acc (points)", "worst Δ"], rows))
    text = "\n\n".join(parts)
    (out / "results.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", choices=("trajectories", "controller", "snippet"), default="trajectories")
    p.add_argument("--seeds", type=parse_ints, default=[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=25, help="measurement interval (optimizer steps)")
    p.add_argument("--bs-batches", type=int, default=16, dest="bs_batches",
                   help="mini-batches per batch-sharpness estimate")
    p.add_argument("--gauges", default="sharpness,batch_sharpness", help="gauges of the controller experiment")
    p.add_argument("--optimizers", default="", help="comma-separated subset of sgd,momentum,adam (default: all)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                   help="an InstabilityController option for the controller runs (repeatable), e.g. "
                        "band=[0.8,1.2] or max_factor=8")
    p.add_argument("--batches", default="", help="comma-separated subset of the batch sizes (default: all)")
    p.add_argument("--part", default="1/1", help="k/n: run every n-th configuration starting at the k-th")
    p.add_argument("--out", default="runs/controller_sweep")
    p.add_argument("--table", action="store_true", help="only write the tables of the runs in <out>/runs.jsonl")
    p.add_argument("--smoke", action="store_true", help="a tiny configuration that finishes in seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(tables(out, args.steps))
        return 0
    if args.smoke:
        args.seeds, args.steps, args.every, args.bs_batches = [0], 30, 10, 2
    k, n = (int(x) for x in args.part.split("/"))
    todo = configs(args.experiment, args.seeds, args.steps, args.gauges.split(","))
    if args.optimizers:
        todo = [c for c in todo if c["optimizer"] in args.optimizers.split(",")]
    options = {name: json.loads(value) for name, value in (o.split("=", 1) for o in args.option)}
    if options:
        todo = [{**c, "options": options} for c in todo if c["gauge"] != "none"]
    if args.batches:
        todo = [c for c in todo if c["batch"] in parse_ints(args.batches)]
    if args.smoke:
        todo = [c for c in todo if c["batch"] in (32, 1000)][:4]
    todo = todo[k - 1::n]
    done = _done(out / "runs.jsonl")
    for cfg in todo:
        if _key(cfg) in done:
            continue
        r = run(cfg, args.every, args.bs_batches)
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{cfg['experiment']} {cfg['optimizer']} B={cfg['batch']} lr={cfg['lr']:g} seed={cfg['seed']} "
              f"gauge={cfg['gauge']}->{r['active_gauge']}: acc {r['test_acc']:.3f}, rollbacks {r['rollbacks']}, "
              f"in band {r['in_band_sharpness']:.2f}/{r['in_band_bs']:.2f}, factor {r['final_factor']:.3g}, "
              f"{r['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
