"""SharpnessMonitor: measured values, thresholds, logging to every logger, callback_metrics."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lit_models import ABModel, TinyMLP, ab_loader, full_batch_loader, make_dataset, make_loader, make_trainer

from lightning_rpe import Measurement, SharpnessMonitor
from lightning_rpe.callbacks import sharpness_monitor as sharpness_monitor_module
from lightning_rpe.curvature.eigen import working_vectors


def _dense_spectrum(model: TinyMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 eigenvalues (ascending) of the Hessian of the mean MSE, BatchNorm in eval mode."""
    return torch.linalg.eigvalsh(_dense_hessian(model, x, y))


def _dense_hessian(model: TinyMLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 Hessian of the mean MSE over the parameters in model order, BatchNorm in eval mode."""
    model = model.double().eval()
    names = [n for n, p in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            parts[n] = theta[i : i + k].view(s)
            i += k
        out = torch.func.functional_call(model, parts, (x.double(),))
        return ((out - y.double()) ** 2).mean()

    return torch.autograd.functional.hessian(loss, flat)


def test_values_match_dense_hessian_on_first_probe_samples() -> None:
    pl.seed_everything(0, verbose=False)
    data = make_dataset(48, seed=3)
    monitor = SharpnessMonitor(every_n_steps=2, top_k=3, dtype="float64", tol=1e-8, probe_size=20, probe_batch_size=7,
                               batchnorm="eval")
    model = TinyMLP(batchnorm=True, hidden=6, optimizer="momentum", lr=0.05)
    make_trainer([monitor], max_steps=4).fit(model, make_loader(data, batch_size=16, shuffle=True))
    m = monitor.latest
    assert isinstance(m, Measurement) and m.step == 4 and m.trigger == "step"
    # the probe set is the first 20 samples in data-set order, in physical batches of 7
    assert [len(b[0]) for b in monitor.probe_batches] == [7, 7, 6]
    x, y = data.tensors[0][:20], data.tensors[1][:20]
    evals = _dense_spectrum(model, x, y)
    top = sorted(evals.tolist(), reverse=True)[:3]
    assert m.eigenvalues == pytest.approx(top, rel=1e-6)
    assert m.sharpness == m.eigenvalues[0]
    assert m.lambda_min == pytest.approx(float(evals[0]), rel=1e-5, abs=1e-8)
    # heavy-ball threshold (2 + 2 beta) / lr at beta = 0.9, lr = 0.05
    assert m.kinds == ("heavy_ball",) and m.lrs == (0.05,)
    assert m.thresholds[0] == pytest.approx(3.8 / 0.05)
    assert m.ratios[0] == pytest.approx(m.sharpness / m.thresholds[0])
    assert m.n_hvp > 0 and m.seconds > 0
    assert 0.0 <= m.rotation_cos <= 1.0 and 0.0 <= m.rotation_angle <= 90.0
    assert 0.0 <= m.subspace_similarity <= 1.0 and m.grad_alignment is not None


@pytest.mark.parametrize("solver", ["lanczos", "block"])
def test_solver_choice_gives_the_same_values(solver: str) -> None:
    def run(solver_name):
        pl.seed_everything(0, verbose=False)
        monitor = SharpnessMonitor(every_n_steps=2, top_k=2, dtype="float64", tol=1e-8, probe_size=16, solver=solver_name)
        make_trainer([monitor], max_steps=4).fit(TinyMLP(), full_batch_loader(16))
        return monitor.latest

    auto, chosen = run("auto"), run(solver)
    assert chosen.eigenvalues == pytest.approx(auto.eigenvalues, rel=1e-6)
    assert chosen.lambda_min == pytest.approx(auto.lambda_min, rel=1e-5)


def test_polarity_alternates_on_two_parameter_model() -> None:
    """L(a, b) = (a b)^2, eta = 0.011 from (-0.1, 10): above 2/eta, the polarity alternates in sign with
    growing magnitude while the sharpness falls and |lambda_min| grows (docs/science.md)."""
    monitor = SharpnessMonitor(every_n_steps=1, dtype="float64", tol=1e-8, probe_size=1)
    history: list[Measurement] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(monitor.latest)

    make_trainer([monitor, Record()], max_steps=8).fit(ABModel(a=-0.1, b=10.0, lr=0.011), ab_loader())
    assert [m.step for m in history] == list(range(1, 9))
    assert history[0].sharpness > 2 / 0.011
    pol = [m.polarity for m in history]
    assert all(p1 * p2 < 0 for p1, p2 in zip(pol, pol[1:])), pol
    assert all(abs(p2) > abs(p1) for p1, p2 in zip(pol, pol[1:])), pol
    assert [m.polarity_flips for m in history] == list(range(8))
    sharp = [m.sharpness for m in history]
    assert all(s2 < s1 for s1, s2 in zip(sharp, sharp[1:])), sharp
    neg = [abs(m.lambda_min) for m in history]
    assert all(n2 > n1 for n1, n2 in zip(neg, neg[1:])), neg
    assert all(m.rotation_angle == pytest.approx(abs(m.polarity)) for m in history)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_logger_gets_the_values_at_the_train_loss_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    monitor = SharpnessMonitor(every_n_steps=3, top_k=2, on_fit_start=False, on_fit_end=False, probe_size=16)
    trainer = make_trainer([monitor], max_steps=9, logger=[tb, csv_logger], log_every_n_steps=3)
    trainer.fit(TinyMLP(), make_loader(make_dataset(32), batch_size=8, shuffle=True))
    assert monitor.n_measurements == 3

    rows = _read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    loss_steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    sharp = [(int(r["step"]), float(r["rpe/sharpness"])) for r in rows if r.get("rpe/sharpness")]
    # x = the number of updates applied to the parameters a value describes. Lightning logs the loss of
    # batches 3, 6, 9 (computed on the parameters after 2, 5, 8 updates) at x = 2, 5, 8; the monitor
    # measures after updates 3, 6, 9 and logs at x = 3, 6, 9, each exactly once.
    assert loss_steps == [2, 5, 8]
    assert [s for s, _ in sharp] == [3, 6, 9]
    assert sharp[-1][1] == pytest.approx(monitor.latest.sharpness, rel=1e-6)
    for name in ("rpe/eig_1", "rpe/eig_2", "rpe/lambda_min", "rpe/threshold", "rpe/stability_ratio", "rpe/hvps",
                 "rpe/measure_seconds", "rpe/grad_alignment", "rpe/probe_loss"):
        assert [int(r["step"]) for r in rows if r.get(name)] == [3, 6, 9], name
    for name in ("rpe/rotation_cos", "rpe/rotation_angle", "rpe/subspace_similarity", "rpe/polarity", "rpe/polarity_flips"):
        assert [int(r["step"]) for r in rows if r.get(name)] == [6, 9], name  # needs a previous measurement

    acc = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train_loss")] == [2, 5, 8]
    assert [e.step for e in acc.Scalars("rpe/sharpness")] == [3, 6, 9]
    assert [e.step for e in acc.Scalars("rpe/rotation_angle")] == [6, 9]
    assert acc.Scalars("rpe/sharpness")[-1].value == pytest.approx(monitor.latest.sharpness, rel=1e-6)
    assert {"rpe/eig_1", "rpe/eig_2", "rpe/lambda_min", "rpe/threshold", "rpe/stability_ratio"} <= set(tags)
    # callback_metrics holds the latest values for EarlyStopping / ModelCheckpoint
    assert float(trainer.callback_metrics["rpe/sharpness"]) == pytest.approx(monitor.latest.sharpness, rel=1e-6)


def test_fit_start_and_fit_end_measurements(tmp_path: Path) -> None:
    csv_logger = CSVLogger(tmp_path)
    monitor = SharpnessMonitor(every_n_epochs=2, probe_size=8)  # on_fit_start / on_fit_end default True
    trainer = make_trainer([monitor], max_epochs=3, logger=csv_logger, log_every_n_steps=1)
    trainer.fit(TinyMLP(), make_loader(make_dataset(16), batch_size=8))  # 2 steps per epoch
    rows = _read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    # fit start (global step 0, x = 0); end of epoch 1 (global step 4, x = 4); fit end (global step 6, x = 6)
    assert [int(r["step"]) for r in rows if r.get("rpe/sharpness")] == [0, 4, 6]
    assert monitor.n_measurements == 3 and monitor.latest.trigger == "fit_end" and monitor.latest.step == 6


def test_model_checkpoint_monitors_sharpness(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="rpe/sharpness", mode="min", save_top_k=1,
                           every_n_train_steps=2, filename="{step}-{rpe/sharpness:.4f}", auto_insert_metric_name=False)
    monitor = SharpnessMonitor(every_n_steps=2, probe_size=8)
    trainer = make_trainer([monitor, ckpt], max_steps=6, enable_checkpointing=True)
    trainer.fit(TinyMLP(), full_batch_loader(8))
    assert ckpt.best_model_path and ckpt.best_model_score is not None
    assert math.isfinite(float(ckpt.best_model_score))
    assert ckpt.current_score is not None


def test_per_group_thresholds_and_lr_scale_provider(tmp_path: Path) -> None:
    csv_logger = CSVLogger(tmp_path)
    monitor = SharpnessMonitor(every_n_steps=1, on_fit_start=False, on_fit_end=False, probe_size=8, dtype="float64",
                               tol=1e-7)
    monitor.lr_scale_provider = lambda: [0.5, 2.0]
    trainer = make_trainer([monitor], max_steps=2, logger=csv_logger, log_every_n_steps=1)
    trainer.fit(TinyMLP(group_lrs=(0.1, 0.02)), full_batch_loader(8))
    m = monitor.latest
    assert m.lrs == pytest.approx((0.05, 0.04))
    assert m.thresholds == pytest.approx((2 / 0.05, 2 / 0.04))
    assert m.ratios == pytest.approx((m.sharpness * 0.05 / 2, m.sharpness * 0.04 / 2))
    # the exact GD stability ratio with two learning rates: lambda_max(D^1/2 H D^1/2) / 2, D = each
    # coordinate's lr (first layer 0.05, the rest 0.04), from a float64 dense Hessian
    model = trainer.lightning_module
    x, y = (t[:8] for t in full_batch_loader(8).dataset.tensors)
    H = _dense_hessian(model, x, y)
    n_first = sum(p.numel() for p in model.net[0].parameters())
    d = torch.full((H.shape[0],), 0.04, dtype=torch.float64)
    d[:n_first] = 0.05
    exact = float(torch.linalg.eigvalsh(d.sqrt()[:, None] * H * d.sqrt()[None, :])[-1]) / 2
    assert m.stability_ratio == pytest.approx(exact, rel=1e-3)
    assert min(m.ratios) <= m.stability_ratio <= max(m.ratios)
    names = monitor.metrics(m)
    assert names["rpe/threshold"] == pytest.approx(min(m.thresholds))
    assert names["rpe/stability_ratio"] == pytest.approx(m.stability_ratio)
    assert names["rpe/threshold/pg1"] == pytest.approx(m.thresholds[0])
    assert names["rpe/stability_ratio/pg2"] == pytest.approx(m.ratios[1])
    rows = _read_csv(Path(csv_logger.log_dir) / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("rpe/threshold/pg2")] == [1, 2]


def test_single_group_has_no_group_suffix() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=8, prefix="curv/")
    make_trainer([monitor], max_steps=1).fit(TinyMLP(), full_batch_loader(8))
    names = set(monitor.metrics(monitor.latest))
    assert all(n.startswith("curv/") for n in names)
    assert not any("/pg" in n for n in names)


def test_adam_preconditioned_sharpness_and_ratio() -> None:
    from lightning_rpe.curvature import HessianOperator, PreconditionedOperator
    from lightning_rpe.stability import adam_preconditioner

    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(every_n_steps=3, dtype="float64", tol=1e-8, probe_size=12, on_fit_start=True)
    model = TinyMLP(optimizer="adam", lr=0.01, hidden=5)
    trainer = make_trainer([monitor], max_steps=3)
    trainer.fit(model, full_batch_loader(12))
    m = monitor.latest
    assert m.kinds == ("adam",)
    assert m.thresholds[0] == pytest.approx(3.8 / (0.1 * 0.01))  # (2 + 2 beta1) / ((1 - beta1) lr)
    # independent dense check of lambda_max(P^-1/2 H P^-1/2)
    op = HessianOperator(model, lambda mod, b: mod.compute_loss(b), monitor.probe_batches, dtype=torch.float64)
    pre = PreconditionedOperator(op, op.flatten(adam_preconditioner(trainer.optimizers[0])))
    expected = float(torch.linalg.eigvalsh(pre.to_dense()).max())
    assert m.preconditioned_sharpness == pytest.approx(expected, rel=1e-6)
    assert m.ratios[0] == pytest.approx(m.preconditioned_sharpness / m.thresholds[0])


def test_unknown_optimizer_warns_once_with_assumed_threshold() -> None:
    class RMS(TinyMLP):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.01)

    monitor = SharpnessMonitor(every_n_steps=1, probe_size=8)
    with pytest.warns(UserWarning, match=r"RMSprop.*2 / lr") as record:
        make_trainer([monitor], max_steps=3).fit(RMS(), full_batch_loader(8))
    assert sum("RMSprop" in str(w.message) for w in record) == 1
    assert monitor.latest.kinds == ("unknown",)
    assert monitor.latest.thresholds == pytest.approx((2 / 0.01,))


def test_trace_when_requested() -> None:
    from lightning_rpe.curvature import HessianOperator

    # dim = 19 parameters; Hutch++ with 60 products sketches 20 columns, so the estimate is exact
    monitor = SharpnessMonitor(every_n_steps=1, trace=True, trace_hvps=60, dtype="float64", probe_size=8)
    model = TinyMLP(hidden=2)
    make_trainer([monitor], max_steps=1).fit(model, full_batch_loader(8))
    op = HessianOperator(model, lambda mod, b: mod.compute_loss(b), monitor.probe_batches, dtype=torch.float64)
    assert op.dim == 19
    exact = float(torch.trace(op.to_dense()))
    assert monitor.latest.trace == pytest.approx(exact, rel=1e-6)
    assert "rpe/trace" in monitor.metrics(monitor.latest)
    # the standard error rides along (0 here: the sketch spans the space, nothing stochastic is left);
    # on a larger model it is positive and the error stays within a few of it
    assert monitor.latest.trace_se == pytest.approx(0.0, abs=1e-10)
    assert "rpe/trace_se" in monitor.metrics(monitor.latest)
    big = SharpnessMonitor(every_n_steps=1, trace=True, trace_hvps=12, dtype="float64", probe_size=16)
    model = TinyMLP(hidden=8)
    make_trainer([big], max_steps=1).fit(model, full_batch_loader(16))
    op = HessianOperator(model, lambda mod, b: mod.compute_loss(b), big.probe_batches, dtype=torch.float64)
    exact = float(torch.trace(op.to_dense()))
    se = big.latest.trace_se
    assert se is not None and se > 0 and abs(big.latest.trace - exact) <= 4 * se


def test_user_dataloader_probe_is_read_once_and_invisible() -> None:
    """A shuffled user loader is read once at fit start, inside isolate_rng."""
    from lightning_rpe.curvature import HessianOperator

    def run(monitor):
        pl.seed_everything(11, verbose=False)
        model = TinyMLP(dropout=0.1)
        make_trainer([monitor] if monitor else [], max_steps=4).fit(model, make_loader(make_dataset(32), 8, shuffle=True))
        return model

    probe_loader = make_loader(make_dataset(20, seed=9), batch_size=6, shuffle=True)
    monitor = SharpnessMonitor(every_n_steps=2, probe=probe_loader, probe_size=12, dtype="float64", tol=1e-8)
    with_monitor, without = run(monitor), run(None)
    assert all(torch.equal(a, b) for a, b in zip(with_monitor.state_dict().values(), without.state_dict().values()))
    assert [len(b[0]) for b in monitor.probe_batches] == [6, 6]  # stops once 12 samples are read
    op = HessianOperator(with_monitor, lambda mod, b: mod.compute_loss(b), monitor.probe_batches, dtype=torch.float64)
    assert monitor.latest.sharpness == pytest.approx(float(torch.linalg.eigvalsh(op.to_dense()).max()), rel=1e-6)


def test_fixed_probe_from_an_iterable_dataset() -> None:
    from torch.utils.data import DataLoader, IterableDataset

    data = make_dataset(24, seed=5)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(*data.tensors))

    monitor = SharpnessMonitor(every_n_steps=1, probe_size=10, probe_batch_size=4)
    make_trainer([monitor], max_steps=2).fit(TinyMLP(), DataLoader(Stream(), batch_size=8))
    assert monitor.state_dict()["probe_kind"] == "iterable"
    assert torch.equal(torch.cat([b[0] for b in monitor.probe_batches]), data.tensors[0][:10])
    assert monitor.n_measurements == 3


def test_a_reused_monitor_starts_fresh_on_a_new_fit() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=8)
    make_trainer([monitor], max_steps=2).fit(TinyMLP(), full_batch_loader(8))
    assert monitor.n_measurements == 3
    first = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            first.append(monitor.latest)

    make_trainer([monitor, Record()], max_steps=1).fit(TinyMLP(), full_batch_loader(8))
    assert monitor.n_measurements == 2  # fit start + step 1 of the new fit only
    assert first[0].step == 0 and first[0].rotation_cos is None and first[0].polarity is None


def test_similarity_to_first_uses_the_reference_step() -> None:
    history: list[Measurement] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(monitor.latest)

    monitor = SharpnessMonitor(every_n_steps=1, top_k=2, dtype="float64", tol=1e-8, probe_size=16, reference_step=3,
                               on_fit_start=False)
    make_trainer([monitor, Record()], max_steps=6).fit(TinyMLP(), full_batch_loader(16))
    sims = [m.subspace_similarity_to_first for m in history]
    assert sims[:2] == [None, None]  # steps 1, 2: before the reference
    assert sims[2] == pytest.approx(1.0)  # step 3: the reference itself
    assert all(s is not None and 0.0 <= s <= 1.0 + 1e-9 for s in sims[3:])
    with pytest.raises(ValueError, match="reference_step must be an int >= 0"):
        SharpnessMonitor(reference_step=-1)


class _AuxHeadNet(pl.LightningModule):
    """Adam with an auxiliary head that is switched off: its parameters never get a gradient."""

    def __init__(self, with_unused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(5, 16)
        self.head = torch.nn.Linear(16, 3)
        if with_unused:
            self.aux_head = torch.nn.Linear(16, 2)

    def compute_loss(self, b):
        return torch.nn.functional.cross_entropy(self.head(torch.tanh(self.body(b[0]))), b[1])

    def training_step(self, b, i):
        return self.compute_loss(b)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_adam_with_an_unused_parameter_keeps_every_metric_and_says_why() -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g))
    results = {}
    for with_unused in (False, True):
        monitor = SharpnessMonitor(every_n_steps=2, probe_size=64, dtype="float64", tol=1e-8)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            make_trainer([monitor], max_steps=6).fit(_AuxHeadNet(with_unused), torch.utils.data.DataLoader(data, batch_size=32))
        notes = [str(w.message) for w in record if "take no optimizer step" in str(w.message)]
        results[with_unused] = (monitor.latest, notes)
    plain, unused = results[False][0], results[True][0]
    # the unused head changes neither the loss nor training: the same preconditioned sharpness and ratio
    assert unused.preconditioned_sharpness == pytest.approx(plain.preconditioned_sharpness, rel=1e-6)
    assert unused.stability_ratio == pytest.approx(plain.stability_ratio, rel=1e-6)
    assert results[False][1] == []
    assert len(results[True][1]) == 1 and "aux_head.weight, aux_head.bias" in results[True][1][0]


def test_clipped_adam_clip_statistics_are_logged() -> None:
    from lightning_rpe.optim import ClippedAdam

    class Clipped(TinyMLP):
        def configure_optimizers(self):
            return ClippedAdam(self.parameters(), lr=0.01, clip_quantile=0.5)

    monitor = SharpnessMonitor(every_n_steps=2, probe_size=8)
    model = Clipped()
    make_trainer([monitor], max_steps=4).fit(model, full_batch_loader(8))
    stats = model.trainer.optimizers[0].clip_statistics()
    logged = monitor.metrics(monitor.latest)
    assert logged["rpe/clip_fraction"] == pytest.approx(stats[0].fraction)
    assert logged["rpe/clip_level"] == pytest.approx(stats[0].level)
    assert 0.3 <= logged["rpe/clip_fraction"] <= 0.7  # the median clips about half the coordinates


@pytest.mark.parametrize("max_basis", [None, 5])
def test_the_cold_measurement_reports_its_cost_and_memory_bound(monkeypatch: pytest.MonkeyPatch,
                                                                max_basis: int | None) -> None:
    said: list[str] = []
    monkeypatch.setattr(sharpness_monitor_module, "rank_zero_info", lambda message, *a, **k: said.append(message))
    model = TinyMLP()
    dim = sum(p.numel() for p in model.parameters())
    monitor = SharpnessMonitor(every_n_steps=100, probe_size=16, max_basis=max_basis, max_hvp=400)
    make_trainer([monitor], max_steps=1).fit(model, full_batch_loader(16))
    said = [m for m in said if "first measurement (no warm start)" in m]
    vectors = working_vectors(dim, 1, "both", "lanczos", max_basis=max_basis)
    assert vectors == (8 if max_basis == 5 else 15)
    assert len(said) == 1 and f"at most {vectors} parameter-sized vectors" in said[0]
    assert f"({vectors * dim * 4 / 2**20:.1f} MiB)" in said[0]


def test_cache_graphs_option_reaches_the_operator_and_keeps_the_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """cache_graphs=False rebuilds the graphs per product (the memory lever on a GPU): same numbers."""
    from lightning_rpe import measure
    from lightning_rpe.curvature import HessianOperator

    made: list[HessianOperator] = []

    class Recorded(HessianOperator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(measure, "HessianOperator", Recorded)
    values = {}
    for cache in (True, False):
        made.clear()
        pl.seed_everything(0, verbose=False)
        monitor = SharpnessMonitor(every_n_steps=100, probe_size=16, tol=1e-6, cache_graphs=cache)
        make_trainer([monitor], max_steps=1).fit(TinyMLP(), full_batch_loader(16))
        assert made and all(op.cache_graphs is cache for op in made if op.backend == "autograd")
        values[cache] = (monitor.latest.sharpness, monitor.latest.lambda_min)
    assert values[False] == pytest.approx(values[True], rel=1e-5)
    with pytest.raises(ValueError, match="SharpnessMonitor: cache_graphs must be one of None, True, False"):
        SharpnessMonitor(cache_graphs="yes")  # type: ignore[arg-type]


def test_drop_last_training_loader_drops_the_probes_incomplete_last_batch() -> None:
    # 49 samples in batches of 16 with drop_last=True: training never evaluates the 1-sample batch,
    # on which BatchNorm with batch statistics has no value at all (every measurement was skipped
    # with "Expected more than 1 value per channel"). A whole-data-set probe now drops it too, and
    # says so; the values are the dense Hessian of the mean loss over the three full batches.
    from torch.utils.data import DataLoader, IterableDataset

    data = make_dataset(49, seed=4)
    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(every_n_steps=2, dtype="float64", tol=1e-8, batchnorm="batch")
    model = TinyMLP(batchnorm=True, hidden=6, lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=4).fit(model, DataLoader(data, batch_size=16, shuffle=True, drop_last=True))
    assert monitor.n_skipped == 0 and monitor.n_measurements == 3
    assert [len(b[0]) for b in monitor.probe_batches] == [16, 16, 16]
    said = [str(w.message) for w in caught if "probe_size" in str(w.message)]
    assert len(said) == 1 and "holds 49 samples" in said[0] and "48 in full batches" in said[0]

    def batch_stats(module: TinyMLP) -> TinyMLP:
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.train()
                m.track_running_stats = False
        return module

    model = model.double().eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batch_stats(model)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (c.view(s) for c, s in zip(theta.split([math.prod(s) for s in shapes]), shapes))))
        total = 0.0
        for start in (0, 16, 32):
            x, y = data.tensors[0][start:start + 16].double(), data.tensors[1][start:start + 16].double()
            total = total + ((torch.func.functional_call(model, parts, (x,)) - y) ** 2).mean()
        return total / 3

    top = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])
    assert monitor.latest.sharpness == pytest.approx(top, rel=1e-6)

    # probe_size equal to the data set: the same drop, said as well (it went unsaid: a review)
    exact = SharpnessMonitor(every_n_steps=1, on_fit_start=False, on_fit_end=False, probe_size=49)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([exact], max_steps=1).fit(TinyMLP(), DataLoader(data, batch_size=16, drop_last=True))
    assert [len(b[0]) for b in exact.probe_batches] == [16, 16, 16]
    assert any("whole data set (48 in full batches" in str(w.message) for w in caught)
    # an iterable data set of exactly probe_size samples is the whole data set too
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(*data.tensors))

    stream = SharpnessMonitor(every_n_steps=1, on_fit_start=False, on_fit_end=False, probe_size=49)
    make_trainer([stream], max_steps=1).fit(TinyMLP(), DataLoader(Stream(), batch_size=16, drop_last=True))
    assert [len(b[0]) for b in stream.probe_batches] == [16, 16, 16]
    # a probe smaller than the data set, or an explicit probe batch size, keeps every sample asked for
    for kwargs, sizes in ((dict(probe_size=40), [16, 16, 8]), (dict(probe_batch_size=16), [16, 16, 16, 1])):
        small = SharpnessMonitor(every_n_steps=1, on_fit_start=False, on_fit_end=False, **kwargs)
        make_trainer([small], max_steps=1).fit(TinyMLP(), DataLoader(data, batch_size=16, drop_last=True))
        assert [len(b[0]) for b in small.probe_batches] == sizes


def test_a_one_sample_last_probe_batch_is_left_out_only_where_batchnorm_cannot_evaluate_it() -> None:
    data = make_dataset(64, seed=4)

    def fit(model: TinyMLP, **kwargs) -> tuple[SharpnessMonitor, list[str]]:
        monitor = SharpnessMonitor(every_n_steps=1, on_fit_end=False, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer([monitor], max_steps=1).fit(model, make_loader(data, batch_size=16))
        return monitor, [str(w.message) for w in caught if "SharpnessMonitor" in str(w.message)]

    # probe_size=17 in batches of 16 with BatchNorm under batch statistics: every measurement was skipped
    monitor, said = fit(TinyMLP(batchnorm=True), probe_size=17)
    assert [len(b[0]) for b in monitor.probe_batches] == [16] and monitor.n_skipped == 0
    assert sum("would form a last batch of one sample" in s and "the probe holds 16" in s for s in said) == 1
    # models that can evaluate it keep it: no BatchNorm, or BatchNorm with running statistics
    for model, kwargs in ((TinyMLP(), {}), (TinyMLP(batchnorm=True), {"batchnorm": "eval"})):
        monitor, said = fit(model, probe_size=17, **kwargs)
        assert [len(b[0]) for b in monitor.probe_batches] == [16, 1] and monitor.n_skipped == 0
        assert not any("one sample" in s for s in said)
    # a probe of one sample in all: nothing to leave out, the skip message says why and what to change
    monitor, said = fit(TinyMLP(batchnorm=True), probe_size=1)
    assert monitor.n_measurements == 0 and monitor.n_skipped == 2
    assert any("a probe batch of one sample" in s and "probe_batch_size" in s for s in said)
