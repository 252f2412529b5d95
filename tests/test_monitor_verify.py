"""SharpnessMonitor with models whose second derivatives PyTorch gets wrong: verified, switched, flagged."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from lit_models import make_trainer
from torch import nn
from torch.nn.utils import parametrizations

from lightning_rpe import SharpnessMonitor
from lightning_rpe.curvature import HessianOperator, eigenpairs


class _HandWeightNorm(nn.Module):
    """w = g v / ||v|| written with plain ops (its double backward is right)."""

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return g * v / v.norm(dim=1, keepdim=True)

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w.norm(dim=1, keepdim=True), w


class WeightNormNet(pl.LightningModule):
    def __init__(self, hand: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        first = nn.Linear(5, 5)
        if hand:
            parametrize.register_parametrization(first, "weight", _HandWeightNorm())
        else:
            parametrizations.weight_norm(first)
        self.net = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3)).double()

    def compute_loss(self, batch):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(32, 5, generator=g, dtype=torch.float64),
                                          torch.randint(0, 3, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=32)


def _reference(model: WeightNormNet, which: str = "largest") -> float:
    """lambda_max (or lambda_min) of the same function with a hand-written weight norm (AD is right there)."""
    twin = WeightNormNet(hand=True)
    with torch.no_grad():
        p = dict(model.named_parameters())
        q = dict(twin.named_parameters())
        for name in q:
            q[name].copy_(p[name])
    batches = [next(iter(_loader()))]
    op = HessianOperator(twin, lambda m, b: m.compute_loss(b), batches, dtype=torch.float64)
    evals = torch.linalg.eigvalsh(op.to_dense())
    return float(evals[-1] if which == "largest" else evals[0])


def test_weight_norm_is_caught_and_measured_by_finite_differences() -> None:
    monitor = SharpnessMonitor(every_n_steps=2, dtype="float64", tol=1e-8, probe_size=32)
    model = WeightNormNet()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=4).fit(model, _loader())
    # backend="auto" sees the weight_norm parametrization and uses finite differences from the start
    messages = [str(w.message) for w in record if "uses finite differences of gradients" in str(w.message)]
    assert len(messages) == 1 and "weight_norm: wrong double backward" in messages[0]
    m = monitor.latest
    assert m.backend == "finite_difference" and not m.unverified
    assert monitor.metrics(m)["rpe/finite_difference"] == 1.0
    assert m.sharpness == pytest.approx(_reference(model), rel=1e-6)


def test_an_explicit_backend_keeps_its_numbers_and_flags_every_measurement() -> None:
    # torch's weight_norm operator is not even symmetric: a looser tolerance lets the solver stop
    monitor = SharpnessMonitor(every_n_steps=2, dtype="float64", tol=1e-2, lambda_min_tol=1e-2, probe_size=32,
                               backend="autograd")
    model = WeightNormNet()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=4).fit(model, _loader())
    m = monitor.latest
    assert m.backend == "autograd" and m.unverified
    assert monitor.metrics(m)["rpe/unverified"] == 1.0
    ref_min = _reference(model, "smallest")
    assert abs(m.lambda_min - ref_min) > 0.01 * abs(ref_min)  # torch's wrong value, flagged


def test_a_right_model_passes_and_is_checked_once() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, dtype="float64", tol=1e-8, probe_size=32)
    model = WeightNormNet(hand=True)
    make_trainer([monitor], max_steps=3).fit(model, _loader())
    assert monitor.state_dict()["verified"] and not monitor.state_dict()["finite_difference"]
    assert monitor.latest.backend == "autograd" and monitor.latest.verify_error is None  # checked at fit start only


class OnceDifferentiableNet(WeightNormNet):
    """A custom autograd.Function whose backward is not differentiable: found only by the check."""

    def __init__(self) -> None:
        super().__init__(hand=True)

    def compute_loss(self, batch):
        h = _TanhOnce.apply(self.net[0](batch[0]))
        return F.cross_entropy(self.net[2](h), batch[1])


class _TanhOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_a_custom_function_without_double_backward_fails_the_check_and_switches() -> None:
    monitor = SharpnessMonitor(every_n_steps=2, dtype="float64", tol=1e-8, probe_size=32)
    model = OnceDifferentiableNet()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=4).fit(model, _loader())
    messages = [str(w.message) for w in record if "do not match float64 finite differences" in str(w.message)]
    assert len(messages) == 1 and "finite-difference backend" in messages[0]
    assert monitor.n_skipped == 0 and monitor.latest.backend == "finite_difference"
    # reference: the same function with torch.tanh (right double backward)
    twin = WeightNormNet(hand=True)
    twin.load_state_dict(model.state_dict())
    op = HessianOperator(twin, lambda m, b: m.compute_loss(b), [next(iter(_loader()))], dtype=torch.float64)
    assert monitor.latest.sharpness == pytest.approx(float(eigenpairs(op, tol=1e-10).lambda_max), rel=1e-6)


def test_a_failed_check_is_said_even_when_the_solve_then_fails() -> None:
    # torch's weight_norm operator is not symmetric: at a tight tolerance every solve fails; the reason
    # (the failed product check) must still reach the user, not only "did not converge"
    monitor = SharpnessMonitor(every_n_steps=2, dtype="float64", tol=1e-8, probe_size=32, backend="autograd")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=2).fit(WeightNormNet(), _loader())
    messages = [str(w.message) for w in record]
    assert any("do not match float64 finite differences" in t for t in messages)
    assert monitor.n_skipped >= 1
