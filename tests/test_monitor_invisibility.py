"""Measuring is invisible: a run with the SharpnessMonitor ends bit-identical to a run without it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lit_models import TinyMLP, TrainingStepOnly, make_dataset, make_loader, make_trainer

from lightning_rpe import SharpnessMonitor


def _state(model: pl.LightningModule, trainer: pl.Trainer) -> dict[str, object]:
    opt = trainer.optimizers[0].state_dict()
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "opt_state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for i, s in opt["state"].items()},
        "opt_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def _run(model_factory, monitor: SharpnessMonitor | None, **trainer_kwargs):
    pl.seed_everything(123, verbose=False)
    model = model_factory()
    loader = make_loader(make_dataset(32, seed=1), batch_size=8, shuffle=True)
    trainer = make_trainer([monitor] if monitor is not None else [], **trainer_kwargs)
    trainer.fit(model, loader)
    return _state(model, trainer)


def _assert_identical(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model entry {k} differs"
    assert a["opt_state"].keys() == b["opt_state"].keys()
    for i in a["opt_state"]:
        for k, v in a["opt_state"][i].items():
            w = b["opt_state"][i][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, f"optimizer state {i}/{k} differs"
    assert a["opt_groups"] == b["opt_groups"]
    assert torch.equal(a["rng"], b["rng"]), "global RNG stream differs"
    assert a["training"] == b["training"]


def _aliased_block(**kwargs) -> TinyMLP:
    """A submodule registered twice (``self.alias = self.net[0]``, as ``nn.ModuleList([block] * 3)``)."""
    model = TinyMLP(**kwargs)
    model.alias = model.net[0]
    return model


CASES = {
    # PyTorch's stateless reparametrization left the snapshot tensors in place of a doubly
    # registered module's parameters: the optimizer stepped objects the model no longer used.
    "submodule_registered_twice_adam": (
        lambda: _aliased_block(optimizer="adam", lr=0.01),
        dict(every_n_steps=1, top_k=1, probe_size=16),
        dict(max_epochs=2),
    ),
    "batchnorm_dropout_momentum": (
        lambda: TinyMLP(batchnorm=True, dropout=0.2, optimizer="momentum", lr=0.05),
        dict(every_n_steps=1, top_k=2, probe_size=16),
        dict(max_epochs=2),
    ),
    "grad_accumulation_adam": (
        lambda: TinyMLP(batchnorm=True, dropout=0.2, optimizer="adam", lr=0.01),
        dict(every_n_steps=1, top_k=1, probe_size=16),
        dict(max_epochs=2, accumulate_grad_batches=2),
    ),
    "bf16_mixed": (
        lambda: TinyMLP(batchnorm=True, dropout=0.2, optimizer="nesterov", lr=0.05),
        dict(every_n_steps=2, top_k=1, probe_size=16),
        dict(max_epochs=2, precision="bf16-mixed"),
    ),
    "batch_probe_batch_statistics_dropout_on": (
        lambda: TinyMLP(batchnorm=True, dropout=0.2, optimizer="sgd", lr=0.05),
        dict(every_n_steps=1, probe="batch", batchnorm="batch", dropout="on"),
        dict(max_epochs=2),
    ),
    "training_step_recall": (
        lambda: TrainingStepOnly(batchnorm=True, dropout=0.2, optimizer="adamw", lr=0.01),
        dict(every_n_epochs=1, use_training_step=True, probe_size=16),
        dict(max_epochs=2),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_monitor_is_invisible(case: str) -> None:
    factory, monitor_kwargs, trainer_kwargs = CASES[case]
    baseline = _run(factory, None, **trainer_kwargs)
    monitor = SharpnessMonitor(**monitor_kwargs)
    measured = _run(factory, monitor, **trainer_kwargs)
    assert monitor.n_measurements >= 2 and monitor.n_skipped == 0, (monitor.n_measurements, monitor.n_skipped)
    _assert_identical(baseline, measured)


def test_accumulation_measures_only_after_optimizer_steps() -> None:
    """With accumulate_grad_batches=2 and 4 batches/epoch, optimizer steps happen every 2nd batch."""
    pl.seed_everything(0, verbose=False)
    seen: list[int] = []

    class Spy(SharpnessMonitor):
        def _run(self, trainer, pl_module, batches, trigger):  # record the steps measured
            seen.append(trainer.global_step)
            super()._run(trainer, pl_module, batches, trigger)

    monitor = Spy(every_n_steps=1, on_fit_start=False, on_fit_end=False, probe_size=8)
    trainer = make_trainer([monitor], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(TinyMLP(), make_loader(make_dataset(32), batch_size=8))
    assert trainer.global_step == 4
    assert seen == [1, 2, 3, 4]
