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


def _float32_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=32)


def _fit_and_collect(monitor: SharpnessMonitor, net: pl.LightningModule, max_steps: int) -> list[str]:
    """Fit ``net`` on the float32 loader with ``monitor``; the SharpnessMonitor warnings it said."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=max_steps).fit(net, _float32_loader())
    return [str(w.message) for w in caught if "SharpnessMonitor" in str(w.message)]


class Float32LossNet(pl.LightningModule):
    """The loss from logits cast to float32 whatever the parameters' dtype (as Hugging Face models do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def compute_loss(self, batch):
        return F.cross_entropy(self.net(batch[0]).float(), batch[1])

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_float32_loss_keeps_the_ad_products_and_says_so_for_float64(dtype):
    """Before: the float64 finite-difference reference of a float32 loss measured its rounding, the check
    'failed' and the run switched to finite-difference products (2 gradients each, less accurate)."""
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=32, lambda_min=False, dtype=dtype)
    said = _fit_and_collect(monitor, Float32LossNet(), max_steps=2)
    assert not [s for s in said if "do not match" in s]
    assert monitor.latest is not None and monitor.latest.backend != "finite_difference"
    narrowed = [s for s in said if "the loss comes back in float32" in s]
    assert len(narrowed) == (1 if dtype == "float64" else 0)


class _Tanh(torch.autograd.Function):
    """tanh saving its output for the backward and the forward-mode rules of the subclasses."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)


class _TanhWrongTangent(_Tanh):
    """tanh with a right backward (so double backward is right) and a forward-mode rule off by 2x:
    torch.func's forward-over-reverse products are wrong, autograd's reverse-over-reverse are right."""

    generate_vmap_rule = True

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2)

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return 2.0 * tangent * (1 - y**2)


def _plain_tanh_lambda_max(net: Float32LossNet) -> float:
    """lambda_max of ``net`` with a plain tanh on all 32 samples (the monitor's probe), float64."""
    (x, y), = list(_float32_loader())

    def plain(m, b):
        return F.cross_entropy(m[2](torch.tanh(m[0](b[0]))), b[1])

    return eigenpairs(HessianOperator(net.net, plain, [(x, y)], dtype=torch.float64), k=1, tol=1e-10).lambda_max


class ActivationNet(Float32LossNet):
    """:class:`Float32LossNet` (the same initial weights at ``width=8``) whose hidden tanh is the custom
    Function ``activation``."""

    def __init__(self, activation: type[torch.autograd.Function], width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))
        self.activation = activation

    def compute_loss(self, batch):
        h = self.activation.apply(self.net[0](batch[0]))
        return F.cross_entropy(self.net[2](h), batch[1])


def test_failed_func_products_fall_back_to_double_backward_before_finite_differences(monkeypatch):
    """backend='auto' takes torch.func for convolutional models on CUDA; when its products fail the
    check and double backward passes it, the run uses double backward (not finite differences)."""
    from lightning_rpe.curvature import hessian

    monkeypatch.setattr(hessian, "_auto_backend", lambda model, device: "func")
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=32, lambda_min=False, dtype="float64")
    net = ActivationNet(_TanhWrongTangent)
    said = _fit_and_collect(monitor, net, max_steps=3)
    switched = [s for s in said if "(func) do not match" in s]
    assert len(switched) == 1 and "double-backward products (autograd) passed" in switched[0]
    assert "finite-difference backend from now on" not in switched[0]
    assert monitor.latest is not None and monitor.latest.backend == "autograd" and monitor.n_skipped == 0
    assert monitor.state_dict()["settled_backend"] == "autograd" and monitor.latest.step == 3
    # the value is that of the same network with a plain tanh (the probe is all 32 samples)
    ref = _plain_tanh_lambda_max(net)
    assert monitor.latest.eigenvalues[0] == pytest.approx(ref, rel=1e-4)


def _cancelling_tanh(big: float) -> type[torch.autograd.Function]:
    """tanh whose float32 slope is computed as ((1 - y^2) + big) - big: exact formulas, float32 rounding
    of about ``big * 4e-8`` absolute on the slope (4e-3 at 1e5), as a kernel whose float32 path is
    imprecise (BatchNorm with batch statistics in float32 on a GPU gave a 2e-3 product error, 4e-8 in
    float64); float64 is exact."""

    class TanhCancellingSlope(_Tanh):
        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            b = big if y.dtype == torch.float32 else 0.0
            return grad * (((1 - y**2) + b) - b)

    return TanhCancellingSlope


_TanhCancellingSlope = _cancelling_tanh(1e5)


def test_float32_rounding_falls_back_to_float64_products_not_finite_differences():
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=32, lambda_min=False)  # float32 products
    net = ActivationNet(_TanhCancellingSlope)
    said = _fit_and_collect(monitor, net, max_steps=3)
    switched = [s for s in said if "do not match" in s]
    assert len(switched) == 1 and "pass the check in float64" in switched[0]
    assert monitor.latest is not None and monitor.latest.backend == "autograd" and monitor.n_skipped == 0
    state = monitor.state_dict()
    assert (state["settled_backend"], state["settled_dtype"], state["finite_difference"]) == ("autograd", "float64", False)
    ref = _plain_tanh_lambda_max(net)
    assert monitor.latest.eigenvalues[0] == pytest.approx(ref, rel=1e-5)


def test_the_cold_cost_report_counts_the_settled_float64_vectors(monkeypatch):
    """Before: the memory bound of the first measurement used settings.dtype (float32, 4 bytes) after
    the check had settled on float64 products (8 bytes): half the memory the solver held."""
    from lightning_rpe.callbacks import sharpness_monitor as sharpness_monitor_module
    from lightning_rpe.curvature.eigen import working_vectors

    said: list[str] = []
    monkeypatch.setattr(sharpness_monitor_module, "rank_zero_info", lambda message, *a, **k: said.append(message))
    monitor = SharpnessMonitor(every_n_steps=100, probe_size=32, lambda_min=False)
    # 3,603 parameters, so the solver's float32 and float64 memory differ in the report's 0.1 MiB digits;
    # 10x the float32 rounding, which the wider network averages more of away
    net = ActivationNet(_cancelling_tanh(1e6), width=400)
    dim = sum(p.numel() for p in net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([monitor], max_steps=1).fit(net, _float32_loader())
    assert monitor.state_dict()["settled_dtype"] == "float64"
    cold = [m for m in said if "first measurement (no warm start)" in m]
    vectors = working_vectors(dim, 1, "largest", "lanczos")
    assert len(cold) == 1 and f"({vectors * dim * 8 / 2**20:.1f} MiB)" in cold[0], cold


def test_a_reused_monitor_warns_again_in_a_fresh_fit():
    """A sweep loop reusing one monitor: the second run's failed check is said again, not swallowed by
    the first run's warned-once set."""
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=32, lambda_min=False)
    counts = []
    for _ in range(2):
        counts.append(sum("do not match" in m for m in _fit_and_collect(monitor, ActivationNet(_TanhCancellingSlope), 2)))
    assert counts == [1, 1]


class Bfloat16LossNet(Float32LossNet):
    def compute_loss(self, batch):
        return F.cross_entropy(self.net(batch[0]).to(torch.bfloat16), batch[1])


def test_a_bfloat16_loss_keeps_the_ad_products_flagged_not_finite_differences():
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=32, lambda_min=False)
    said = [m for m in _fit_and_collect(monitor, Bfloat16LossNet(), max_steps=2) if "do not match" in m]
    assert len(said) == 1 and "comes back in bfloat16" in said[0] and "stay on the AD path" in said[0]
    assert monitor.latest is not None and monitor.latest.backend == "autograd" and monitor.latest.unverified
