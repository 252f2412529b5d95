"""The monitor at real size (issue 12, "Scale"): peak memory and cost per measurement on a ~5M-parameter
MLP and a ~1M-parameter ResNet-style CNN with BatchNorm, against PyHessian's top-1.

Run::

    python benchmarks/bench_scale.py                  # both workloads (tens of minutes on 2 busy cores)
    python benchmarks/bench_scale.py --workloads mlp  # one of them
    python benchmarks/bench_scale.py --quick          # tiny widths and probes: a smoke run

Data: synthetic CIFAR-shaped inputs (3 x 32 x 32, standard normal, seeded; no download) with labels
from a fixed random linear teacher, so the loss has structure.

========  ==================================================================  ==========
name      model                                                               parameters
========  ==================================================================  ==========
mlp       flatten-3072-1500-512-10, tanh, cross-entropy                       5,383,142
resnet    conv3x3(32)-BN-ReLU, 4 stages of one basic block (32, 64, 128,      1,007,210
          192 channels; 3x3 convs with BatchNorm, 1x1 projection on the
          skip where the shape changes), global average pool, fc(10), CE
========  ==================================================================  ==========

Every measurement runs in its own subprocess, so that peak RSS (``ru_maxrss``) belongs to it:

* ``train`` / ``train+monitor``: mini-batch SGD training with Lightning (batch 256, lr 0.01,
  ``--steps`` steps), without and with ``SharpnessMonitor(every_n_steps=2, probe="fixed",
  probe_size=P)`` at its defaults otherwise (``top_k=1``, ``lambda_min=True``, warm start); with
  ``--top-k 5`` also a run with ``top_k=5``. Reported: peak RSS, the ratio with / without, products
  of the cold first measurement and median products and gradient-equivalents of the warm ones (wall
  time of a measurement, ``Measurement.seconds``, over one gradient of the mean probe loss timed
  right after it).
* ``ours`` / ``pyhessian``: lambda_max on the same model (after the same training steps, eval-mode
  BatchNorm) and the same probe set: ``eigenpairs(HessianOperator(...), k=1, tol=...)`` against
  PyHessian 0.1's default ``hessian(model, criterion, data=(x, y), cuda=False).eigenvalues(top_n=1)``
  (power iteration, ``maxIter=100``, ``tol=1e-3`` on the change of the Rayleigh quotient). Reported:
  wall time (operator construction included for both), products, relative error against a tight
  float32 solve of ours (``tol=1e-6``; run after the timed solve, outside its memory), and the peak
  RSS increase over the loaded model and data (``ru_maxrss`` after minus before; the training steps
  run in a separate ``prepare`` subprocess that saves the state, so no training peak hides it).
* ``split`` (run by hand: ``--part split --config '{...}'`` with a ``state_path`` saved by ``prepare``):
  what one measurement at the monitor's defaults holds, as peak live tensor bytes in parameter
  vectors (:class:`LiveBytes`, a ``TorchDispatchMode``) after the operator, after
  ``loss_and_gradient`` and during the solve, and the peak RSS increase; ``copy_parameters`` and
  ``max_basis`` in the config are passed on.
* ``--criterion-eigenvalue``: one more monitor run whose warm solves stop on the eigenvalue error
  with the previous solve's gaps (``SharpnessMonitor(criterion="eigenvalue")``).

``--threads`` sets ``torch.set_num_threads`` in every subprocess (default 2).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from bench_monitor import _Recorder, render_table
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

WORKLOADS = ("mlp", "resnet")


# ------------------------------------------------------------------------------ models and data
def make_mlp(hidden: tuple[int, ...] = (1500, 512)) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 3 * 32 * 32
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and ReLU, plus a skip (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.skip(x))


def make_resnet(widths: tuple[int, ...] = (32, 64, 128, 216)) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers.append(BasicBlock(cin, w, 1 if i == 0 else 2))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def make_model(name: str, quick: bool) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return make_mlp((64, 32) if quick else (1500, 512))
    if name == "resnet":
        return make_resnet((8, 8, 16, 16) if quick else (32, 64, 128, 216))
    raise ValueError(f"bench_scale: workload must be one of {WORKLOADS}, got {name!r}")


def synthetic_cifar(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` standard-normal 3x32x32 images with labels of a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    teacher = torch.randn(3 * 32 * 32, 10, generator=torch.Generator().manual_seed(1234))
    y = (x.reshape(n, -1) @ teacher).argmax(dim=1)
    return x, y


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss`` is in KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------ subprocess parts
def _lightning_module(model: nn.Module, lr: float) -> Any:
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def compute_loss(self, batch: Any) -> Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return self.compute_loss(batch)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Classifier()


def part_train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Lightning training with or without the monitor; peak RSS and per-measurement costs."""
    import logging

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_rpe import SharpnessMonitor

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model = make_model(cfg["workload"], cfg["quick"])
    module = _lightning_module(model, lr=0.01)
    x, y = synthetic_cifar(cfg["n_train"])
    loader = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=False)
    probe = (x[: cfg["probe"]], y[: cfg["probe"]])
    callbacks: list[Any] = []
    monitor = recorder = None
    if cfg["top_k"] is not None:
        rule = {} if cfg.get("criterion") is None else {"criterion": cfg["criterion"]}  # None: the default
        if cfg.get("cache_graphs") is not None:
            rule["cache_graphs"] = cfg["cache_graphs"]
        for key in ("max_basis", "max_hvp"):
            if cfg.get(key) is not None:
                rule[key] = cfg[key]
        monitor = SharpnessMonitor(every_n_steps=2, probe="fixed", probe_size=cfg["probe"], top_k=cfg["top_k"], **rule)
        recorder = _Recorder(monitor, probe)
        callbacks = [monitor, recorder]
    trainer = pl.Trainer(max_steps=cfg["steps"], max_epochs=-1, accelerator="cpu", devices=1, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        wall = time.perf_counter() - t0
    out: dict[str, Any] = {"peak_rss": peak_rss_bytes(), "wall": wall, "n_params": count_parameters(model)}
    if monitor is not None:
        out["n_skipped"] = monitor.n_skipped
        out["measurements"] = [{"n_hvp": m.n_hvp, "seconds": m.seconds, "grad": g, "lambda_max": m.eigenvalues[0],
                                "lambda_min": m.lambda_min} for m, g in zip(recorder.measurements, recorder.grad_times)]
    return out


def part_prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Trains the model for the same steps as part_train (plain SGD loop) and saves its state, so
    that the solver parts measure their memory without a training peak before them."""
    model = make_model(cfg["workload"], cfg["quick"])
    x, y = synthetic_cifar(cfg["n_train"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(cfg["steps"]):
        i = (step * 256) % cfg["n_train"]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 256]), y[i : i + 256]).backward()
        opt.step()
    torch.save(model.state_dict(), cfg["state_path"])
    return {"saved": cfg["state_path"]}


def _probe_model(cfg: dict[str, Any]) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The trained model of part_prepare, in eval mode, and the probe batch."""
    model = make_model(cfg["workload"], cfg["quick"])
    model.load_state_dict(torch.load(cfg["state_path"]))
    model.eval()
    x, y = synthetic_cifar(cfg["n_train"])
    return model, (x[: cfg["probe"]].clone(), y[: cfg["probe"]].clone())


def _gradient_time(model: nn.Module, batch: tuple[Tensor, Tensor]) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        torch.autograd.grad(F.cross_entropy(model(batch[0]), batch[1]), params)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_ours(cfg: dict[str, Any]) -> dict[str, Any]:
    from lightning_rpe.curvature import DenseOperator, HessianOperator, eigenpairs

    model, batch = _probe_model(cfg)
    grad = _gradient_time(model, batch)
    # load LAPACK's code and workspaces (eigh) before measuring: library pages, not working memory
    eigenpairs(DenseOperator(torch.diag(torch.arange(1.0, 41.0))), k=1, which="both", tol=1e-6)

    def loss_fn(m: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    before = peak_rss_bytes()
    t0 = time.perf_counter()
    op = HessianOperator(model, loss_fn, [batch])
    res = eigenpairs(op, k=1, which="largest", tol=cfg["tol"], max_basis=cfg.get("max_basis"),
                     criterion=cfg.get("criterion", "residual"), gap=cfg.get("gap"))
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    del op
    ref = eigenpairs(HessianOperator(model, loss_fn, [batch]), k=1, which="largest", tol=1e-6, max_hvp=300)
    return {"wall": wall, "grad": grad, "n_hvp": res.n_hvp, "value": res.lambda_max, "converged": res.all_converged,
            "rss_increase": peak - before, "reference": ref.lambda_max, "reference_converged": ref.all_converged,
            "reference_hvp": ref.n_hvp}


def count_pyhessian_products() -> list[int]:
    """Wrap PyHessian's ``hessian_vector_product`` so that every call adds one to the returned counter
    (raises ImportError when PyHessian is not installed)."""
    import pyhessian  # noqa: F401  (registers pyhessian.hessian in sys.modules)

    module = sys.modules["pyhessian.hessian"]
    original = getattr(module.hessian_vector_product, "__wrapped__", module.hessian_vector_product)
    count = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    counted.__wrapped__ = original  # type: ignore[attr-defined]
    module.hessian_vector_product = counted
    return count


def part_pyhessian(cfg: dict[str, Any]) -> dict[str, Any]:
    from pyhessian import hessian

    count = count_pyhessian_products()
    model, batch = _probe_model(cfg)
    grad = _gradient_time(model, batch)
    torch.manual_seed(0)  # PyHessian draws its start vector from the global RNG
    before = peak_rss_bytes()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*create_graph=True.*")
        t0 = time.perf_counter()
        h = hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)
        values, _ = h.eigenvalues(top_n=1)
        wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"wall": wall, "grad": grad, "n_hvp": count[0], "value": float(values[0]), "rss_increase": peak - before}


def part_curvlinops(cfg: dict[str, Any]) -> dict[str, Any]:
    """curvlinops 3.0.1 ``HessianLinearOperator(...).to_scipy()`` + scipy ``eigsh(k=1, which="LA", tol)``
    on the same model and probe batch (products by ``torch.func``; ARPACK keeps ``ncv = 20`` float64
    Lanczos vectors)."""
    import numpy as np
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    model, batch = _probe_model(cfg)
    grad = _gradient_time(model, batch)
    eigsh(np.diag(np.arange(1.0, 41.0)), k=1, which="LA")  # load ARPACK's pages before measuring
    params = [p for p in model.parameters() if p.requires_grad]
    count = [0]
    before = peak_rss_bytes()
    t0 = time.perf_counter()
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [batch], check_deterministic=False,
                              num_data=len(batch[0])).to_scipy()

    def matmat(X: Any) -> Any:
        count[0] += 1 if X.ndim == 1 else X.shape[1]
        return H @ X

    counted = LinearOperator(H.shape, matvec=matmat, matmat=matmat, rmatvec=matmat, dtype=H.dtype)
    values = eigsh(counted, k=1, which="LA", tol=cfg.get("eigsh_tol", 1e-4), return_eigenvectors=False,
                   rng=np.random.default_rng(0))
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"wall": wall, "grad": grad, "n_hvp": count[0], "value": float(values[0]), "rss_increase": peak - before,
            "eigsh_tol": cfg.get("eigsh_tol", 1e-4)}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages of at least 4 KiB created inside the block (every ATen op's
    outputs; a storage counts from its creation until the tensor that created it dies). Storages of
    the tensors in ``existing`` (the model's parameters and buffers, the probe batch) are not counted
    when an op returns a view of them."""

    def __init__(self, existing: Any = ()) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, int] = {}
        self.total = 0
        self.peak = 0

    def _drop(self, ptr: int) -> None:
        self.total -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes >= 4096 and ptr not in self.live and ptr not in self.existing:
                    self.live[ptr] = nbytes
                    self.total += nbytes
                    weakref.finalize(t, self._drop, ptr)
                    self.peak = max(self.peak, self.total)
        return out


def part_split(cfg: dict[str, Any]) -> dict[str, Any]:
    """What one measurement at the monitor's defaults holds: ``HessianOperator`` (parameter snapshot
    or shared storage), ``loss_and_gradient`` (builds the cached graph), then lambda_max at tol 1e-3 and
    lambda_min at 1e-2 by Lanczos from a random vector. Peak live tensor bytes in parameter vectors
    (:class:`LiveBytes`) after each stage, and the peak RSS increase of the whole."""
    from lightning_rpe.curvature import DenseOperator, HessianOperator, eigenpairs

    model, batch = _probe_model(cfg)
    eigenpairs(DenseOperator(torch.diag(torch.arange(1.0, 41.0))), k=1, which="both", tol=1e-6)

    def loss_fn(m: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    vector = count_parameters(model) * 4
    tracker = LiveBytes([*model.parameters(), *model.buffers(), *batch])
    stages = {}
    before = peak_rss_bytes()
    t0 = time.perf_counter()
    with tracker:
        share = {} if "copy_parameters" not in cfg else {"copy_parameters": cfg["copy_parameters"]}
        op = HessianOperator(model, loss_fn, [batch], **share)
        stages["operator"] = tracker.peak / vector
        _, grad = op.loss_and_gradient()
        stages["loss_and_gradient"] = tracker.peak / vector
        res = eigenpairs(op, k=1, which="both", tol=1e-3, tol_smallest=1e-2, max_basis=cfg.get("max_basis"))
        stages["solve"] = tracker.peak / vector
        held = tracker.total / vector
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"stages": stages, "held_after": held, "rss_increase": peak - before, "rss_vectors": (peak - before) / vector,
            "n_hvp": res.n_hvp, "values": res.eigenvalues.tolist(), "converged": res.all_converged, "wall": wall,
            "graph_bytes_estimate": op.graph_bytes_estimate, "vector_bytes": vector}


PARTS = {"train": part_train, "prepare": part_prepare, "ours": part_ours, "pyhessian": part_pyhessian,
         "curvlinops": part_curvlinops, "split": part_split}


def run_part(part: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs one part in a fresh interpreter and returns its JSON result (or {"error": ...})."""
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--config", json.dumps(cfg)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}


# ------------------------------------------------------------------------------ driver
def bench_workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    probe = args.probe or (64 if args.quick else (1000 if name == "mlp" else 256))
    base = {"workload": name, "quick": args.quick, "threads": args.threads, "probe": probe,
            "n_train": max(probe, 512), "steps": args.steps, "tol": 1e-3}
    out: dict[str, Any] = {"workload": name, "probe": probe}
    # each run: its label and what it sets on top of ``base`` (top_k None: training without the monitor)
    runs: list[tuple[str, dict[str, Any]]] = [] if args.solvers_only else [
        ("train", {"top_k": None}), ("train+monitor", {"top_k": 1})]
    if args.criterion_eigenvalue:
        runs.append(("train+monitor eigenvalue rule", {"top_k": 1, "criterion": "eigenvalue"}))
    if args.top_k5:
        runs.append(("train+monitor top_k=5", {"top_k": 5}))
    if args.no_cache_graphs:
        runs.append(("train+monitor cache_graphs=False", {"top_k": 1, "cache_graphs": False}))
    for cap in args.max_basis:
        runs.append((f"train+monitor max_basis={cap}", {"top_k": 1, "max_basis": cap, "max_hvp": args.max_basis_hvp}))
    for label, overrides in runs:
        r = run_part("train", dict(base, **overrides), args.timeout)
        out[label] = r
        print(f"[{time.strftime('%H:%M:%S')}] {name} {label}: {_short(r)}", flush=True)
    if args.train_only:
        return out
    fd, state_path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    base["state_path"] = state_path
    out["prepare"] = run_part("prepare", base, args.timeout)
    parts = [("ours", "ours", base), ("pyhessian", "pyhessian", base)]
    if args.small_basis:
        parts.insert(1, ("ours max_basis=4", "ours", dict(base, max_basis=4)))
    if args.curvlinops:
        parts.append(("curvlinops", "curvlinops", base))
    for label, part, cfg in parts:
        r = run_part(part, cfg, args.timeout)
        out[label] = r
        print(f"[{time.strftime('%H:%M:%S')}] {name} {label}: {_short(r)}", flush=True)
    os.unlink(state_path)
    return out


def _short(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    keys = ("peak_rss", "wall", "n_hvp", "value", "rss_increase")
    return ", ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), (int, float)))


def summarize(res: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    name = res["workload"]
    base, mon = res.get("train", {}), res.get("train+monitor", {})
    n_params = base.get("n_params") or mon.get("n_params")
    label = f"{name} ({n_params:,} p, probe {res['probe']})" if n_params else name
    gib = 1024 ** 3
    capped = [k for k in res if k.startswith("train+monitor max_basis=")]
    for key, goal in (("train+monitor", 1.5), ("train+monitor eigenvalue rule", 1.5), ("train+monitor top_k=5", 2.0),
                      ("train+monitor cache_graphs=False", 1.5), *((k, 1.5) for k in capped)):
        r = res.get(key)
        if not r or "error" in r or "error" in base:
            if r is not None:
                rows.append([label, f"peak RSS {key}", "error", r.get("error", base.get("error", "")), "-", "-", "-"])
            continue
        ratio = r["peak_rss"] / base["peak_rss"]
        rows.append([label, f"peak RSS, {key} / train", f"{r['peak_rss'] / gib:.2f} GiB",
                     f"{base['peak_rss'] / gib:.2f} GiB", f"{ratio:.2f}x", f"<= {goal}x",
                     "PASS" if ratio <= goal else "MISS"])
        ms = r.get("measurements", [])
        if ms:
            first, warm = ms[0], ms[1:]
            rows.append([label, f"{key}: cold first measurement", f"{first['n_hvp']} HVP, {first['seconds']:.2f} s",
                         f"gradient {first['grad'] * 1e3:.0f} ms", f"{first['seconds'] / first['grad']:.1f} grad-eq",
                         "(info)", "-"])
            if warm:
                eq = statistics.median(m["seconds"] / m["grad"] for m in warm)
                goal_eq = 5.0 if name == "mlp" else 8.0
                rows.append([label, f"{key}: warm measurements (median of {len(warm)})",
                             (f"{statistics.median(m['n_hvp'] for m in warm):g} HVP "
                              f"({min(m['n_hvp'] for m in warm)}-{max(m['n_hvp'] for m in warm)})"),
                             f"{statistics.median(m['seconds'] for m in warm):.2f} s", f"{eq:.1f} grad-eq",
                             f"(info; <= {goal_eq:g} on digits/CNN)", "-"])
    ref = res.get("pyhessian", {})
    for key in ("ours", "ours max_basis=4"):
        if key in res:
            rows.extend(_versus_pyhessian(label, key, res[key], ref))
    ours, cl = res.get("ours", {}), res.get("curvlinops")
    if cl is not None and ours and "error" not in ours and "error" not in cl:
        truth = ours["reference"]
        e_ours, e_cl = (abs(r["value"] - truth) / abs(truth) for r in (ours, cl))
        rows.append([label, f"lambda_max: ours (tol 1e-3) vs curvlinops + eigsh(k=1, tol={cl['eigsh_tol']:g}), time",
                     f"{ours['wall']:.2f} s, {ours['n_hvp']} HVP, err {e_ours:.1e}",
                     f"{cl['wall']:.2f} s, {cl['n_hvp']} HVP, err {e_cl:.1e}", f"{ours['wall'] / cl['wall']:.2f}x",
                     "(info)", "-"])
        rows.append([label, "lambda_max: peak RSS increase, ours vs curvlinops + eigsh",
                     f"{ours['rss_increase'] / 2**20:.0f} MiB", f"{cl['rss_increase'] / 2**20:.0f} MiB",
                     f"{ours['rss_increase'] / max(cl['rss_increase'], 1):.2f}x", "(info)", "-"])
    elif cl is not None:
        rows.append([label, "lambda_max vs curvlinops + eigsh", _short(ours), _short(cl), "-", "-", "-"])
    return rows


def _versus_pyhessian(label: str, key: str, ours: dict[str, Any], ref: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    if ours and ref and "error" not in ours and "error" not in ref:
        truth = ours["reference"]
        e_ours = abs(ours["value"] - truth) / abs(truth)
        e_ref = abs(ref["value"] - truth) / abs(truth)
        ratio = ours["wall"] / ref["wall"]
        ok = ratio <= 0.5 and e_ours <= 1e-4
        rows.append([label, f"lambda_max: {key} (tol 1e-3) vs PyHessian default top-1, time",
                     f"{ours['wall']:.2f} s, {ours['n_hvp']} HVP, err {e_ours:.1e}",
                     f"{ref['wall']:.2f} s, {ref['n_hvp']} HVP, err {e_ref:.1e}", f"{ratio:.2f}x",
                     "<= 0.5x at err <= 1e-4", "PASS" if ok else "MISS"])
        mem = ours["rss_increase"] / max(ref["rss_increase"], 1)
        rows.append([label, f"lambda_max: peak RSS increase, {key} vs PyHessian",
                     f"{ours['rss_increase'] / 2**20:.0f} MiB", f"{ref['rss_increase'] / 2**20:.0f} MiB",
                     f"{mem:.2f}x", "<= 1x", "PASS" if mem <= 1.0 else "MISS"])
    elif ours or ref:
        rows.append([label, "lambda_max vs PyHessian", _short(ours), _short(ref), "-", "-", "-"])
    return rows


def format_table(rows: list[list[str]], markdown: bool) -> str:
    return render_table(["workload", "measure", "lightning-rpe", "reference", "ratio", "goal", "status"], rows, markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths and probe sets (smoke run)")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--probe", type=int, default=None, help="probe size (default: mlp 1000, resnet 256)")
    parser.add_argument("--steps", type=int, default=6, help="training steps (monitor every 2)")
    parser.add_argument("--top-k5", action="store_true", help="also a run with SharpnessMonitor(top_k=5)")
    parser.add_argument("--criterion-eigenvalue", action="store_true",
                        help=("also a monitor run whose warm solves stop on the eigenvalue error "
                              "(SharpnessMonitor(criterion='eigenvalue'))"))
    parser.add_argument("--small-basis", action="store_true",
                        help="also lambda_max with eigenpairs(max_basis=4) (PyHessian-like memory)")
    parser.add_argument("--no-cache-graphs", action="store_true", dest="no_cache_graphs",
                        help="also a monitor run with SharpnessMonitor(cache_graphs=False)")
    parser.add_argument("--train-only", action="store_true", dest="train_only",
                        help="only the training runs (no lambda_max against PyHessian)")
    parser.add_argument("--curvlinops", action="store_true",
                        help="also lambda_max by curvlinops + scipy eigsh (needs curvlinops, see install.sh)")
    parser.add_argument("--solvers-only", action="store_true", dest="solvers_only",
                        help="skip the training runs: only prepare, ours, pyhessian (and curvlinops)")
    parser.add_argument("--max-basis", type=int, nargs="*", default=[], dest="max_basis",
                        help="one more monitor run per value with SharpnessMonitor(max_basis=N, max_hvp=--max-basis-hvp)")
    parser.add_argument("--max-basis-hvp", type=int, default=400, dest="max_basis_hvp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3000.0, help="seconds per subprocess")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        cfg = json.loads(args.config)
        torch.set_num_threads(cfg["threads"])
        print(json.dumps(PARTS[args.part](cfg)))
        return 0
    torch.set_num_threads(args.threads)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench_scale, {date}, torch {torch.__version__}, {args.threads} threads per subprocess, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    results = [bench_workload(name, args) for name in args.workloads]
    rows = [row for r in results for row in summarize(r)]
    print()
    print(format_table(rows, markdown=False))
    if args.markdown:
        print()
        print(format_table(rows, markdown=True))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": date, "torch": torch.__version__, "threads": args.threads, "quick": args.quick,
                       "load": os.getloadavg(), "results": results}, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
