"""The monitor at real size on a GPU (issue 12, item 5): peak CUDA memory and time per measurement.

One prepared run for a lent GPU machine (``benchmarks/run_gpu_scale.sh`` wraps it), in one process,
parts one after the other, each guarded so that a failure is reported and the next part still runs:

* ``mlp`` / ``resnet``: the models of ``bench_scale.py`` (5,383,142 and 1,007,210 parameters) on
  synthetic CIFAR-shaped data, Lightning training with SGD (batch 256, lr 0.01) without the monitor,
  with ``SharpnessMonitor(every_n_steps=2, probe="fixed", probe_size=P)`` at its defaults otherwise
  (``top_k=1``, ``lambda_min=True``) and with ``top_k=5``. Reported: peak CUDA memory
  (``torch.cuda.max_memory_allocated``, reset before each fit) and its ratio with / without the
  monitor; per measurement its products (``Measurement.n_hvp``), its wall time
  (``Measurement.seconds``) and that time in gradient-equivalents (over one gradient of the mean probe
  loss, timed right after it with ``torch.cuda.synchronize`` around it, median of 3).
* ``pyhessian``: lambda_max of the trained MLP and ResNet (eval-mode BatchNorm) on the probe set:
  ``eigenpairs(HessianOperator(...), k=1, tol=1e-4)`` against PyHessian 0.1's default top-1
  (``hessian(..., cuda=True).eigenvalues(top_n=1)``, needs ``pyhessian`` importable, e.g. from a
  carried ``.benchlibs``): wall time, products, peak CUDA memory over the loaded model and data,
  relative error against a tight solve of ours (``tol=1e-6``).
* ``gpt2``: a GPT-2-small-sized causal transformer (``transformers.GPT2LMHeadModel`` built from a
  ``GPT2Config``: 12 layers, width 768, 12 heads, vocabulary 50257; 124M parameters; no download) in
  **bf16 weights**, eager attention, random tokens (sequence 256, batch 8), SGD lr 1e-3, the monitor
  every 4 steps on 32 probe sequences with its default ``dtype="float32"`` (float32 products of the
  bf16 model): the same numbers as above. Then a short run with SDPA attention, reporting whether its
  measurements succeed (double backward through fused attention kernels) or what the monitor said.

Two parts run only when named in ``--parts``: ``gpt2_monitor_nocache`` (the GPT-2 run with
``SharpnessMonitor(cache_graphs=False)``: the memory lever) and ``mlp_warm_profile`` (``torch.profiler``
over one warm measurement of the MLP, with the solve and the tracker update timed apart: where the
host-side time of a warm measurement goes).

Run::

    python benchmarks/gpu_scale.py --json gpu_scale.json            # on a CUDA machine
    python benchmarks/gpu_scale.py --parts gpt2_train,gpt2_monitor_nocache,mlp_warm_profile --json next.json
    python benchmarks/gpu_scale.py --quick --json /tmp/quick.json   # tiny sizes, CPU or GPU: a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from bench_monitor import _Recorder
from bench_scale import _lightning_module, count_parameters, count_pyhessian_products, make_model, synthetic_cifar
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rpe import SharpnessMonitor
from lightning_rpe.curvature import HessianOperator, eigenpairs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _fresh() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if CUDA else None


def _allocated() -> int | None:
    return int(torch.cuda.memory_allocated()) if CUDA else None


def _fit(module: pl.LightningModule, loader: DataLoader, steps: int, callbacks: list[Any]) -> float:
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="gpu" if CUDA else "cpu", devices=1,
                         callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    _sync()
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    _sync()
    return time.perf_counter() - t0


def _summary(monitor: SharpnessMonitor, recorder: Any) -> dict[str, Any]:
    """The monitor's measurements of a run (``bench_monitor._Recorder``): all rows, the cold one, the
    medians of the warm ones, each with its time in gradient-equivalents."""
    rows = [{"step": m.step, "n_hvp": m.n_hvp, "seconds": m.seconds, "grad_seconds": g, "grad_eq": m.seconds / g,
             "lambda_max": m.eigenvalues[0], "lambda_min": m.lambda_min}
            for m, g in zip(recorder.measurements, recorder.grad_times)]
    warm = rows[1:]
    return {
        "n_skipped": monitor.n_skipped,
        "backend": None if monitor.latest is None else monitor.latest.backend,
        "measurements": rows,
        "cold_n_hvp": rows[0]["n_hvp"] if rows else None,
        "cold_seconds": rows[0]["seconds"] if rows else None,
        "warm_median_n_hvp": statistics.median(r["n_hvp"] for r in warm) if warm else None,
        "warm_median_grad_eq": statistics.median(r["grad_eq"] for r in warm) if warm else None,
        "warm_median_seconds": statistics.median(r["seconds"] for r in warm) if warm else None,
    }


def vision_run(name: str, quick: bool, steps: int, top_k: int | None) -> dict[str, Any]:
    """Training on ``name`` without (``top_k=None``) or with the monitor; peak CUDA memory and costs."""
    _fresh()
    probe_size = (64 if quick else 1000) if name == "mlp" else (32 if quick else 256)
    n_train = max(4 * 256, probe_size) if not quick else 512
    torch.manual_seed(0)
    model = make_model(name, quick)
    module = _lightning_module(model, lr=0.01)
    x, y = synthetic_cifar(n_train)
    loader = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=False)
    callbacks: list[Any] = []
    recorder = monitor = None
    if top_k is not None:
        monitor = SharpnessMonitor(every_n_steps=2, probe="fixed", probe_size=probe_size, top_k=top_k)
        px, py = x[:probe_size].to(DEVICE), y[:probe_size].to(DEVICE)
        recorder = _Recorder(monitor, (px, py))
        callbacks = [monitor, recorder]
    start = _allocated()  # memory an earlier part left allocated counts in this part's peak: reported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wall = _fit(module, loader, steps, callbacks)
    out: dict[str, Any] = {"workload": name, "warnings": _monitor_warnings(caught), "top_k": top_k, "n_params": count_parameters(model), "steps": steps,
                           "wall": wall, "peak_bytes": _peak(), "allocated_at_start": start}
    if monitor is not None and recorder is not None:
        out.update(_summary(monitor, recorder))
    return out


def _monitor_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return sorted({str(w.message)[:400] for w in caught if "SharpnessMonitor" in str(w.message)})[:8]


def lambda_max_versus_pyhessian(name: str, quick: bool) -> dict[str, Any]:
    """lambda_max at tol 1e-4 (ours) against PyHessian's default top-1, same model and probe set, on DEVICE."""
    _fresh()
    probe_size = (64 if quick else 1000) if name == "mlp" else (32 if quick else 256)
    torch.manual_seed(0)
    model = make_model(name, quick).to(DEVICE)
    x, y = synthetic_cifar(max(probe_size, 512))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(20):  # leave the initialisation, as the other parts do
        i = (step * 256) % x.shape[0]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 256].to(DEVICE)), y[i : i + 256].to(DEVICE)).backward()
        opt.step()
    del opt
    model.eval()
    batch = (x[:probe_size].to(DEVICE), y[:probe_size].to(DEVICE))

    def loss_fn(m: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    out: dict[str, Any] = {"workload": name}
    _fresh()
    base = _allocated()
    _sync()
    t0 = time.perf_counter()
    res = eigenpairs(HessianOperator(model, loss_fn, [batch]), k=1, which="largest", tol=1e-4)
    _sync()
    out["ours"] = {"wall": time.perf_counter() - t0, "n_hvp": res.n_hvp, "value": res.lambda_max,
                   "converged": res.all_converged,
                   "peak_increase": None if base is None else _peak() - base}  # type: ignore[operator]
    ref = eigenpairs(HessianOperator(model, loss_fn, [batch]), k=1, which="largest", tol=1e-6, max_hvp=300)
    out["reference"] = {"value": ref.lambda_max, "converged": ref.all_converged, "n_hvp": ref.n_hvp}
    try:
        count = count_pyhessian_products()
        from pyhessian import hessian
    except ImportError as err:
        out["pyhessian"] = {"error": f"not importable: {err}"}
        return out
    _fresh()
    base = _allocated()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _sync()
        t0 = time.perf_counter()
        h = hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=CUDA)
        values, _ = h.eigenvalues(top_n=1)
        _sync()
        wall = time.perf_counter() - t0
    out["pyhessian"] = {"wall": wall, "n_hvp": count[0], "value": float(values[0]),
                        "peak_increase": None if base is None else _peak() - base}  # type: ignore[operator]
    for key in ("ours", "pyhessian"):
        out[key]["rel_error"] = abs(out[key]["value"] - ref.lambda_max) / abs(ref.lambda_max)
    out["time_ratio"] = out["ours"]["wall"] / out["pyhessian"]["wall"]
    if CUDA:
        out["memory_ratio"] = out["ours"]["peak_increase"] / max(out["pyhessian"]["peak_increase"], 1)
    return out


def warm_profile(quick: bool) -> dict[str, Any]:
    """Where one warm measurement of the MLP spends its time: ``torch.profiler`` (CPU and CUDA) over
    the third measurement of a monitored run; the top operators by self CPU time and the monitor's
    own phases (solve, tracker update) by wall time."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_rpe.geometry import EigenvectorTracker
    from lightning_rpe.measure import MeasureSettings, solve

    _fresh()
    torch.manual_seed(0)
    probe_size = 64 if quick else 1000
    model = make_model("mlp", quick).to(DEVICE)
    x, y = synthetic_cifar(max(probe_size, 512))
    batches = [(x[i : i + 256].to(DEVICE), y[i : i + 256].to(DEVICE)) for i in range(0, probe_size, 256)]

    def loss_fn(m: nn.Module, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker, settings, phases = EigenvectorTracker(), MeasureSettings(), []
    for k in range(3):
        for b in batches[:2]:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, b).backward()
            opt.step()
        prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])) if k == 2 else None
        if prof is not None:
            prof.__enter__()
        _sync()
        t0 = time.perf_counter()
        res = solve(model, loss_fn, batches, settings, step=k, warm=tracker, check=k == 0)
        _sync()
        t1 = time.perf_counter()
        tracker.update(k, res.top_vectors, res.min_vector, k=1, gaps=res.gaps)
        t2 = time.perf_counter()
        if prof is not None:
            prof.__exit__(None, None, None)
        phases.append({"n_hvp": res.n_hvp, "solve_seconds": t1 - t0, "tracker_seconds": t2 - t1})
    assert prof is not None
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {"phases": phases, "profile_top": table}


def _warm_phases(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batches: list[Any],
                 train: Callable[[], None]) -> dict[str, Any]:
    """Three measurements (``measure.solve`` + ``EigenvectorTracker.update``) with training steps between
    them; the third under ``cProfile`` (host-side time per function, CUDA synchronised at the end of each
    phase, so a wait is charged to the call that blocks): the solve and the tracker timed apart."""
    import cProfile
    import io
    import pstats

    from lightning_rpe.geometry import EigenvectorTracker
    from lightning_rpe.measure import MeasureSettings, solve

    tracker, settings, phases = EigenvectorTracker(), MeasureSettings(), []
    texts: list[str] = []
    for k in range(3):
        train()
        prof = cProfile.Profile() if k >= 1 else None
        _sync()
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        res = solve(model, loss_fn, batches, settings, step=k, warm=tracker, check=k == 0)
        _sync()
        t1 = time.perf_counter()
        tracker.update(k, res.top_vectors, res.min_vector, k=1, gaps=res.gaps)
        _sync()
        t2 = time.perf_counter()
        if prof is not None:
            prof.disable()
            for key, rows in (("tottime", 25), ("cumulative", 45)):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(rows)
                texts.append(f"measurement {k}, by {key}:\n" + buf.getvalue()[-7000:])
        phases.append({"n_hvp": res.n_hvp, "solve_seconds": t1 - t0, "tracker_seconds": t2 - t1,
                       "vector_device": str(res.top_vectors.device)})
    return {"phases": phases, "cprofile": texts}


def gpt2_warm_profile(quick: bool) -> dict[str, Any]:
    """:func:`_warm_phases` on the GPT-2 of :func:`gpt2_run` (bf16 weights, float32 products)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _fresh()
    torch.manual_seed(0)
    sizes = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 64} if quick else {
        "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    cfg = GPT2Config(**sizes, attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    seq, batch, probe = (32, 4, 8) if quick else (256, 8, 32)
    net = GPT2LMHeadModel(cfg).to(torch.bfloat16).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (probe, seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    batches = [(ids[i : i + batch],) for i in range(0, probe, batch)]
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def loss_fn(m: nn.Module, b: Any) -> Tensor:
        return m(input_ids=b[0], labels=b[0]).loss

    def train() -> None:
        for b in batches[:2]:
            opt.zero_grad(set_to_none=True)
            loss_fn(net, b).backward()
            opt.step()

    return {"n_params": count_parameters(net), **_warm_phases(net, loss_fn, batches, train)}


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM trained on random tokens; ``compute_loss`` is what the monitor measures."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def compute_loss(self, batch: Any) -> Tensor:
        (ids,) = batch
        return self.net(input_ids=ids, labels=ids).loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.compute_loss(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def gpt2_run(quick: bool, attn: str, steps: int, monitor_on: bool, cache_graphs: bool | None = None) -> dict[str, Any]:
    """GPT-2-small-sized causal LM in bf16 weights, float32 products; peak CUDA memory and costs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _fresh()
    torch.manual_seed(0)
    # no dropout: the measured loss is deterministic
    sizes = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 64, "bos_token_id": 0,
             "eos_token_id": 0} if quick else {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                                               "n_positions": 1024}
    cfg = GPT2Config(**sizes, attn_implementation=attn, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    seq, batch, probe = (32, 4, 8) if quick else (256, 8, 32)
    net = GPT2LMHeadModel(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (max(8 * batch, probe), seq), generator=g)
    loader = DataLoader(TensorDataset(ids), batch_size=batch, shuffle=False)
    module = CausalLM(net, lr=1e-3)
    callbacks: list[Any] = []
    monitor = recorder = None
    if monitor_on:
        monitor = SharpnessMonitor(every_n_steps=4, probe="fixed", probe_size=probe, cache_graphs=cache_graphs)
        pid = ids[:probe].to(DEVICE)
        recorder = _Recorder(monitor, (pid,))
        callbacks = [monitor, recorder]
    start = _allocated()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wall = _fit(module, loader, steps, callbacks)
    out: dict[str, Any] = {"allocated_at_start": start, "attn": net.config._attn_implementation, "monitor": monitor_on, "n_params": count_parameters(net), "steps": steps,
                           "dtype": str(next(net.parameters()).dtype), "wall": wall, "peak_bytes": _peak(),
                           "warnings": _monitor_warnings(caught)}
    if monitor is not None and recorder is not None:
        out.update(_summary(monitor, recorder))
    return out


def guarded(name: str, fn: Callable[[], dict[str, Any]], results: dict[str, Any], deadline: float,
            parts: set[str] | None = None) -> None:
    if parts is not None and name not in parts:
        return
    if time.perf_counter() > deadline:
        results[name] = {"skipped": "out of time"}
        print(f"== {name}: skipped (out of time)", flush=True)
        return
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # a failing part is reported, the others still run
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    results[name]["part_seconds"] = time.perf_counter() - t0
    short = {k: v for k, v in results[name].items() if k not in ("measurements", "traceback", "cprofile", "profile_top")}
    print(f"== {name}: {json.dumps(short, default=str)[:1500]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--json", default="", help="write all results here")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; parts not started by then are skipped")
    p.add_argument("--steps", type=int, default=12, help="training steps of the vision runs (monitor every 2)")
    p.add_argument("--parts", default="", help="comma-separated subset of the parts (default: all), e.g. "
                   "resnet_train,resnet_monitor,gpt2_train,gpt2_monitor")
    args = p.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    deadline = time.perf_counter() + args.budget
    results: dict[str, Any] = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if CUDA else "cpu",
                               "quick": args.quick}
    print(f"torch {torch.__version__}, device {results['device']}", flush=True)
    q, steps = args.quick, args.steps
    parts = set(args.parts.split(",")) if args.parts else None
    for name in ("mlp", "resnet"):
        guarded(f"{name}_train", lambda n=name: vision_run(n, q, steps, None), results, deadline, parts)
        guarded(f"{name}_monitor", lambda n=name: vision_run(n, q, steps, 1), results, deadline, parts)
    guarded("gpt2_train", lambda: gpt2_run(q, "eager", 12, False), results, deadline, parts)
    guarded("gpt2_monitor", lambda: gpt2_run(q, "eager", 12, True), results, deadline, parts)
    for name in ("mlp", "resnet"):
        guarded(f"{name}_top5", lambda n=name: vision_run(n, q, steps, 5), results, deadline, parts)
        guarded(f"{name}_pyhessian", lambda n=name: lambda_max_versus_pyhessian(n, q), results, deadline, parts)
    guarded("gpt2_sdpa_monitor", lambda: gpt2_run(q, "sdpa", 4, True), results, deadline, parts)
    # not in the default run (name them in --parts): the memory lever and where a warm measurement's time goes
    if parts is not None:
        guarded("gpt2_monitor_nocache", lambda: gpt2_run(q, "eager", 12, True, cache_graphs=False), results, deadline,
                parts)
        guarded("mlp_warm_profile", lambda: warm_profile(q), results, deadline, parts)
        guarded("gpt2_warm_profile", lambda: gpt2_warm_profile(q), results, deadline, parts)
    for name in ("mlp", "resnet", "gpt2"):
        base = results.get(f"{name}_train", {}).get("peak_bytes")
        for run, key in (("monitor", "peak_ratio"), ("top5", "top5_peak_ratio"), ("monitor_nocache", "nocache_peak_ratio")):
            peak = results.get(f"{name}_{run}", {}).get("peak_bytes")
            if base and peak:
                results[f"{name}_{key}"] = peak / base
    print("== ratios:", {k: round(v, 3) for k, v in results.items() if k.endswith("_ratio")}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
