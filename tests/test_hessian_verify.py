"""verify_operator and known_causes: verdicts against known-good, known-wrong and non-smooth operators."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_hessian_operator import mlp, mse_loss, regression_batches
from torch import nn
from torch.nn.utils import parametrizations

from lightning_rpe.curvature.hessian import HessianOperator
from lightning_rpe.curvature.verify import (
    TOLERANCE,
    Verification,
    known_causes,
    verify_operator,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_right_operator_passes_and_spends_what_it_reports(dtype, backend):
    op = HessianOperator(mlp(), mse_loss, regression_batches(), dtype=dtype, backend=backend)
    op.matvec(torch.ones(op.dim))
    result = verify_operator(op, generator=_gen())
    assert isinstance(result, Verification) and result.passed and result.verdict == "passed" and result.reason is None
    assert result.tolerance == TOLERANCE[(dtype, torch.float64)] and result.reference_dtype == torch.float64
    assert result.rel_error <= result.tolerance / 10 and result.asymmetry <= result.tolerance / 10
    assert (result.n_hvp, result.n_gradients, op.n_hvp) == (2, 2, 3)
    assert result.suspects == () and result.backend == backend
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.passed = False  # type: ignore[misc]


def test_float64_fd_operator_is_checked_for_symmetry_only():
    op = HessianOperator(mlp(), mse_loss, regression_batches(), dtype=torch.float64, backend="finite_difference")
    result = verify_operator(op, generator=_gen())
    assert result.passed and result.rel_error is None and result.reference_dtype is None and result.n_gradients == 0
    assert result.asymmetry <= 1e-8


class _NotAGradient(torch.autograd.Function):
    """f(x) = sum(x * (x @ A)) / 2 with a backward returning x @ A^T: not the gradient of f (A non-symmetric)."""

    @staticmethod
    def forward(ctx, x, A):
        ctx.save_for_backward(x, A)
        return (x * (x @ A)).sum() / 2

    @staticmethod
    def backward(ctx, grad):
        x, A = ctx.saved_tensors
        return grad * (x @ A.T), None


def test_fd_operator_of_a_field_that_is_not_a_gradient_fails_symmetry():
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64)

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            return _NotAGradient.apply(torch.tanh(self.w * x).sum(0), A)

    op = HessianOperator(Quad(), lambda m, b: m(b), [torch.randn(3, 4, dtype=torch.float64)],
                         dtype=torch.float64, backend="finite_difference")
    result = verify_operator(op, generator=_gen())
    assert not result.passed and result.verdict == "failed" and "not symmetric" in result.reason
    assert any("_NotAGradient" in s for s in result.suspects)


def test_relu_kink_at_the_point_is_inconclusive_not_failed():
    # every first-layer pre-activation of the zero input is exactly 0: the gradient jumps there
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].bias.zero_()
    x = torch.randn(6, 3, dtype=torch.float64)
    x[0] = 0
    batches = [(x, torch.randint(0, 2, (6,)))]
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, dtype=torch.float64)
    result = verify_operator(op, generator=_gen(3))
    assert result.verdict == "inconclusive" and not result.passed
    assert "not smooth" in result.reason and result.n_gradients == 6


def test_known_causes_in_modules_and_graph():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 3)), nn.Tanh(), nn.Linear(3, 2))
    causes = known_causes(model)
    assert causes == ("0: parametrization _WeightNorm of 'weight' (weight_norm: wrong double backward)",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hooked = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 3)), nn.utils.spectral_norm(nn.Linear(3, 2)))
    assert known_causes(hooked) == (
        "0: torch.nn.utils.weight_norm hook on 'weight' (wrong double backward)",
        "1: torch.nn.utils.spectral_norm hook on 'weight'",
    )
    assert known_causes(torch.compile(mlp(), backend="eager")) == ("<model>: compiled with torch.compile (no double backward)",)
    inner = mlp()
    inner[2].compile(backend="eager")
    assert known_causes(inner) == ("2: compiled with torch.compile (no double backward)",)
    x = torch.randn(3, requires_grad=True)
    loss = _NotAGradient.apply(x, torch.eye(3)) + torch.utils.checkpoint.checkpoint(torch.sin, x, use_reentrant=True).sum()
    assert set(known_causes(mlp(), loss)) == {
        "custom autograd.Function _NotAGradient",
        "reentrant activation checkpointing (torch.utils.checkpoint, use_reentrant=True): its backward has no double backward",
    }
    assert known_causes(mlp(), torch.ones(())) == ()


def test_bad_arguments():
    op = HessianOperator(mlp(), mse_loss, regression_batches())
    with pytest.raises(ValueError, match="verify_operator: operator must be a HessianOperator"):
        verify_operator(object())
    with pytest.raises(ValueError, match="verify_operator: tol must be a positive finite number"):
        verify_operator(op, tol=0)
    with pytest.raises(ValueError, match="verify_operator: reference_dtype must be"):
        verify_operator(op, reference_dtype=torch.float16)
    with pytest.raises(ValueError, match="HessianOperator.loss_graph: index must be in"):
        op.loss_graph(5)


def test_default_directions_leave_the_global_rng_alone_and_are_reproducible():
    op = HessianOperator(mlp(), mse_loss, regression_batches(), dtype=torch.float64)
    state = torch.get_rng_state()
    first, second = verify_operator(op), verify_operator(op)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.rel_error == second.rel_error and first.asymmetry == second.asymmetry


def test_float32_fd_operator_is_checked_against_float64_differences():
    op = HessianOperator(mlp(), mse_loss, regression_batches(), dtype=torch.float32, backend="finite_difference")
    result = verify_operator(op)
    assert result.passed and result.reference_dtype == torch.float64 and result.n_gradients == 2
    assert result.tolerance == TOLERANCE[(torch.float32, torch.float32)]
    assert result.rel_error <= 1e-3  # a float32 central difference at the default step


class _TanhDetachedSlope(torch.autograd.Function):
    """tanh with a right first derivative whose own derivative is lost (the slope is detached)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y.detach() ** 2)


def _float32_loss(m, b):
    """A cross-entropy computed in float32 whatever the parameters' dtype, from outputs cast to float32
    (as Hugging Face models compute theirs from the logits): its gradient carries float32 rounding."""
    x, y = b
    return F.cross_entropy(m(x).float(), y.argmax(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_loss_computed_in_float32_is_checked_at_its_own_precision(dtype):
    """A float64 reference of a float32 loss at the float64 step measures its rounding (the check failed
    before and switched the run to finite differences: GPT-2 on a GPU, 3.5e-2); the reference now steps
    for float32 and the right product passes at the float32 tolerance."""
    op = HessianOperator(mlp(), _float32_loss, regression_batches(), dtype=dtype)
    result = verify_operator(op, generator=_gen())
    assert result.passed and result.loss_dtype == torch.float32 and result.reference_dtype == torch.float64
    assert result.tolerance <= 2e-3 and result.rel_error <= result.tolerance
    assert op.loss_dtype == (torch.float32 if dtype == torch.float64 else None)
    # the same loss in the parameters' dtype reports no narrowing
    same = HessianOperator(mlp(), lambda m, b: F.cross_entropy(m(b[0]), b[1].argmax(dim=1)), regression_batches(),
                           dtype=dtype)
    assert verify_operator(same, generator=_gen()).loss_dtype is None


def test_a_wrong_product_of_a_float32_loss_still_fails():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(_TanhDetachedSlope.apply(self.a(x)))

    batches = [(torch.randn(16, 3), torch.randn(16, 2))]
    op = HessianOperator(Net(), lambda m, b: F.mse_loss(m(b[0]).float(), b[1].float()), batches, dtype=torch.float64)
    result = verify_operator(op, generator=_gen())
    assert result.verdict == "failed" and result.loss_dtype == torch.float32 and result.rel_error > 10 * result.tolerance


def test_a_16_bit_loss_is_inconclusive_not_failed():
    """A loss that comes back in bfloat16 (an autocast or cast inside the model) carries 4e-3 rounding:
    finite differences cannot check its products and no backend is more precise, so the verdict is
    'inconclusive' (keep the AD path, flag) rather than 'failed' (which would switch to finite
    differences of a bfloat16 loss: noise)."""
    op = HessianOperator(mlp(), lambda m, b: F.cross_entropy(m(b[0]).to(torch.bfloat16), b[1].argmax(dim=1)),
                         regression_batches(), dtype=torch.float32)
    result = verify_operator(op, generator=_gen())
    assert result.verdict == "inconclusive" and not result.passed and result.loss_dtype == torch.bfloat16
    assert "comes back in bfloat16" in result.reason and result.n_gradients == 0


def test_bool_tolerances_and_steps_are_refused() -> None:
    # verify_operator(tol=True) passed trivially at a tolerance of 1; fd_step=True was a step of 1
    model = mlp()
    with pytest.raises(ValueError, match="fd_step must be a positive finite number"):
        HessianOperator(model, mse_loss, regression_batches(), fd_step=True)
    op = HessianOperator(model, mse_loss, regression_batches(), dtype=torch.float64)
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        verify_operator(op, tol=True)


def test_a_non_callable_batch_size_fn_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size_fn must be a callable"):
        HessianOperator(mlp(), mse_loss, regression_batches(), batch_size_fn=3)


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
def test_a_loss_that_does_not_depend_on_the_parameters_is_said(backend: str) -> None:
    # a detached loss gave all-zero eigenvalues, "converged", without a word in the standalone engine
    def detached(model: nn.Module, batch: object) -> torch.Tensor:
        return mse_loss(model, batch).detach()

    op = HessianOperator(mlp(), detached, regression_batches(), dtype=torch.float64, backend=backend)
    with pytest.warns(RuntimeWarning, match="does not depend on the trainable parameters"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
