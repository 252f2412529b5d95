"""SharpnessMonitor on a CUDA device (skipped without one): invisible, and equal to a CPU float64 reference."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lit_models import TinyMLP, make_dataset, make_loader, make_trainer

from lightning_rpe import SharpnessMonitor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(monitor, precision="32-true"):
    pl.seed_everything(21, verbose=False)
    model = TinyMLP(batchnorm=True, dropout=0.2, optimizer="adam", lr=0.01, hidden=16)
    trainer = make_trainer([monitor] if monitor else [], accelerator="cuda", max_epochs=2, precision=precision)
    trainer.fit(model, make_loader(make_dataset(64, seed=2), batch_size=16, shuffle=True))
    opt = trainer.optimizers[0].state_dict()["state"]
    return model, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, opt, torch.cuda.get_rng_state()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cuda_monitor_is_invisible(precision: str) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    _, a, opt_a, rng_a = _run(None, precision)
    _, a2, _, _ = _run(None, precision)
    if not all(torch.equal(a[k], a2[k]) for k in a):
        pytest.skip("training itself is not bit-reproducible on this device")
    monitor = SharpnessMonitor(every_n_steps=1, top_k=2, probe_size=32)
    _, b, opt_b, rng_b = _run(monitor, precision)
    assert monitor.n_measurements >= 8 and monitor.n_skipped == 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for i in opt_a:
        for k, v in opt_a[i].items():
            assert torch.equal(v, opt_b[i][k]), (i, k)
    assert torch.equal(rng_a, rng_b)


def test_cuda_values_match_cpu_float64_reference() -> None:
    from lightning_rpe.curvature import HessianOperator

    monitor = SharpnessMonitor(every_n_steps=4, top_k=2, dtype="float64", tol=1e-8, probe_size=32)
    model, _, _, _ = _run(monitor)
    assert monitor.probe_batches[0][0].is_cuda
    cpu_model = TinyMLP(batchnorm=True, dropout=0.2, optimizer="adam", lr=0.01, hidden=16)
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    batches = [tuple(t.cpu() for t in b) for b in monitor.probe_batches]
    op = HessianOperator(cpu_model, lambda m, b: m.compute_loss(b), batches, dtype=torch.float64, batchnorm="batch")
    evals = torch.linalg.eigvalsh(op.to_dense())
    assert list(monitor.latest.eigenvalues) == pytest.approx(sorted(evals.tolist(), reverse=True)[:2], rel=1e-6)
    assert monitor.latest.lambda_min == pytest.approx(float(evals[0]), rel=1e-5)


def test_cuda_state_and_draws_stay_on_the_device() -> None:
    """The solve draws its start vectors on the GPU and the tracker keeps its vectors there (host copies
    and host float64 geometry cost seconds per measurement at 124M parameters); a CPU checkpoint state
    still resumes onto the device."""
    from lightning_rpe.geometry import EigenvectorTracker
    from lightning_rpe.measure import MeasureSettings

    assert MeasureSettings().generator(3, "cuda").device.type == "cuda"
    monitor = SharpnessMonitor(every_n_steps=2, top_k=2, probe_size=32)
    _run(monitor)
    assert monitor.n_measurements >= 4 and monitor.n_skipped == 0
    tracker = monitor._tracker
    assert tracker.previous_top is not None and tracker.previous_top.is_cuda
    state = tracker.state_dict()
    assert state["prev_top"].device.type == "cpu"
    resumed = EigenvectorTracker()
    resumed.load_state_dict(state)
    top = tracker.previous_top
    rotation = resumed.update(99, top, tracker.previous_min, k=2)
    assert rotation.rotation_angle == pytest.approx(0.0, abs=1e-3)
    assert resumed.previous_top.is_cuda
