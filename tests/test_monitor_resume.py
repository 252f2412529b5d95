"""SharpnessMonitor checkpoint state: plain types, weights_only loading, exact resume, state keys."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lit_models import TinyMLP, make_dataset, make_loader, make_trainer

from lightning_rpe import SharpnessMonitor

PLAIN = (type(None), bool, int, float, str)


def _assert_plain(obj, path="state") -> None:
    if isinstance(obj, torch.Tensor) or isinstance(obj, PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{path}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{path} has a non-str key {k!r}"
            _assert_plain(v, f"{path}[{k!r}]")
        return
    raise AssertionError(f"{path} holds a {type(obj).__name__}")


def _monitor() -> SharpnessMonitor:
    return SharpnessMonitor(every_n_steps=2, top_k=2, probe_size=12, probe_batch_size=5, trace=False)


def _loader():
    # full batch: one optimizer step per epoch, so a checkpoint at a step is at an epoch boundary
    return make_loader(make_dataset(16, seed=4), batch_size=16, shuffle=False)


def _rpe_rows(log_dir: str) -> dict[int, dict[str, float]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        vals = {k: float(v) for k, v in r.items() if k.startswith("rpe/") and v not in ("", None)
                and k != "rpe/measure_seconds"}
        if vals:
            out.setdefault(int(r["step"]), {}).update(vals)
    return out


def test_resumed_run_logs_the_same_measurements(tmp_path: Path) -> None:
    pl.seed_everything(7, verbose=False)
    full_monitor = _monitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full = make_trainer([full_monitor, ckpt], max_steps=10, logger=CSVLogger(tmp_path, name="full"),
                        log_every_n_steps=1, enable_checkpointing=True)
    full.fit(TinyMLP(optimizer="adam", lr=0.02, batchnorm=True), _loader())
    path = tmp_path / "ckpt" / "step=4.ckpt"
    assert path.exists()

    # the checkpoint loads with weights_only=True and holds the monitor state in plain types
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"][full_monitor.state_key]
    _assert_plain(state)
    assert state["prev_top"].shape[1] == 2 and state["prev_min"] is not None and state["prev_pre"] is not None
    assert state["probe_indices"] == list(range(12)) and state["n_measurements"] == 3  # steps 0, 2, 4
    # the polarity reference is +-v_1 of the last measurement: stored once, as prev_top[:, 0] and a sign
    assert state["polarity"]["reference"] is None and state["polarity"]["reference_is_prev_top"] in (1, -1)
    assert state["latest"]["step"] == 4

    pl.seed_everything(7, verbose=False)
    resumed_monitor = _monitor()
    resumed = make_trainer([resumed_monitor], max_steps=10, logger=CSVLogger(tmp_path, name="resumed"),
                           log_every_n_steps=1)
    resumed.fit(TinyMLP(optimizer="adam", lr=0.02, batchnorm=True), _loader(), ckpt_path=str(path))

    a, b = _rpe_rows(full.logger.log_dir), _rpe_rows(resumed.logger.log_dir)
    assert sorted(a) == [0, 2, 4, 6, 8, 10]  # fit start, then after steps 2, 4, 6, 8, 10
    assert sorted(b) == [6, 8, 10]  # no fit-start measurement when resuming
    for step in (6, 8, 10):
        assert b[step].keys() == a[step].keys(), step
        assert "rpe/rotation_cos" in b[step] and "rpe/polarity" in b[step]  # needs the restored state
        for k in a[step]:
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-6, abs=1e-9), (step, k)
    assert resumed_monitor.n_measurements == full_monitor.n_measurements
    for x, y in zip(resumed_monitor.probe_batches, full_monitor.probe_batches):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert resumed_monitor.latest.eigenvalues == pytest.approx(full_monitor.latest.eigenvalues, rel=1e-6)


def test_state_dict_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    monitor = _monitor()
    make_trainer([monitor], max_steps=4).fit(TinyMLP(optimizer="nesterov"), _loader())
    state = monitor.state_dict()
    _assert_plain(state)
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    other = _monitor()
    other.load_state_dict(loaded)
    assert other.latest == monitor.latest
    assert torch.equal(other._prev_top, monitor._prev_top)
    assert other.state_dict()["polarity"]["flips"] == state["polarity"]["flips"]
    assert torch.equal(other._polarity.reference, monitor._polarity.reference)
    assert torch.equal(other._polarity.state_dict()["displacement"], monitor._polarity.state_dict()["displacement"])
    with pytest.raises(ValueError, match="state format"):
        other.load_state_dict({"format": 99})


def test_two_monitors_have_distinct_state_keys(tmp_path: Path) -> None:
    a = SharpnessMonitor(every_n_steps=1, prefix="rpe/", probe_size=8)
    b = SharpnessMonitor(every_n_steps=1, prefix="rpe_batch/", probe="batch")
    assert a.state_key != b.state_key
    trainer = make_trainer([a, b], max_steps=2)
    trainer.fit(TinyMLP(), _loader())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    callbacks = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert a.state_key in callbacks and b.state_key in callbacks
    assert callbacks[a.state_key]["n_measurements"] == 3 and callbacks[b.state_key]["n_measurements"] == 2
    assert "rpe/sharpness" in trainer.callback_metrics and "rpe_batch/sharpness" in trainer.callback_metrics

    same = [SharpnessMonitor(every_n_steps=1), SharpnessMonitor(every_n_steps=1)]
    # Lightning refuses duplicate state keys when the Trainer is built; the monitor checks again at setup
    with pytest.raises((RuntimeError, ValueError), match="state_key"):
        make_trainer(same, max_steps=1).fit(TinyMLP(), _loader())


def test_resume_with_different_probe_data_warns(tmp_path: Path) -> None:
    monitor = _monitor()
    trainer = make_trainer([monitor], max_steps=2)
    trainer.fit(TinyMLP(), _loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other_data = make_loader(make_dataset(16, seed=99), batch_size=16)
    resumed = _monitor()
    with pytest.warns(UserWarning, match="probe set rebuilt after resuming differs"):
        make_trainer([resumed], max_steps=4).fit(TinyMLP(), other_data, ckpt_path=str(tmp_path / "a.ckpt"))
    assert resumed.n_measurements == monitor.n_measurements + 1


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@pytest.mark.parametrize("top_k, reference_step, budget", [(1, 0, 4), (3, None, 6), (3, 0, 9)])
def test_state_memory_budget_in_parameter_vectors(top_k: int, reference_step, budget: int) -> None:
    # issue 3's budget for plain GD, (k + 3) float32 parameter vectors: previous top-k, the
    # lambda_min vector, the polarity displacement and (top-1 default, or reference_step=None) the
    # reference subspace of rpe/subspace_similarity_to_first; with k > 1 that reference costs k vectors
    from lit_models import full_batch_loader

    model = TinyMLP(hidden=8)
    monitor = SharpnessMonitor(every_n_steps=1, top_k=top_k, lambda_min=True, probe_size=32,
                               reference_step=reference_step)
    make_trainer([monitor], max_steps=4).fit(model, full_batch_loader(32))
    assert monitor.latest is not None and monitor.latest.polarity is not None
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert _tensor_bytes(monitor.state_dict()) <= budget * param_bytes
