"""Why the ResNet's float32 products on a GPU miss float64 finite differences by 2e-3 (issue 12 GPU run).

verify_operator on the bench_scale ResNet (1,007,210 parameters, probe 256 synthetic CIFAR samples)
at initialisation, BatchNorm with running statistics (``batchnorm="eval"``, HessianOperator's
default) and with batch statistics (``"batch"``, the monitor's default), for the func and autograd
paths in float32 and float64, with cuDNN as configured, with ``cudnn.deterministic=True`` and with
cuDNN disabled. ``--quick``: batch statistics, autograd only.

Run: ``python benchmarks/gpu_conv_precision.py`` (CUDA; on the CPU it runs the same checks).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from bench_scale import make_model, synthetic_cifar

from lightning_rpe.curvature import HessianOperator
from lightning_rpe.curvature.verify import verify_operator


def main() -> None:
    quick = "--quick" in sys.argv
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = make_model("resnet", quick=not torch.cuda.is_available()).to(dev)
    x, y = synthetic_cifar(256)
    batch = (x.to(dev), y.to(dev))

    def loss_fn(m: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    for label, flags in (("cudnn default", {}), ("cudnn deterministic", {"deterministic": True}),
                         ("cudnn off", {"enabled": False})):
        saved = {k: getattr(torch.backends.cudnn, k) for k in flags}
        for k, v in flags.items():
            setattr(torch.backends.cudnn, k, v)
        for bn, dtype, backend in [(bn, d, b) for bn in (("batch",) if quick else ("eval", "batch"))
                                   for d in (torch.float32, torch.float64)
                                   for b in (("autograd",) if quick else ("func", "autograd"))]:
                t0 = time.perf_counter()
                r = verify_operator(HessianOperator(model, loss_fn, [batch], dtype=dtype, backend=backend, batchnorm=bn))
                print(f"{label:20s} bn={bn:5s} {str(dtype):14s} {backend:9s} verdict={r.verdict:12s} rel_error={r.rel_error:.3e} "
                      f"tol={r.tolerance:.0e} asym={r.asymmetry:.1e} ({time.perf_counter() - t0:.1f} s)", flush=True)
        for k, v in saved.items():
            setattr(torch.backends.cudnn, k, v)


if __name__ == "__main__":
    main()
