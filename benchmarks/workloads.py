"""Workloads shared by the benchmark scripts and their smoke test.

All workloads use scikit-learn's bundled 8x8 digits (no download): the first ``n_samples``
images (1000 by default), standardised per pixel with their own mean and standard deviation
(constant pixels stay 0). Models are plain ``nn.Module`` objects so that every reference library
can be called on them directly.

==========  =========================================  ==========  =====================
name        architecture                               parameters  loss
==========  =========================================  ==========  =====================
mlp_small   64-32-32-10, tanh                          3,466       MSE on one-hot
cnn         conv3x3(16)-ReLU-conv3x3(32)-ReLU-maxpool  24,684      cross-entropy
            -linear(512, 38)-ReLU-linear(38, 10)
mlp_wide    64-512-512-10, tanh                        301,066     MSE on one-hot
==========  =========================================  ==========  =====================

The MSE convention is the one of :mod:`lightning_rpe.models`:
``L = (1/N) sum_i ||f(x_i) - e_{y_i}||^2`` (squared error summed over classes, mean over samples). It is
written with elementary operations, not ``F.mse_loss``, so that every library's
forward-over-reverse path can differentiate it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "WORKLOADS",
    "DigitsGD",
    "SquaredError",
    "Workload",
    "build_workload",
    "count_parameters",
    "load_digits_tensors",
    "make_model",
    "oracle_lanczos",
    "product_prices",
]

WORKLOADS = ("mlp_small", "cnn", "mlp_wide")


class SquaredError(nn.Module):
    """``(1/N) sum_i ||output_i - onehot(y_i)||^2`` for integer class targets ``y``.

    ``reduction = "mean"`` (over samples) is what curvlinops reads to weight batches.
    """

    reduction = "mean"

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        onehot = F.one_hot(target, self.num_classes).to(output.dtype)
        return (output - onehot).pow(2).sum(dim=1).mean()


class _Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


def make_model(name: str, width: int | None = None) -> nn.Module:
    """Build the (float32, seeded-by-caller) model of workload ``name``.

    ``width`` shrinks the hidden widths for smoke tests (``None`` = the benchmark sizes).
    """
    if name == "mlp_small":
        h = width or 32
        return nn.Sequential(nn.Linear(64, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    if name == "mlp_wide":
        h = width or 512
        return nn.Sequential(nn.Linear(64, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    if name == "cnn":
        c1, c2, fc = (16, 32, 38) if width is None else (max(2, width // 4), max(2, width // 2), width)
        return nn.Sequential(
            _Reshape(1, 8, 8),
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(c2 * 16, fc), nn.ReLU(), nn.Linear(fc, 10),
        )
    raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_digits_tensors(n_samples: int = 1000) -> tuple[Tensor, Tensor]:
    """First ``n_samples`` digits as ``(x (n, 64) float32 standardised, y (n,) int64)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data[:n_samples], dtype=torch.float32)
    y = torch.as_tensor(digits.target[:n_samples], dtype=torch.int64)
    std = x.std(dim=0, keepdim=True)
    x = (x - x.mean(dim=0, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    return x.contiguous(), y.contiguous()


@dataclass
class Workload:
    """A model at a fixed point, its criterion and its probe batch ``(x, y)``.

    ``loss_fn(model, batch)`` is the lightning-rpe loss signature; ``criterion(output, y)`` the
    PyHessian / curvlinops one (the same function).
    """

    name: str
    model: nn.Module
    criterion: nn.Module
    x: Tensor
    y: Tensor
    pretrain_steps: int
    pretrain_lr: float

    @property
    def batch(self) -> tuple[Tensor, Tensor]:
        return (self.x, self.y)

    @property
    def n_params(self) -> int:
        return count_parameters(self.model)

    def loss_fn(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return self.criterion(model(x), y)

    def gradient(self) -> list[Tensor]:
        """One gradient of the mean loss over the probe batch (the cost unit of the benchmarks)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss = self.loss_fn(self.model, self.batch)
        return list(torch.autograd.grad(loss, params))

    def to(self, dtype: torch.dtype) -> Workload:
        """A deep copy in ``dtype`` (model and inputs; targets stay integer)."""
        return Workload(self.name, copy.deepcopy(self.model).to(dtype), self.criterion, self.x.to(dtype),
                        self.y, self.pretrain_steps, self.pretrain_lr)


PRETRAIN = {"mlp_small": (100, 0.05), "cnn": (50, 0.05), "mlp_wide": (100, 0.02)}


def build_workload(name: str, n_samples: int = 1000, width: int | None = None, seed: int = 0,
                   pretrain_steps: int | None = None) -> Workload:
    """Seeded model, its digits probe batch, and a short full-batch GD warm-up.

    The warm-up (``pretrain_steps`` GD steps, default 100, at a learning rate well below the
    stability threshold) moves the model off its initialisation, so the spectra have the
    outliers of a model in training rather than the degenerate ones at init.
    """
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = make_model(name, width)
    torch.random.set_rng_state(gen_state)
    criterion: nn.Module = nn.CrossEntropyLoss() if name == "cnn" else SquaredError()
    x, y = load_digits_tensors(n_samples)
    steps, lr = PRETRAIN[name]
    if pretrain_steps is not None:
        steps = pretrain_steps
    w = Workload(name, model, criterion, x, y, steps, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        grads = w.gradient()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=lr)
    return w


def workload_loss(w: Workload) -> Callable[[nn.Module, Any], Tensor]:
    return w.loss_fn


class DigitsGD:
    """``lightning_rpe.models.MLPClassifier()`` (64-200-200-10 tanh, MSE, 55k parameters) on the first
    1000 digits training samples, trained by plain full-batch GD: the setting of the monitor
    benchmarks, without Lightning's loop. ``gd(n)`` takes ``n`` steps at ``lr``; ``loss_fn`` is the
    model's own ``compute_loss``; ``gradient_time(n)`` is the median of ``n`` timed gradients."""

    def __init__(self, lr: float = 0.05, seed: int = 0) -> None:
        import lightning.pytorch as pl

        from lightning_rpe.data import DigitsDataModule
        from lightning_rpe.models import MLPClassifier

        pl.seed_everything(seed, verbose=False)
        self.model = MLPClassifier(lr=lr)
        dm = DigitsDataModule(n_train=1000)
        dm.setup("fit")
        self.batch = next(iter(dm.train_dataloader()))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.lr = lr

    @staticmethod
    def loss_fn(module: nn.Module, batch: Any) -> Tensor:
        return module.compute_loss(batch)

    def gd(self, n: int) -> None:
        for _ in range(n):
            grads = torch.autograd.grad(self.model.compute_loss(self.batch), self.params)
            with torch.no_grad():
                for p, g in zip(self.params, grads):
                    p.sub_(g, alpha=self.lr)

    def gradient_time(self, n: int = 3) -> float:
        import statistics
        import time

        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            torch.autograd.grad(self.model.compute_loss(self.batch), self.params)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def oracle_lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> list[tuple[Tensor, Tensor]]:
    """Ritz values and residual norms after 1..``steps`` products of Lanczos from ``v0``.

    Plain Lanczos with full re-orthogonalisation (twice), in ``v0``'s dtype; used by the oracle
    benchmarks, which compare Ritz values with a known answer instead of stopping on them. Entry
    ``m - 1`` holds ``(theta, residual)`` after ``m`` products: ``theta`` ascending, shape ``(m,)``,
    and ``residual[i] = ||A y_i - theta_i y_i|| = beta_m |s_i[-1]|`` (Paige's formula, ``s_i`` the
    eigenvectors of the tridiagonal matrix). The largest Ritz value of the Krylov space
    ``K_m(A, v0)`` is the largest Rayleigh quotient over it, so no method that builds its iterates
    from ``m`` products starting at ``v0`` (power iteration included) has a larger estimate of
    lambda_max after ``m`` products (likewise for the smallest). Stops early at an invariant subspace.
    """
    q = v0 / v0.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    out: list[tuple[Tensor, Tensor]] = []
    for _ in range(steps):
        w = matvec(basis[-1])
        alphas.append(float(w @ basis[-1]))
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        out.append((theta, beta * S[-1].abs()))
        if beta <= 1e-12 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis.append(w / beta)
    return out


def product_prices(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any,
                   repeats: int = 7) -> tuple[float, float, float]:
    """Seconds of one gradient, one graph build (``HessianOperator.loss_and_gradient``) and one
    product on the built graph, float32, median of ``repeats`` after one warm-up call each."""
    import statistics
    import time

    from lightning_rpe.curvature import HessianOperator

    def median_time(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    params = [p for p in model.parameters() if p.requires_grad]
    gradient = median_time(lambda: torch.autograd.grad(loss_fn(model, batch), params))
    build = median_time(lambda: HessianOperator(model, loss_fn, [batch]).loss_and_gradient())
    operator = HessianOperator(model, loss_fn, [batch])
    operator.loss_and_gradient()
    v = torch.randn(operator.dim)
    return gradient, build, median_time(lambda: operator.matvec(v))
