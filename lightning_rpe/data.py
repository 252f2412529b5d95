"""Data modules for the experiments lightning-rpe is built for.

* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits (1797 images, no network needed).
  The default experiment of the package: the first ``n_train`` samples of a seeded permutation
  are the training set, the rest the validation and test set.
* :class:`FashionMNISTDataModule` and :class:`CIFAR10DataModule`: the paper's data sets through
  torchvision (an optional dependency). Nothing is downloaded unless ``download=True``.

All modules hold their data as in-memory tensors: inputs ``float32`` (standardised with the
training set's mean and standard deviation), targets ``int64`` class indices. Models decide
whether the loss is MSE on one-hot targets or cross-entropy. ``batch_size=None`` means full batch
(one optimizer step per epoch = gradient descent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lightning_rpe.validation import check_bool, check_int, fail

__all__ = [
    "BatchedTensorDataset",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "TensorDataModule",
    "collate_stacked",
    "standardize",
]


def standardize(train: Tensor, *others: Tensor, dims: tuple[int, ...] = (0,)) -> tuple[Tensor, ...]:
    """Standardise with the training set's statistics: ``(x - mean_train) / std_train``.

    ``dims`` are the dimensions the statistics are taken over (``(0,)`` per feature,
    ``(0, 2, 3)`` per image channel). Features with zero spread (constant pixels) keep ``std = 1``
    so they become exactly zero instead of NaN.
    """
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((x - mean) / std for x in (train, *others))


class _StackedBatch(tuple):
    """A batch already gathered by :meth:`BatchedTensorDataset.__getitems__`."""


class BatchedTensorDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` whose ``__getitems__`` gathers a batch with one
    index operation per tensor (the DataLoader then skips the per-sample collate).

    ``dataset[i]`` is a tuple of tensors as usual; use it with ``collate_fn=collate_stacked``.
    """

    def __getitems__(self, indices: list[int]) -> _StackedBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return _StackedBatch(t[idx] for t in self.tensors)


def collate_stacked(data: Any) -> Any:
    """Collate for :class:`BatchedTensorDataset`: gathered batches pass through (as a list, like
    ``default_collate`` returns for tuple samples); lists of samples go to ``default_collate``.
    """
    if isinstance(data, _StackedBatch):
        return list(data)
    return default_collate(data)



class TensorDataModule(pl.LightningDataModule):
    """Base class: train / val / test splits held as tensors, fast batching.

    Subclasses implement :meth:`_load` returning ``(x_train, y_train, x_test, y_test)``. The
    validation and the test loader both serve the held-out split.

    Args:
        batch_size: training batch size; ``None`` = the whole training set in one batch (full-batch
            gradient descent, one optimizer step per epoch).
        eval_batch_size: batch size for validation and test (``None`` = whole split at once).
        shuffle: reshuffle the training set every epoch (irrelevant for full batch). The order is
            drawn from a private generator seeded with ``seed``, so it does not depend on, or
            consume, the global random state.
        drop_last: drop the last incomplete training batch.
        seed: seed of the data split and the shuffling.
    """

    def __init__(
        self,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "batch_size", batch_size, minimum=1, allow_none=True)
        check_int(owner, "eval_batch_size", eval_batch_size, minimum=1, allow_none=True)
        check_int(owner, "seed", seed)
        check_bool(owner, "shuffle", shuffle)
        check_bool(owner, "drop_last", drop_last)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self._generator: torch.Generator | None = None

    # -- to implement -------------------------------------------------------------------------
    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- LightningDataModule -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_train, y_train, x_test, y_test = self._load()
        self.train_set = BatchedTensorDataset(x_train, y_train)
        self.test_set = BatchedTensorDataset(x_test, y_test)
        self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def n_train(self) -> int:
        """Number of training samples (after :meth:`setup`)."""
        self._require_setup()
        return len(self.train_set)  # type: ignore[arg-type]

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before using the data")

    def _loader(self, dataset: TensorDataset, batch_size: int | None, shuffle: bool, drop_last: bool) -> DataLoader:
        size = len(dataset) if batch_size is None else min(batch_size, len(dataset))
        # A standard DataLoader (Lightning can insert its DistributedSampler, callbacks can read
        # batch_size and collate_fn); the data set gathers a whole batch in one indexing operation.
        # The private generator drives the shuffling and the workers' base seed, so iterating the
        # loader neither reads nor advances the global random state.
        return DataLoader(dataset, batch_size=size, shuffle=shuffle, drop_last=drop_last,
                          collate_fn=collate_stacked, generator=self._generator)

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        full = self.batch_size is None or self.batch_size >= len(self.train_set)  # type: ignore[arg-type]
        return self._loader(self.train_set, self.batch_size, self.shuffle and not full, self.drop_last)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_set, self.eval_batch_size, False, False)  # type: ignore[arg-type]

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def full_train_batch(self) -> tuple[Tensor, Tensor]:
        """The whole training set as one ``(x, y)`` batch (for probes and quick checks)."""
        self._require_setup()
        return self.train_set.tensors  # type: ignore[union-attr,return-value]

    def full_test_batch(self) -> tuple[Tensor, Tensor]:
        """The whole held-out split as one ``(x, y)`` batch."""
        self._require_setup()
        return self.test_set.tensors  # type: ignore[union-attr,return-value]


class DigitsDataModule(TensorDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1797 samples, 10 classes), no download.

    A permutation drawn with ``seed`` splits the data: its first ``n_train`` samples train, the
    remaining ``1797 - n_train`` (797 by default) are the validation and test set. Inputs are the
    64 pixel intensities standardised per pixel with the training set's statistics (``flatten``),
    or images of shape ``(1, 8, 8)`` for convolutional models (``flatten=False``); targets are
    class indices.

    Args:
        n_train: training samples, 1 to 1796.
        batch_size: ``None`` (default) = full batch, i.e. gradient descent.
        flatten: ``True`` gives ``(N, 64)`` inputs, ``False`` gives ``(N, 1, 8, 8)``.
        seed: seed of the split (and of shuffling when ``batch_size`` is set).
        eval_batch_size, shuffle, drop_last: see :class:`TensorDataModule`.
    """

    N_TOTAL = 1797

    def __init__(
        self,
        n_train: int = 1000,
        batch_size: int | None = None,
        flatten: bool = True,
        seed: int = 0,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, shuffle=shuffle,
                         drop_last=drop_last, seed=seed)
        check_int(type(self).__name__, "n_train", n_train, minimum=1)
        if n_train >= self.N_TOTAL:
            raise fail(type(self).__name__, "n_train",
                       f"an int from 1 to {self.N_TOTAL - 1} (the rest is the test set)", n_train)
        self.n_train_requested = n_train
        self.flatten = bool(flatten)
        self.save_hyperparameters()

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("DigitsDataModule needs scikit-learn: pip install scikit-learn "
                              "(or pip install 'lightning-rpe[examples]')") from err
        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32)
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        train_idx, test_idx = perm[: self.n_train_requested], perm[self.n_train_requested:]
        x_train, x_test = standardize(x[train_idx], x[test_idx])
        if not self.flatten:
            x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
        return x_train.contiguous(), y[train_idx], x_test.contiguous(), y[test_idx]


def _torchvision_datasets() -> Any:
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise ImportError("this data module needs torchvision, which is not installed: "
                          "pip install torchvision (or pip install 'lightning-rpe[vision]')") from err
    return tvd


class _TorchvisionDataModule(TensorDataModule):
    _NAME = ""
    _TRAIN_SIZE = 0
    _TEST_SIZE = 0

    def __init__(self, root: str, download: bool, n_train: int, n_test: int, flatten: bool,
                 batch_size: int | None, eval_batch_size: int | None, shuffle: bool, drop_last: bool,
                 seed: int) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, shuffle=shuffle,
                         drop_last=drop_last, seed=seed)
        owner = type(self).__name__
        for name, value, size in (("n_train", n_train, self._TRAIN_SIZE), ("n_test", n_test, self._TEST_SIZE)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= size:
                raise fail(owner, name, f"an int from 1 to {size} ({self._NAME})", value)
        self.root = str(root)
        self.download = bool(download)
        self.n_train_requested = n_train
        self.n_test_requested = n_test
        self.flatten = bool(flatten)

    def _dataset(self, tvd: Any, train: bool) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_data(self) -> None:
        # Runs on one process only: the single place a download may happen.
        tvd = _torchvision_datasets()
        if self.download:
            self._dataset(tvd, train=True)
            self._dataset(tvd, train=False)

    def _open(self, tvd: Any, train: bool) -> Any:
        try:
            return self._dataset(tvd, train=train)
        except RuntimeError as err:
            if self.download:
                raise
            raise FileNotFoundError(
                f"{self._NAME} was not found under {Path(self.root).resolve()} and download=False; "
                f"pass download=True (--data.download true) to fetch it, or set root to where it is"
            ) from err

    @staticmethod
    def _images(data: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tvd = _torchvision_datasets()
        train, test = self._open(tvd, True), self._open(tvd, False)
        # The paper's subsets: the first n samples in the data set's own order.
        x_train = self._images(train.data)[: self.n_train_requested]
        x_test = self._images(test.data)[: self.n_test_requested]
        y_train = torch.as_tensor(train.targets, dtype=torch.int64)[: self.n_train_requested]
        y_test = torch.as_tensor(test.targets, dtype=torch.int64)[: self.n_test_requested]
        x_train, x_test = standardize(x_train, x_test, dims=(0, 2, 3))  # per channel
        if self.flatten:
            x_train, x_test = x_train.flatten(1), x_test.flatten(1)
        return x_train.contiguous(), y_train, x_test.contiguous(), y_test


class FashionMNISTDataModule(_TorchvisionDataModule):
    """Fashion-MNIST through torchvision; the paper trained on its first 1000 images.

    Images are scaled to [0, 1] and standardised with the training subset's mean and standard
    deviation; ``flatten=True`` (default, for MLPs) gives ``(N, 784)`` inputs, else
    ``(N, 1, 28, 28)``. Nothing is downloaded unless ``download=True``; without the files a
    :class:`FileNotFoundError` says so.

    Args:
        root: directory holding (or receiving) the torchvision files.
        download: fetch the data set if it is not under ``root``.
        n_train: the first ``n_train`` training images (default 1000, as in the paper).
        n_test: the first ``n_test`` test images (default 2000).
        flatten, batch_size, eval_batch_size, shuffle, drop_last, seed: see
            :class:`TensorDataModule` and :class:`DigitsDataModule`.
    """

    _NAME = "Fashion-MNIST"
    _TRAIN_SIZE = 60000
    _TEST_SIZE = 10000

    def __init__(self, root: str = "data", download: bool = False, n_train: int = 1000, n_test: int = 2000,
                 flatten: bool = True, batch_size: int | None = None, eval_batch_size: int | None = None,
                 shuffle: bool = True, drop_last: bool = False, seed: int = 0) -> None:
        super().__init__(root, download, n_train, n_test, flatten, batch_size, eval_batch_size, shuffle,
                         drop_last, seed)
        self.save_hyperparameters()

    def _dataset(self, tvd: Any, train: bool) -> Any:
        return tvd.FashionMNIST(self.root, train=train, download=self.download)

    @staticmethod
    def _images(data: Any) -> Tensor:
        return torch.as_tensor(data, dtype=torch.float32).div(255.0).unsqueeze(1)  # (N, 1, 28, 28)


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 through torchvision; the paper used the first 5120 training and 2000 test images.

    Images are scaled to [0, 1] and standardised per channel with the training subset's
    statistics, shape ``(N, 3, 32, 32)`` (``flatten=True`` gives ``(N, 3072)``). Nothing is
    downloaded unless ``download=True``.

    Args:
        root: directory holding (or receiving) the torchvision files.
        download: fetch the data set if it is not under ``root``.
        n_train: the first ``n_train`` training images (default 5120).
        n_test: the first ``n_test`` test images (default 2000).
        flatten, batch_size, eval_batch_size, shuffle, drop_last, seed: see
            :class:`TensorDataModule`.
    """

    _NAME = "CIFAR-10"
    _TRAIN_SIZE = 50000
    _TEST_SIZE = 10000

    def __init__(self, root: str = "data", download: bool = False, n_train: int = 5120, n_test: int = 2000,
                 flatten: bool = False, batch_size: int | None = None, eval_batch_size: int | None = 1000,
                 shuffle: bool = True, drop_last: bool = False, seed: int = 0) -> None:
        super().__init__(root, download, n_train, n_test, flatten, batch_size, eval_batch_size, shuffle,
                         drop_last, seed)
        self.save_hyperparameters()

    def _dataset(self, tvd: Any, train: bool) -> Any:
        return tvd.CIFAR10(self.root, train=train, download=self.download)

    @staticmethod
    def _images(data: Any) -> Tensor:
        # torchvision stores CIFAR-10 as a (N, 32, 32, 3) uint8 numpy array.
        return torch.as_tensor(data, dtype=torch.float32).div(255.0).permute(0, 3, 1, 2)
