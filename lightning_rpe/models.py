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
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RPEClassifier", "MLPClassifier", "SmallCNN", "OPTIMIZERS", "LOSSES", "ACTIVATIONS", "build_optimizer"]

OPTIMIZERS = ("sgd", "adam", "adamw", "clipped_adam")
LOSSES = ("mse", "cross_entropy")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU}
CLIP_MODES = ("upper", "lower")


def _choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in accepted)}; got {value!r}")
    return value.lower()


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
    name = _choice("optimizer", optimizer, OPTIMIZERS)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if name == "sgd":
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    betas = (float(betas[0]), float(betas[1]))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    from lightning_rpe.optim import ClippedAdam

    mode = _choice("clip_mode", clip_mode, CLIP_MODES)
    return ClippedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip, mode=mode)


class RPEClassifier(pl.LightningModule):
    """Base class: a classifier with ``compute_loss``, accuracy logging and a named optimizer.

    Subclasses build ``self.net`` (inputs -> logits). Logged: ``train_loss`` (every step),
    ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc`` (accuracy in [0, 1]).

    Args:
        loss: ``"mse"`` (squared error on one-hot targets, summed over the classes, averaged over
            the samples) or ``"cross_entropy"``.
        optimizer, lr, momentum, nesterov, betas, eps, weight_decay, clip, clip_mode: see
            :func:`build_optimizer`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        loss: str = "mse",
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 1.0,
        clip_mode: str = "upper",
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.loss_name = _choice("loss", loss, LOSSES)
        self.optimizer_name = _choice("optimizer", optimizer, OPTIMIZERS)
        _choice("clip_mode", clip_mode, CLIP_MODES)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not clip > 0:
            raise ValueError(f"clip must be positive, got {clip!r}")
        self._optim_kwargs = dict(lr=float(lr), momentum=float(momentum), nesterov=bool(nesterov),
                                  betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                                  weight_decay=float(weight_decay), clip=float(clip), clip_mode=clip_mode)

    # -- loss --------------------------------------------------------------------------------------
    def loss_from_logits(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean loss of a batch of logits ``(N, C)`` against class indices ``(N,)``."""
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(logits, y)
        onehot = F.one_hot(y, self.num_classes).to(logits.dtype)
        return (logits - onehot).pow(2).sum(dim=1).mean()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def compute_loss(self, batch: Any) -> Tensor:
        """Mean training loss of ``batch = (x, y)``: the function whose Hessian the monitor measures."""
        x, y = batch[0], batch[1]
        return self.loss_from_logits(self(x), y)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss_from_logits(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=len(y))
        self.log(f"{stage}_acc", acc, on_step=on_step, on_epoch=not on_step, prog_bar=stage != "train",
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
        activation: str = "tanh",
        bias: bool = True,
        num_classes: int = 10,
        loss: str = "mse",
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 1.0,
        clip_mode: str = "upper",
    ) -> None:
        super().__init__(num_classes=num_classes, loss=loss, optimizer=optimizer, lr=lr, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip,
                         clip_mode=clip_mode)
        self.save_hyperparameters()
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim <= 0:
            raise ValueError(f"input_dim must be a positive integer, got {input_dim!r}")
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise ValueError(f"hidden must be a sequence of positive integers, got {hidden!r}")
        act = ACTIVATIONS[_choice("activation", activation, tuple(ACTIVATIONS))]
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
        activation: str = "relu",
        num_classes: int = 10,
        loss: str = "cross_entropy",
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 1.0,
        clip_mode: str = "upper",
    ) -> None:
        super().__init__(num_classes=num_classes, loss=loss, optimizer=optimizer, lr=lr, momentum=momentum,
                         nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip,
                         clip_mode=clip_mode)
        self.save_hyperparameters()
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3 or min(input_shape) <= 0:
            raise ValueError(f"input_shape must be (channels, height, width) of positive integers, got {input_shape!r}")
        channels = tuple(channels)
        if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive integers, got {channels!r}")
        act = ACTIVATIONS[_choice("activation", activation, tuple(ACTIVATIONS))]
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
