"""Cost and accuracy of finite-difference Hessian products on sharded (FSDP2) models, CPU, gloo.

Run::

    python benchmarks/sharded_products.py                 # cost (2 processes) and accuracy (1 process)
    python benchmarks/sharded_products.py --quick         # smaller model, fewer repeats

(1) Cost, 2 processes (gloo, ``torch.set_num_threads(1)`` per process): a ``--width`` tanh MLP
    64-W-W-10 with MSE, every Linear and the root sharded with ``fully_shard``; 256 examples per
    rank in one probe batch, float32. Times (median of ``--repeats`` after one warm-up): one
    gradient through the sharded module (forward + backward, all-gathers and reduce-scatter
    included), one ``ShardedHessianOperator.matvec``. The ratio product / gradient is the cost of a
    product in gradients. For scale, the same model unsharded in one process: the double-backward
    ``HessianOperator`` product (graphs cached) over one gradient, on rank 0's data alone.
(2) Accuracy, 1 process (the finite-difference arithmetic does not depend on the sharding; the
    2-process tests check that the sharded operator reproduces it): a 10-32-32-1 tanh MLP with
    MSE (1.4k parameters), lambda_max and lambda_min by Lanczos to ``tol=1e-10`` on the
    finite-difference operator for a ladder of ``eps``, in float32 and float64 parameters, against
    ``torch.linalg.eigvalsh`` of the dense float64 Hessian (double backward).
(3) Product accuracy, 1 process: float32 finite-difference products of 64-W-W-10 MLPs (256
    examples) against float64 double-backward products, relative error per direction for 3 random
    Gaussian directions and the top eigenvector (float64 finite-difference Lanczos), and the
    Rayleigh quotient's relative error along the top eigenvector, for a ladder of ``eps``; then
    ``sharded_eigenpairs(which="both")`` on the 26k MLP in float32 (default eps) at a ladder of
    ``tol``, against float64 (``tol=1e-6``): converged?, products, relative errors.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_rpe.curvature import HessianOperator
from lightning_rpe.curvature.sharded import ShardedHessianOperator, sharded_eigenpairs


def mlp(sizes: list[int], dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cost_worker(rank: int, port: int, width: int, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sizes = [64, width, width, 10]
        g = torch.Generator().manual_seed(rank)
        batch = (torch.randn(256, 64, generator=g), torch.randn(256, 10, generator=g))
        model = mlp(sizes, torch.float32)
        mesh = init_device_mesh("cpu", (2,))
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        op = ShardedHessianOperator(model, loss_fn, [batch])
        v = op.random_block(1, torch.Generator().manual_seed(0))[:, 0]

        def gradient() -> None:
            for p in model.parameters():
                p.grad = None
            loss_fn(model, batch).backward()

        t_grad = timed(gradient, repeats)
        t_prod = timed(lambda: op.matvec(v), repeats)
        one = torch.zeros(1, dtype=torch.float64)
        t_reduce = timed(lambda: dist.all_reduce(one), repeats)
        row = {"rank": rank, "params": op.total_dim, "local": op.dim, "grad_s": t_grad, "prod_s": t_prod,
               "reduce_s": t_reduce}
        if rank == 0:
            full = mlp(sizes, torch.float32)
            hop = HessianOperator(full, loss_fn, [batch], dtype=torch.float32, backend="autograd", cache_graphs=True)
            w = torch.randn(hop.dim)

            def plain_gradient() -> None:
                torch.autograd.grad(loss_fn(full, batch), list(full.parameters()))

            row["plain_grad_s"] = timed(plain_gradient, repeats)
            row["plain_prod_s"] = timed(lambda: hop.matvec(w), repeats)
        queue.put(row)
    finally:
        dist.destroy_process_group()


def accuracy(quick: bool) -> None:
    sizes = [10, 16, 16, 1] if quick else [10, 32, 32, 1]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, sizes[0], generator=g, dtype=torch.float64),
                torch.randn(64, 1, generator=g, dtype=torch.float64))]
    ref_model = mlp(sizes, torch.float64)
    dense = HessianOperator(ref_model, loss_fn, batches, dtype=torch.float64).to_dense()
    evals = torch.linalg.eigvalsh(dense)
    lmax, lmin = float(evals[-1]), float(evals[0])
    print(f"accuracy: tanh MLP {sizes} ({dense.shape[0]} params), 64 examples; dense float64 reference "
          f"lambda_max={lmax:.6g}, lambda_min={lmin:.6g}")
    print(f"{'params':>8} {'eps':>8} {'rel err lambda_max':>20} {'rel err lambda_min':>20}")
    for dtype, ladder in ((torch.float64, (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)), (torch.float32, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1))):
        model = mlp(sizes, dtype)
        data = [tuple(t.to(dtype) for t in b) for b in batches]
        for eps in ladder:
            op = ShardedHessianOperator(model, loss_fn, data, eps=eps, dtype=torch.float64)
            res = sharded_eigenpairs(op, k=1, which="both", tol=1e-10, max_hvp=min(op.total_dim, 300))
            print(f"{str(dtype).replace('torch.', ''):>8} {eps:8.0e} {abs(res.lambda_max - lmax) / abs(lmax):20.2e} "
                  f"{abs(res.lambda_min - lmin) / abs(lmin):20.2e}")


def product_accuracy(quick: bool) -> None:
    print("product accuracy: float32 FD products against float64 double backward, 256 examples")
    print(f"{'params':>8} {'eps':>8} {'rel err: random 1, 2, 3, top':>36} {'Rayleigh top':>14}")
    solves = []
    for sizes in ([64, 128, 128, 10],) if quick else ([64, 128, 128, 10], [64, 512, 512, 10]):
        g = torch.Generator().manual_seed(0)
        b64 = [(torch.randn(256, 64, generator=g, dtype=torch.float64),
                torch.randn(256, 10, generator=g, dtype=torch.float64))]
        b32 = [tuple(t.float() for t in b64[0])]
        m64, m32 = mlp(sizes, torch.float64), mlp(sizes, torch.float32)
        ref = HessianOperator(m64, loss_fn, b64, dtype=torch.float64)
        top = sharded_eigenpairs(ShardedHessianOperator(m64, loss_fn, b64), k=1, tol=1e-8, max_hvp=60)
        V = torch.cat([torch.randn(ref.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                       top.eigenvectors], 1)
        R = ref.matmat(V)
        for eps in (1e-2, 5e-3, 3e-3, 1e-3):
            out = ShardedHessianOperator(m32, loss_fn, b32, eps=eps, dtype=torch.float64).matmat(V)
            errs = ", ".join(f"{e:.1e}" for e in ((out - R).norm(dim=0) / R.norm(dim=0)).tolist())
            rq = abs(float(V[:, -1] @ out[:, -1]) - top.lambda_max) / top.lambda_max
            print(f"{ref.dim:>8} {eps:8.0e} {errs:>36} {rq:14.1e}")
        if sizes[1] == 128:
            solves.append((m64, m32, b64, b32))
    m64, m32, b64, b32 = solves[0]
    ref_both = sharded_eigenpairs(ShardedHessianOperator(m64, loss_fn, b64), k=1, which="both", tol=1e-6, max_hvp=400)
    print(f"float32 solves (which='both'), 26k MLP; float64 reference lambda_max={ref_both.eigenvalues[0]:.8g}, "
          f"lambda_min={ref_both.eigenvalues[1]:.8g} ({ref_both.n_hvp} products, converged "
          f"{ref_both.converged.tolist()})")
    for tol in (1e-3, 3e-4, 1e-4, 3e-5):
        res = sharded_eigenpairs(ShardedHessianOperator(m32, loss_fn, b32), k=1, which="both", tol=tol, max_hvp=300)
        errs = [abs(float(a) - float(b)) / abs(float(b)) for a, b in zip(res.eigenvalues, ref_both.eigenvalues)]
        print(f"  tol={tol:.0e}: converged {res.converged.tolist()}, {res.n_hvp} products, rel err lambda_max "
              f"{errs[0]:.1e}, lambda_min {errs[1]:.1e}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--accuracy-only", action="store_true", help="skip the 2-process cost measurement")
    args = parser.parse_args()
    width = args.width or (128 if args.quick else 512)
    repeats = args.repeats or (3 if args.quick else 10)
    print(f"torch {torch.__version__}, 1 thread per process")
    torch.set_num_threads(1)
    if args.accuracy_only:
        accuracy(args.quick)
        product_accuracy(args.quick)
        return
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(cost_worker, args=(free_port(), width, repeats, queue), nprocs=2, join=True)
    rows = sorted((queue.get() for _ in range(2)), key=lambda r: r["rank"])
    r0 = rows[0]
    print(f"cost: MLP 64-{width}-{width}-10 ({r0['params']} params), shards {[r['local'] for r in rows]}, "
          f"256 examples per rank, float32, median of {repeats}")
    for r in rows:
        print(f"  rank {r['rank']}: gradient {1e3 * r['grad_s']:.2f} ms, FD product {1e3 * r['prod_s']:.2f} ms, "
              f"product / gradient = {r['prod_s'] / r['grad_s']:.2f}; one 1-element all-reduce {1e3 * r['reduce_s']:.2f} ms")
    print(f"  unsharded, one process: gradient {1e3 * r0['plain_grad_s']:.2f} ms, double-backward product "
          f"{1e3 * r0['plain_prod_s']:.2f} ms, product / gradient = {r0['plain_prod_s'] / r0['plain_grad_s']:.2f}")
    accuracy(args.quick)
    product_accuracy(args.quick)


if __name__ == "__main__":
    main()
