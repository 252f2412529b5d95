"""Test-only LightningModules and data helpers (tiny, CPU, deterministic).

Shared by the SharpnessMonitor and InstabilityController tests. Nothing here is part of the
package API.

- :class:`TinyMLP`: a small MLP for regression (MSE) or classification (cross-entropy) with optional
  BatchNorm and dropout, a ``compute_loss(batch)`` method and a configurable optimizer
  (``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``, ``"adamw"``), optionally with two param
  groups at different learning rates.
- :class:`ABModel`: the two-parameter model ``L(a, b) = (a b)^2`` of docs/science.md.
- :func:`make_dataset`, :func:`make_loader`, :func:`full_batch_loader`: tiny synthetic data.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
TASKS = ("regression", "classification")


def make_dataset(
    n: int = 32, in_dim: int = 4, out_dim: int = 1, task: str = "regression", seed: int = 0
) -> TensorDataset:
    """``n`` samples ``x ~ N(0, 1)``; regression targets from a fixed random tanh teacher, or class labels."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, max(out_dim, 2), generator=g)
    if task == "regression":
        y = torch.tanh(x @ w[:, :out_dim]) + 0.1 * torch.randn(n, out_dim, generator=g)
    else:
        y = (x @ w).argmax(dim=1) % out_dim
    return TensorDataset(x, y)


def make_loader(dataset: TensorDataset, batch_size: int, shuffle: bool = False) -> DataLoader:
    """A plain single-process DataLoader (shuffling draws from the global RNG, as by default)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def full_batch_loader(n: int = 32, in_dim: int = 4, out_dim: int = 1, task: str = "regression", seed: int = 0) -> DataLoader:
    """One batch holding the whole data set (full-batch gradient descent: one step per epoch)."""
    return make_loader(make_dataset(n, in_dim, out_dim, task, seed), batch_size=n, shuffle=False)


def build_optimizer(params, name: str, lr: float, momentum: float = 0.9, betas=(0.9, 0.999), weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


class TinyMLP(pl.LightningModule):
    """``in_dim -> hidden (x depth) -> out_dim`` tanh MLP.

    Args:
        task: ``"regression"`` (MSE) or ``"classification"`` (cross-entropy; ``out_dim`` classes).
        batchnorm: insert ``BatchNorm1d`` after every hidden linear layer.
        dropout: dropout probability after every hidden activation (0 = none).
        optimizer: ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"`` or ``"adamw"``.
        group_lrs: if given (two floats), the first layer and the rest get separate param groups
            with these learning rates (``lr`` is ignored).
        log_metrics: log ``train_loss`` every step from ``training_step``.
    """

    def __init__(
        self,
        in_dim: int = 4,
        hidden: int = 8,
        out_dim: int = 1,
        depth: int = 2,
        task: str = "regression",
        batchnorm: bool = False,
        dropout: float = 0.0,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        group_lrs: Sequence[float] | None = None,
        log_metrics: bool = True,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden))
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.Tanh())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def compute_loss(self, batch) -> Tensor:
        x, y = batch
        out = self(x)
        if self.hparams.task == "regression":
            return ((out - y) ** 2).mean()
        return F.cross_entropy(out, y)

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        if self.hparams.log_metrics:
            self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        if h.group_lrs is not None:
            first = list(self.net[0].parameters())
            ids = {id(p) for p in first}
            rest = [p for p in self.parameters() if id(p) not in ids]
            params = [{"params": first, "lr": float(h.group_lrs[0])}, {"params": rest, "lr": float(h.group_lrs[1])}]
        else:
            params = self.parameters()
        return build_optimizer(params, h.optimizer, h.lr, h.momentum, h.betas, h.weight_decay)


class TrainingStepOnly(TinyMLP):
    """A TinyMLP without ``compute_loss``: the loss is only available through ``training_step``."""

    compute_loss = None  # type: ignore[assignment]

    def _loss(self, batch) -> Tensor:
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return {"loss": loss}


class ABModel(pl.LightningModule):
    """``L(a, b) = (a b)^2``: two scalar parameters, the batch is ignored (full-batch GD)."""

    def __init__(self, a: float = -0.1, b: float = 10.0, lr: float = 0.011) -> None:
        super().__init__()
        self.lr = lr
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def compute_loss(self, batch) -> Tensor:
        return (self.a * self.b) ** 2

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def ab_loader() -> DataLoader:
    """A one-sample loader for :class:`ABModel` (the sample is a dummy)."""
    return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def make_trainer(callbacks=(), **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer (no progress bar, summary or checkpointing unless asked)."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)
