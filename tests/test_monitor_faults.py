"""SharpnessMonitor faults (warned, skipped, training unchanged) and configuration errors."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import pytest
import torch
from lit_models import TinyMLP, TrainingStepOnly, full_batch_loader, make_trainer

from lightning_rpe import SharpnessMonitor


def _final_weights(monitor: SharpnessMonitor | None, steps: int = 5) -> dict[str, torch.Tensor]:
    pl.seed_everything(5, verbose=False)
    model = TinyMLP(batchnorm=True, dropout=0.1, optimizer="momentum")
    make_trainer([monitor] if monitor else [], max_steps=steps).fit(model, full_batch_loader(12))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _loss_failing_at(step: int, failure: str):
    def loss_fn(module, batch):
        loss = module.compute_loss(batch)
        if module.trainer.global_step == step:
            if failure == "nan":
                return loss * float("nan")
            if failure == "inf":
                return loss + float("inf")
            raise RuntimeError("boom inside the loss")
        return loss

    return loss_fn


@pytest.mark.parametrize("failure, message", [("nan", r"loss.*\bnan\b"), ("inf", r"loss.*\binf\b"),
                                              ("raise", "RuntimeError: boom inside the loss")])
def test_failed_measurement_is_warned_skipped_and_invisible(failure: str, message: str) -> None:
    baseline = _final_weights(None)
    monitor = SharpnessMonitor(every_n_steps=1, on_fit_start=False, probe_size=12,
                               loss_fn=_loss_failing_at(2, failure))
    with pytest.warns(UserWarning, match=rf"measurement at step 2 .*skipped: .*{message}") as record:
        weights = _final_weights(monitor)
    assert sum("skipped" in str(w.message) for w in record) == 1
    assert monitor.n_skipped == 1 and monitor.n_measurements == 4  # steps 1, 3, 4, 5
    assert monitor.latest.step == 5
    assert _same(baseline, weights)


def test_nan_without_gradient_pass_is_caught_by_the_solver() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, on_fit_start=False, probe_size=12, grad_alignment=False,
                               loss_fn=_loss_failing_at(3, "nan"))
    with pytest.warns(UserWarning, match=r"step 3 .*skipped: .*non-finite"):
        _final_weights(monitor)
    assert monitor.n_skipped == 1 and monitor.latest.grad_alignment is None


def test_non_converged_solve_is_skipped() -> None:
    baseline = _final_weights(None, steps=3)
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=12, tol=1e-12, max_hvp=4)
    with pytest.warns(UserWarning, match=r"measurement at step 1 .*skipped: the eigen-solver did not converge"):
        weights = _final_weights(monitor, steps=3)
    assert monitor.latest is None and monitor.n_measurements == 0 and monitor.n_skipped == 4  # 0, 1, 2, 3
    assert _same(baseline, weights)


def test_skipped_measurement_leaves_state_untouched() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, on_fit_start=False, probe_size=12, loss_fn=_loss_failing_at(3, "raise"))
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step] = (monitor.latest, monitor._prev_top, monitor.state_dict()["polarity"]["updates"])

    with pytest.warns(UserWarning, match="step 3"):
        make_trainer([monitor, Spy()], max_steps=4).fit(TinyMLP(), full_batch_loader(12))
    assert seen[3][0] is seen[2][0] and seen[3][1] is seen[2][1] and seen[3][2] == seen[2][2]
    assert seen[4][0].step == 4 and seen[4][0].rotation_cos is not None


INVALID = [
    (dict(every_n_steps=0), "every_n_steps must be a positive int or None"),
    (dict(every_n_epochs=-1), "every_n_epochs must be a positive int or None"),
    (dict(every_n_steps=1.5), "every_n_steps"),
    (dict(top_k=0), "top_k must be an int >= 1"),
    (dict(tol=-1.0), "tol must be a finite float > 0"),
    (dict(tol=0.0), "tol must be a finite float > 0"),
    (dict(tol=float("nan")), "tol must be a finite float > 0"),
    (dict(lambda_min_tol=0), "lambda_min_tol must be a finite float > 0 or None"),
    (dict(max_hvp=0), "max_hvp must be a positive int or None"),
    (dict(solver="arnoldi"), "solver must be one of 'auto', 'lanczos', 'block'"),
    (dict(dtype="float16"), "dtype must be one of 'float32', 'float64'"),
    (dict(batchnorm="train"), "batchnorm must be one of 'eval', 'batch'"),
    (dict(dropout="yes"), "dropout must be one of 'off', 'on'"),
    (dict(backend="jax"), "backend must be one of 'auto', 'func', 'autograd'"),
    (dict(probe="random"), "probe must be one of 'fixed', 'batch' or an iterable"),
    (dict(probe=3), "probe must be one of 'fixed', 'batch' or an iterable"),
    (dict(probe_size=0), "probe_size must be an int >= 1"),
    (dict(probe_batch_size=0), "probe_batch_size must be a positive int or None"),
    (dict(trace_hvps=2), "trace_hvps must be an int >= 3"),
    (dict(loss_fn="mse"), "loss_fn must be a callable"),
    (dict(lambda_min="yes"), "lambda_min must be True or False"),
    (dict(on_fit_start="always"), "on_fit_start must be one of None, True, False"),
    (dict(probe="batch", on_fit_start=True), "on_fit_start=True needs a probe set"),
    (dict(prefix=None), "prefix must be a str"),
    (dict(seed=-1), "seed must be an int >= 0"),
]


@pytest.mark.parametrize("kwargs, message", INVALID, ids=[next(iter(k)) + "-" + str(i) for i, (k, _) in enumerate(INVALID)])
def test_invalid_options_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="SharpnessMonitor: " + message.replace("(", r"\(").replace(")", r"\)")):
        SharpnessMonitor(**kwargs)


def test_unsupported_sharded_setups_are_refused_at_setup() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    # tensor parallelism (Replicate placements) and DeepSpeed: refused with the reason and what works
    fake_trainer = types.SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
                                         callbacks=[], global_step=1)
    with pytest.raises(ValueError, match=r"does not support this ModelParallelStrategy setup: .*tensor_parallel_size=1"):
        SharpnessMonitor().setup(fake_trainer, TinyMLP(), "fit")
    try:
        strategy = DeepSpeedStrategy()
    except Exception:  # pragma: no cover - deepspeed not importable
        return
    fake_trainer = types.SimpleNamespace(strategy=strategy, callbacks=[], global_step=1)
    with pytest.raises(ValueError, match=r"does not support this DeepSpeedStrategy setup"):
        SharpnessMonitor().setup(fake_trainer, TinyMLP(), "fit")


def test_loss_resolution_errors_at_setup() -> None:
    with pytest.raises(ValueError, match="no loss for TrainingStepOnly.*use_training_step=True"):
        make_trainer([SharpnessMonitor()], max_steps=1).fit(TrainingStepOnly(), full_batch_loader(8))

    class Manual(TrainingStepOnly):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = self._loss(batch)
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(ValueError, match="use_training_step=True is refused under manual optimization"):
        make_trainer([SharpnessMonitor(use_training_step=True)], max_steps=1).fit(Manual(), full_batch_loader(8))


def test_training_step_recall_mutes_logging(tmp_path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    monitor = SharpnessMonitor(every_n_steps=1, use_training_step=True, probe_size=8)
    trainer = make_trainer([monitor], max_steps=3, logger=logger, log_every_n_steps=1)
    model = TrainingStepOnly()
    trainer.fit(model, full_batch_loader(8))
    assert monitor.n_measurements == 4 and "log" not in vars(model)  # the no-op patch is removed again
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    # the logged train_loss is the training batch's loss, not the probe loss of a re-call
    probe_losses = [float(r["rpe/probe_loss"]) for r in rows if r.get("rpe/probe_loss")]
    assert len(losses) == 3 and losses != probe_losses[1:]


@pytest.mark.parametrize("loss_fn, message", [
    (lambda module: module.compute_loss(None), r"TypeError: .*positional argument"),  # wrong signature
    (lambda module, batch: (module(batch[0]) - batch[1]) ** 2, r"shape \(12, 1\), not a scalar"),  # a vector
    (lambda module, batch: 1.0, "returned a float, not a scalar tensor"),
    (lambda module, batch: module.compute_loss(batch).detach(), "loss does not depend on the parameters"),
])
def test_a_wrong_loss_raises_at_the_first_measurement_with_a_hint(loss_fn, message: str) -> None:
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=12, loss_fn=loss_fn)
    with pytest.raises(ValueError, match=rf"SharpnessMonitor: the measured loss is wrong \(.*{message}.*loss_fn\(pl_module, batch\)"):
        make_trainer([monitor], max_steps=3).fit(TinyMLP(), full_batch_loader(12))


def test_a_training_step_without_a_loss_raises_when_it_is_the_measured_loss() -> None:
    class NoLoss(TrainingStepOnly):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            return {"value": torch.tensor(1.0)}

    monitor = SharpnessMonitor(every_n_steps=1, probe_size=12, use_training_step=True)
    with pytest.raises(ValueError, match="training_step must return the loss tensor"):
        make_trainer([monitor], max_steps=2).fit(NoLoss(), full_batch_loader(12))


class SharedStepLogs(TinyMLP):
    """The common shared-step pattern: the loss method itself logs (step and epoch)."""

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)


def _logged_train_loss(tmp_path, monitor) -> list[tuple[int, str, str]]:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(3, verbose=False)
    logger = CSVLogger(tmp_path, name="with" if monitor else "without")
    loader = torch.utils.data.DataLoader(full_batch_loader(24).dataset, batch_size=8, shuffle=False)
    make_trainer([monitor] if monitor else [], max_steps=6, logger=logger, log_every_n_steps=1).fit(SharedStepLogs(), loader)
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    return [(int(r["step"]), r.get("train_loss_step", ""), r.get("train_loss_epoch", "")) for r in rows
            if r.get("train_loss_step") or r.get("train_loss_epoch")]


def test_a_loss_that_logs_is_muted_during_measurements(tmp_path) -> None:
    # the probe batches differ from the training batches: an unmuted self.log in compute_loss would
    # replace the logged step values and the epoch mean; the fit-start measurement would raise
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=16, probe_batch_size=8)
    assert _logged_train_loss(tmp_path, monitor) == _logged_train_loss(tmp_path, None)
    assert monitor.n_measurements == 7 and monitor.n_skipped == 0


def test_probe_size_larger_than_the_data_set_is_said() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=100)
    with pytest.warns(UserWarning, match=r"probe_size=100 but the training data set holds 12 samples"):
        make_trainer([monitor], max_steps=1).fit(TinyMLP(), full_batch_loader(12))
    assert monitor.latest is not None


def test_a_loader_of_ready_batches_gives_a_probe_set_of_those_batches() -> None:
    # batch_size=None: automatic batching off, every data-set item is already a batch
    data = full_batch_loader(12).dataset.tensors

    class Prebatched(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return data[0][4 * i : 4 * i + 4], data[1][4 * i : 4 * i + 4]

    loader = torch.utils.data.DataLoader(Prebatched(), batch_size=None)
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=8, on_fit_start=False)
    make_trainer([monitor], max_steps=2).fit(TinyMLP(), loader)
    assert monitor.n_skipped == 0 and monitor.n_measurements == 2
    assert [tuple(b[0].shape) for b in monitor.probe_batches] == [(4, 4), (4, 4)]
    assert torch.equal(monitor.probe_batches[1][0], data[0][4:8])
