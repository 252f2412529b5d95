"""Models: shapes, losses, optimizers, logging, argument checks."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_rpe.data import DigitsDataModule
from lightning_rpe.models import MLPClassifier, SmallCNN, build_optimizer


def _batch(n=16, d=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_mlp_architecture_and_mse_loss():
    m = MLPClassifier()
    shapes = [tuple(p.shape) for p in m.parameters()]
    assert shapes == [(200, 64), (200,), (200, 200), (200,), (10, 200), (10,)]
    x, y = _batch()
    logits = m(x)
    expected = ((logits - F.one_hot(y, 10).float()) ** 2).sum(1).mean()
    assert torch.allclose(m.compute_loss((x, y)), expected)
    ce = MLPClassifier(loss="cross_entropy", hidden=(8,), activation="relu")
    assert torch.allclose(ce.compute_loss((x, y)), F.cross_entropy(ce(x), y))


def test_paper_fashion_mlp_shape():
    m = MLPClassifier(input_dim=784, hidden=(32, 32, 32))
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == 784 * 32 + 32 + 2 * (32 * 32 + 32) + 330


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("bn", [False, True])
def test_small_cnn(shape, bn):
    m = SmallCNN(input_shape=shape, channels=(8, 16, 32), batch_norm=bn)
    x = torch.randn(4, *shape)
    assert m(x).shape == (4, 10)
    assert m(x.flatten(1)).shape == (4, 10)  # flat inputs are reshaped
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules()) == bn
    loss = m.compute_loss((x, torch.arange(4)))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize(
    "name, kwargs, cls",
    [("sgd", {}, torch.optim.SGD), ("sgd", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD),
     ("adam", {"betas": (0.8, 0.99)}, torch.optim.Adam), ("adamw", {"weight_decay": 0.01}, torch.optim.AdamW)],
)
def test_named_optimizers(name, kwargs, cls):
    m = MLPClassifier(optimizer=name, lr=0.01, hidden=(4,), **kwargs)
    opt = m.configure_optimizers()
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.01
    for k, v in kwargs.items():
        assert group[k] == (tuple(v) if isinstance(v, tuple) else v)


def test_clipped_adam_optimizer():
    pytest.importorskip("lightning_rpe.optim.clipped_adam")
    from lightning_rpe.optim import ClippedAdam

    m = MLPClassifier(optimizer="clipped_adam", lr=5e-3, betas=(0.9, 0.99), clip=10.0, hidden=(4,))
    opt = m.configure_optimizers()
    assert isinstance(opt, ClippedAdam)
    assert opt.param_groups[0]["lr"] == 5e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [({"loss": "l1"}, "loss"), ({"optimizer": "rmsprop"}, "optimizer"), ({"activation": "sigmoid"}, "activation"),
     ({"lr": 0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"hidden": (0,)}, "hidden"), ({"clip": 0}, "clip"),
     ({"clip_mode": "both"}, "clip_mode"), ({"num_classes": 1}, "num_classes")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"^MLPClassifier: {match} must be"):
        MLPClassifier(**kwargs)


def test_choices_accept_other_letter_cases_and_name_the_accepted_values():
    assert MLPClassifier(optimizer="SGD", loss="MSE", hidden=(4,)).optimizer_name == "sgd"
    with pytest.raises(ValueError, match=r"SmallCNN: activation must be one of 'tanh', 'relu', 'gelu', 'elu', 'silu'"):
        SmallCNN(activation="sigmoid")
    with pytest.raises(ValueError, match="build_optimizer: clip_mode must be one of 'upper', 'lower'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], "clipped_adam", clip_mode="both")


def test_accuracy_is_the_fraction_of_correct_predictions():
    pl.seed_everything(0)
    dm = DigitsDataModule(n_train=300, eval_batch_size=128)  # several test batches of unequal size
    m = MLPClassifier(hidden=(16,), lr=0.1)
    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(m, dm)
    (res,) = trainer.test(m, dm, verbose=False)
    x, y = dm.full_test_batch()
    with torch.no_grad():
        expected = (m(x).argmax(dim=1) == y).double().mean().item()
    assert res["test_acc"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("every, expected", [(None, list(range(8))), (False, [3, 7])])
def test_train_loss_every_step_with_a_monitor(tmp_path, every, expected):
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_rpe import SharpnessMonitor
    from lightning_rpe.report import load_run

    logger = TensorBoardLogger(str(tmp_path), name="", version="", default_hp_metric=False)
    m = MLPClassifier(hidden=(8,), log_loss_every_step=every)
    trainer = pl.Trainer(max_steps=8, max_epochs=-1, logger=logger, log_every_n_steps=4,
                         callbacks=[SharpnessMonitor(every_n_steps=4)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(m, DigitsDataModule(n_train=100))
    assert load_run(tmp_path).scalars["train_loss"].steps.tolist() == expected


def test_build_optimizer_rejects_nesterov_without_momentum():
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", nesterov=True)


def test_training_logs_and_learns():
    pl.seed_everything(0)
    dm = DigitsDataModule(n_train=300)
    m = MLPClassifier(hidden=(32,), lr=0.1)
    trainer = pl.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, check_val_every_n_epoch=60)
    trainer.fit(m, dm)
    metrics = trainer.callback_metrics
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(metrics)
    assert metrics["val_acc"] > 0.5
    preds = torch.cat(trainer.predict(m, dm))
    assert preds.shape == (1797 - 300,) and preds.dtype == torch.int64
    (res,) = trainer.test(m, dm, verbose=False)
    assert set(res) == {"test_loss", "test_acc"} and 0.5 < res["test_acc"] <= 1.0
