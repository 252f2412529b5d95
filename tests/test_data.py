"""Data modules: split, standardisation, batching, error messages."""

import pytest
import torch

from lightning_rpe.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    standardize,
)


def test_digits_split_is_deterministic_and_disjoint():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert a.n_train == 1000 and len(a.test_set) == 797
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[1], c.train_set.tensors[1])
    # no sample is in both splits: compare raw rows via sklearn
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().data, dtype=torch.float32)
    perm = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))
    assert set(perm[:1000].tolist()).isdisjoint(perm[1000:].tolist())
    x, y = a.full_train_batch()
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (1000, 64)
    assert set(y.unique().tolist()) == set(range(10))


def test_digits_standardised_with_train_statistics():
    dm = DigitsDataModule(n_train=500, seed=3)
    dm.setup()
    x, _ = dm.full_train_batch()
    std = x.std(0)
    assert torch.allclose(x.mean(0), torch.zeros(64), atol=1e-5)
    # constant pixels stay zero, the others have unit spread
    assert torch.all(((std - 1).abs() < 1e-4) | (std == 0))
    assert not torch.isnan(dm.full_test_batch()[0]).any()


def test_full_batch_and_minibatch_loaders():
    dm = DigitsDataModule()
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and batches[0][0].shape == (1000, 64)
    assert torch.equal(batches[0][0], dm.full_train_batch()[0])  # full batch is not shuffled
    dm = DigitsDataModule(batch_size=128, drop_last=True, seed=5)
    dm.setup()
    e1 = list(dm.train_dataloader())
    e2 = list(dm.train_dataloader())
    assert len(e1) == 1000 // 128 and all(b[0].shape == (128, 64) for b in e1)
    assert not torch.equal(e1[0][1], e2[0][1])  # reshuffled each epoch
    # shuffling uses a private generator: the global RNG is untouched and the order is seeded
    state = torch.get_rng_state()
    dm2 = DigitsDataModule(batch_size=128, drop_last=True, seed=5)
    dm2.setup()
    assert torch.equal(next(iter(dm2.train_dataloader()))[1], e1[0][1])
    assert torch.equal(torch.get_rng_state(), state)
    val = list(dm.val_dataloader())
    assert sum(len(b[1]) for b in val) == 797


def test_digits_images_for_cnn():
    dm = DigitsDataModule(flatten=False, n_train=100)
    dm.setup()
    assert dm.full_train_batch()[0].shape == (100, 1, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_train": 0}, "n_train"), ({"n_train": 1797}, "n_train"), ({"batch_size": 0}, "batch_size"),
     ({"batch_size": 2.5}, "batch_size"), ({"seed": "x"}, "seed")],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"^DigitsDataModule: {match} must be"):
        DigitsDataModule(**kwargs)


def test_standardize_per_channel():
    x = torch.randn(10, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 2
    (z,) = standardize(x, dims=(0, 2, 3))
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("cls", [FashionMNISTDataModule, CIFAR10DataModule])
def test_torchvision_modules_fail_clearly(cls, tmp_path):
    dm = cls(root=str(tmp_path))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision"):
            dm.prepare_data()
        return
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup()


def test_torchvision_modules_validate_sizes():
    with pytest.raises(ValueError, match="n_train"):
        CIFAR10DataModule(n_train=60000)
    with pytest.raises(ValueError, match="n_test"):
        FashionMNISTDataModule(n_test=0)
    assert CIFAR10DataModule().n_train_requested == 5120
    assert FashionMNISTDataModule().n_train_requested == 1000
