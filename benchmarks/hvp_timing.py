"""Measure the cost of one Hessian-vector product per AD path, in units of one gradient.

Run ``python benchmarks/hvp_timing.py [--threads N] [--examples N] [--repeats N]``.
Prints, for three workloads shaped like the bundled digits data (8x8 inputs, 10 classes; random
values, since only the cost matters), the time of one product divided by the time of one
gradient of the same loss (plain ``torch.autograd.grad`` on the model), for:

* ``autograd`` with cached graphs (the default), one vector and a block of 8 (time / 8);
* ``autograd`` without the cache (graph rebuilt per product), one vector and a block of 8;
* ``func`` (``vmap(jvp(grad))``), one vector and a block of 8.

The first product of a cached operator (which builds the graphs) is excluded and reported
separately as ``build``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_rpe.curvature import HessianOperator


def _workloads() -> dict[str, tuple[nn.Module, Callable]]:
    torch.manual_seed(0)
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 32), nn.ReLU(), nn.Linear(32, 10),
    )
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))

    def mse(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return ((model(x) - F.one_hot(y, 10).to(x.dtype)) ** 2).sum(1).mean()

    def ce(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return {"tanh MLP + MSE": (small, mse), "CNN + CE": (cnn, ce), "MLP 64-512-512-10 + MSE": (wide, mse)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn: Callable[[], object], repeats: int, device: torch.device | None = None) -> float:
    device = torch.device("cpu") if device is None else device
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, 1, 8, 8, generator=gen).to(device)
    y = torch.randint(0, 10, (args.examples,), generator=gen).to(device)
    batches = [(x, y)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, {args.examples} examples, float32, best of {args.repeats}")
    print("columns: time per product / time of one gradient; ag-c = autograd with cached graphs, ag = autograd "
          "rebuilding the graph per product, func = vmap(jvp(grad)); 1 = one vector, 8 = block of 8 (per column); "
          "build = first product of ag-c (builds the graphs)")
    header = f"{'workload':26s} {'params':>7s} {'grad ms':>8s} {'build':>6s} {'ag-c 1':>7s} {'ag-c 8':>7s} {'ag 1':>6s} {'ag 8':>6s} {'func 1':>7s} {'func 8':>7s}"
    print(header)
    workloads = _workloads()
    warm_model, warm_loss = workloads["tanh MLP + MSE"]
    warm_model.to(device)
    for backend in ("autograd", "func"):  # first-call overheads (imports, kernel selection) excluded
        HessianOperator(warm_model, warm_loss, batches, backend=backend).matmat(
            torch.ones(sum(p.numel() for p in warm_model.parameters()), 2, device=device)
        )
    for name, (model, loss_fn) in workloads.items():
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]

        def gradient() -> None:
            torch.autograd.grad(loss_fn(model, batches[0]), params)

        t_grad = _best(gradient, args.repeats, device)
        ieee = ""
        if device.type == "cuda":  # products run with TF32 off: time an IEEE float32 gradient too
            flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            try:
                ieee = f"  (IEEE float32 gradient: {_best(gradient, args.repeats, device) * 1e3:.2f} ms)"
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        row = []
        dim = sum(p.numel() for p in params)
        v1 = torch.randn(dim, 1, generator=gen).to(device)
        v8 = torch.randn(dim, 8, generator=gen).to(device)
        cached = HessianOperator(model, loss_fn, batches, backend="autograd", cache_graphs=True)
        _sync(device)
        t0 = time.perf_counter()
        cached.matmat(v1)
        _sync(device)
        build = time.perf_counter() - t0
        row.append(_best(lambda: cached.matmat(v1), args.repeats, device))
        row.append(_best(lambda: cached.matmat(v8), args.repeats, device) / 8)
        plain = HessianOperator(model, loss_fn, batches, backend="autograd", cache_graphs=False)
        row.append(_best(lambda: plain.matmat(v1), args.repeats, device))
        row.append(_best(lambda: plain.matmat(v8), args.repeats, device) / 8)
        func = HessianOperator(model, loss_fn, batches, backend="func")
        row.append(_best(lambda: func.matmat(v1), args.repeats, device))
        row.append(_best(lambda: func.matmat(v8), args.repeats, device) / 8)
        cells = " ".join(f"{t / t_grad:7.2f}" for t in row)
        print(f"{name:26s} {dim:7d} {t_grad * 1e3:8.2f} {build / t_grad:6.2f} {cells}{ieee}")


if __name__ == "__main__":
    main()
