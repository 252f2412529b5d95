"""Small LightningModules for studying training instabilities.

Every model here has a ``compute_loss(batch)`` method: the mean training loss of a batch, as a
differentiable function of the parameters. :class:`~lightning_rpe.SharpnessMonitor` uses it to
build the Hessian, so the curvature it measures is the curvature of exactly the loss that is
trained.

Losses (``loss=``):

* ``"mse"``: squared error on one-hot targets, ``L = (1/N) sum_i ||f(x_i) - e_{y_i}||^2`` (sum over
  the classes, mean over the samples), the loss of the edge-of-stability literature. Cohen et al.
  (2021) use half of it: their sharpness is half of this one, and the same trajectory appears at
  twice the learning rate.
* ``"cross_entropy"``: mean softmax cross-entropy.

Optimizers: ``optimizer=`` names a simple default (``"sgd"``, ``"adam"``, ``"adamw"``,
``"clipped_adam"``) built from the model's own arguments (``lr``, ``momentum``, ``nesterov``,
``betas``, ``eps``, ``weight_decay``, ``clip``, ``clip_mode``). With LightningCLI a top-level
``optimizer:`` / ``lr_scheduler:`` section in the YAML replaces this default (LightningCLI then
overrides ``configure_optimizers`` and says so in a warning).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_rpe.callbacks import SharpnessMonitor, _logging
from lightning_rpe.optim import ClippedAdam
from lightning_rpe.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    fail,
)

__all__ = ["ACTIVATIONS", "LOSSES", "OPTIMIZERS", "MLPClassifier", "RPEClassifier", "SmallCNN", "build_optimizer"]

OptimizerName = Literal["sgd", "adam", "adamw", "clipped_adam"]
LossName = Literal["mse", "cross_entropy"]
ActivationName = Literal["tanh", "relu", "gelu", "elu", "silu"]
ClipMode = Literal["upper", "lower"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
LOSSES: tuple[str, ...] = get_args(LossName)
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU}
CLIP_MODES: tuple[str, ...] = get_args(ClipMode)


def _choice(owner: str, name: str, value: Any, accepted: Sequence[str]) -> str:
    """``check_choice`` that also accepts other letter cases (``"SGD"`` is ``"sgd"``)."""
    return str(check_choice(owner, name, value.lower() if isinstance(value, str) else value, tuple(accepted)))


def build_optimizer(
    params: Any,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    clip_mode: str = "upper",
) -> torch.optim.Optimizer:
    """Build an optimizer from a name.

    * ``"sgd"``: ``torch.optim.SGD(lr, momentum, nesterov, weight_decay)``; with ``momentum=0``
      and full batches this is gradient descent (stability threshold ``2 / lr``).
    * ``"adam"`` / ``"adamw"``: ``torch.optim.Adam`` / ``AdamW(lr, betas, eps, weight_decay)``.
    * ``"clipped_adam"``: :class:`lightning_rpe.optim.ClippedAdam` with denominator clip ``clip``
      and ``clip_mode`` (``"upper"`` restores instabilities, ``"lower"`` is the stable control).
    """
    owner = "build_optimizer"
    name = _choice(owner, "optimizer", optimizer, OPTIMIZERS)
    check_float(owner, "lr", lr, minimum=0.0, inclusive=False)
    if name == "sgd":
        _check_momentum(owner, momentum)
        if nesterov and momentum == 0:
            raise fail(owner, "nesterov", "False when momentum is 0 (Nesterov needs momentum > 0)", nesterov)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    betas = (float(betas[0]), float(betas[1]))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    mode = _choice(owner, "clip_mode", clip_mode, CLIP_MODES)
    return ClippedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip, mode=mode)


def _check_momentum(owner: str, momentum: Any) -> float:
    value = check_float(owner, "momentum", momentum, minimum=0.0)
    if value is None or value >= 1:
        raise fail(owner, "momentum", "a float in [0, 1)", momentum)
    return value


class RPEClassifier(pl.LightningModule):
    """Base class: a classifier with ``compute_loss``, accuracy logging and a named optimizer.

    Subclasses build ``self.net`` (inputs -> logits). Logged: ``train_loss``, ``train_acc``,
    ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc`` (accuracy in [0, 1], torchmetrics'
    ``MulticlassAccuracy`` with micro averaging: the fraction of correct predictions, aggregated
    over batches and processes).

    ``train_loss`` goes to the loggers at every optimizer step when ``log_loss_every_step`` is True,
    or when it is None (default) and a :class:`~lightning_rpe.SharpnessMonitor` is in the Trainer:
    at the edge of stability the loss oscillates with period 2, which Lightning's default cadence
    (``log_every_n_steps``, 50) aliases. Otherwise it follows ``log_every_n_steps``.

    Args:
        loss: ``"mse"`` (squared error on one-hot targets, summed over the classes, averaged over
            the samples) or ``"cross_entropy"``.
        optimizer, lr, momentum, nesterov, betas, eps, weight_decay, clip, clip_mode: see
            :func:`build_optimizer`.
        log_loss_every_step: see above (None = every step when a SharpnessMonitor is present).

    Raises:
        ValueError: a bad argument, naming the class, the parameter and the accepted values.
    """

    def __init__(
        self,
        num_classes: int = 10,
        loss: LossName = "mse",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 1.0,
        clip_mode: ClipMode = "upper",
        log_loss_every_step: bool | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_classes = int(check_int(owner, "num_classes", num_classes, minimum=2))  # type: ignore[arg-type]
        self.loss_name = _choice(owner, "loss", loss, LOSSES)
        self.optimizer_name = _choice(owner, "optimizer", optimizer, OPTIMIZERS)
        mode = _choice(owner, "clip_mode", clip_mode, CLIP_MODES)
        check_float(owner, "lr", lr, minimum=0.0, inclusive=False)
        _check_momentum(owner, momentum)
        check_bool(owner, "nesterov", nesterov)
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise fail(owner, "betas", "two floats in [0, 1)", betas)
        check_float(owner, "eps", eps, minimum=0.0)
        check_float(owner, "weight_decay", weight_decay, minimum=0.0)
        check_float(owner, "clip", clip, minimum=0.0, inclusive=False)
        if log_loss_every_step is not None:
            check_bool(owner, "log_loss_every_step", log_loss_every_step)
        self.log_loss_every_step = log_loss_every_step
        self._loss_every_step = False
        self._optim_kwargs: dict[str, Any] = {
            "lr": float(lr), "momentum": float(momentum), "nesterov": bool(nesterov),
            "betas": (float(betas[0]), float(betas[1])), "eps": float(eps), "weight_decay": float(weight_decay),
            "clip": float(clip), "clip_mode": mode}
        # one accuracy per stage (torchmetrics aggregates over batches and, under DDP, over processes)
        self.train_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    # -- loss --------------------------------------------------------------------------------------
    def loss_from_logits(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean loss of a batch of logits ``(N, C)`` against class indices ``(N,)``."""
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(logits, y)
        onehot = F.one_hot(y, self.num_classes).to(logits.dtype)
        return (logits - onehot).pow(2).sum(dim=1).mean()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[operator]

    def compute_loss(self, batch: Any) -> Tensor:
        """Mean training loss of ``batch = (x, y)``: the function whose Hessian the monitor measures."""
        x, y = batch[0], batch[1]
        return self.loss_from_logits(self(x), y)

    def on_train_start(self) -> None:
        every = self.log_loss_every_step
        if every is None:
            every = any(isinstance(c, SharpnessMonitor) for c in self.trainer.callbacks)  # type: ignore[attr-defined]
        self._loss_every_step = bool(every)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss_from_logits(logits, y)
        metric: MulticlassAccuracy = {"train": self.train_acc, "val": self.val_acc, "test": self.test_acc}[stage]
        metric(logits.detach(), y)
        on_step = stage == "train"
        every_step = on_step and self._loss_every_step
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=len(y), logger=not every_step)
        if every_step:
            # at every optimizer step, not every log_every_n_steps: the edge-of-stability loss
            # oscillates with period 2, which a coarser cadence aliases
            _logging.log_to_loggers(self.trainer, {f"{stage}_loss": float(loss.detach())},
                                    step=_logging.batches_that_stepped(self.trainer))
        self.log(f"{stage}_acc", metric, on_step=on_step, on_epoch=not on_step, prog_bar=stage != "train",
                 batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class indices of ``batch = (x, ...)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.parameters(), self.optimizer_name, **self._optim_kwargs)


class MLPClassifier(RPEClassifier):
    """Fully connected classifier ``input_dim -> hidden... -> num_classes``.

    The defaults are the package's reference experiment: a 64-200-200-10 tanh network with MSE on
    one-hot targets trained by full-batch gradient descent at ``lr = 0.05`` on the digits data.
    The paper's Fashion-MNIST model is ``input_dim=784, hidden=(32, 32, 32)``.

    Args:
        input_dim: number of input features (64 for digits, 784 for Fashion-MNIST).
        hidden: widths of the hidden layers (empty = a linear model).
        activation: ``"tanh"``, ``"relu"``, ``"gelu"``, ``"elu"`` or ``"silu"``.
        bias: use biases in the linear layers.
        num_classes, loss, optimizer, ...: see :class:`RPEClassifier`.
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden: Sequence[int] = (200, 200),
        activation: ActivationName = "tanh",
        bias: bool = True,
        num_classes: int = 10,
        loss: LossName = "mse",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 1.0,
        clip_mode: ClipMode = "upper",
        log_loss_every_step: bool | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, loss=loss, optimizer=optimizer, lr=lr, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip,
                         clip_mode=clip_mode, log_loss_every_step=log_loss_every_step)
        self.save_hyperparameters()
        owner = type(self).__name__
        check_int(owner, "input_dim", input_dim, minimum=1)
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise fail(owner, "hidden", "a sequence of positive ints (empty = a linear model)", hidden)
        act = ACTIVATIONS[_choice(owner, "activation", activation, tuple(ACTIVATIONS))]
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h, bias=bias), act()]
            width = h
        layers.append(nn.Linear(width, num_classes, bias=bias))
        self.net = nn.Sequential(*layers)


class SmallCNN(RPEClassifier):
    """A small VGG-style convolutional classifier for 8x8 digits or 32x32 CIFAR-10 images.

    Each entry of ``channels`` is a block ``conv3x3 -> [BatchNorm] -> activation -> [2x2 max-pool]``
    (pooling while the feature map is larger than 2x2), followed by global average pooling and a
    linear layer. Flat inputs (``(N, prod(input_shape))``, e.g. the digits module's default) are
    reshaped to ``input_shape``.

    Args:
        input_shape: ``(channels, height, width)`` of one image; ``(1, 8, 8)`` for digits,
            ``(3, 32, 32)`` for CIFAR-10.
        channels: output channels of the convolution blocks (the paper's small VGG used widths
            8/16/32).
        batch_norm: insert BatchNorm after every convolution (the monitor measures with BatchNorm in
            eval mode by default).
        activation: ``"relu"`` (default), ``"tanh"``, ``"gelu"``, ``"elu"`` or ``"silu"``.
        num_classes, loss, optimizer, ...: see :class:`RPEClassifier` (default loss here:
            cross-entropy).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        channels: Sequence[int] = (16, 32),
        batch_norm: bool = False,
        activation: ActivationName = "relu",
        num_classes: int = 10,
        loss: LossName = "cross_entropy",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 1.0,
        clip_mode: ClipMode = "upper",
        log_loss_every_step: bool | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, loss=loss, optimizer=optimizer, lr=lr, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip,
                         clip_mode=clip_mode, log_loss_every_step=log_loss_every_step)
        self.save_hyperparameters()
        owner = type(self).__name__
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3 or min(input_shape) <= 0:
            raise fail(owner, "input_shape", "(channels, height, width) of positive ints", input_shape)
        channels = tuple(channels)
        if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise fail(owner, "channels", "a non-empty sequence of positive ints", channels)
        check_bool(owner, "batch_norm", batch_norm)
        act = ACTIVATIONS[_choice(owner, "activation", activation, tuple(ACTIVATIONS))]
        self.input_shape = input_shape
        layers: list[nn.Module] = []
        in_c, size = input_shape[0], min(input_shape[1:])
        for c in channels:
            layers.append(nn.Conv2d(in_c, c, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(act())
            if size > 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            in_c = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_c, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.reshape(-1, *self.input_shape)
        return self.net(x)
