"""The finite-difference backend: accuracy against double backward, counting, the snapshot, with_backend()."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import fd_hvp
from test_hessian_operator import (
    _BNDropNet,
    mlp,
    mse_loss,
    regression_batches,
    rel,
    unit,
)
from torch import nn

from lightning_rpe.curvature.hessian import BACKENDS, FD_STEP, HessianOperator


@pytest.mark.parametrize("batchnorm", ["eval", "batch"])
def test_fd_backend_matches_double_backward_in_float64(batchnorm):
    torch.manual_seed(0)
    model, batches = _BNDropNet().train(), regression_batches()
    exact = HessianOperator(model, mse_loss, batches, dtype=torch.float64, batchnorm=batchnorm)
    fd = HessianOperator(model, mse_loss, batches, dtype=torch.float64, batchnorm=batchnorm, backend="finite_difference")
    assert fd.backend == "finite_difference" and fd.fd_step == FD_STEP[torch.float64]
    V = torch.randn(exact.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(fd.matmat(V), exact.matmat(V)) <= 1e-8
    assert fd.n_hvp == 3  # counted like the other paths (each product costs 2 gradients)
    loss_e, grad_e = exact.loss_and_gradient()
    loss_f, grad_f = fd.loss_and_gradient()
    assert abs(loss_e - loss_f) <= 1e-14 and rel(grad_f, grad_e) <= 1e-13


def test_fd_backend_float32_accuracy_and_dropout_masks():
    model, batches = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)), regression_batches()
    exact = HessianOperator(model, mse_loss, batches, dtype=torch.float64, dropout="on")
    fd32 = HessianOperator(model, mse_loss, batches, dtype=torch.float32, dropout="on", backend="finite_difference")
    v = unit(exact.dim)
    # float32 central differences at the default step: about 1e-4 relative (docs/models.md)
    assert rel(fd32.matvec(v.float()).double(), exact.matvec(v)) <= 2e-3


def test_fd_product_of_zero_vector_is_zero_and_step_rule():
    model, batches = mlp(), regression_batches()
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float64, backend="finite_difference", fd_step=1e-5)
    assert torch.equal(op.matvec(torch.zeros(op.dim, dtype=torch.float64)), torch.zeros(op.dim, dtype=torch.float64))
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    assert op.fd_epsilon(2.0) == pytest.approx(1e-5 * (1 + float(theta.norm())) / 2.0, rel=1e-12)


def test_with_backend_keeps_the_snapshot_and_settings():
    model, batches = mlp(), regression_batches()
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float32, dropout="on", batchnorm="batch")
    v = unit(op.dim)
    expected = op.matvec(v.float())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)  # the live model moves after the operator was built
    fd = op.with_backend("finite_difference", dtype=torch.float64)
    assert (fd.dtype, fd.backend, fd.n_hvp, fd.dropout, fd.batchnorm) == (torch.float64, "finite_difference", 0, "on", "batch")
    assert fd.fd_step == FD_STEP[torch.float64]
    assert rel(fd.matvec(v).float(), expected) <= 1e-5
    assert op.dtype == torch.float32 and op.backend == "autograd"  # the original is untouched
    assert rel(op.matvec(v.float()), expected) <= 1e-6
    back = fd.with_backend("autograd")
    assert back.backend == "autograd" and back.dtype == torch.float64
    assert rel(back.matvec(v).float(), expected) <= 1e-5
    with pytest.raises(ValueError, match="backend must be one of"):
        op.with_backend("numeric")
    with pytest.raises(ValueError, match="dtype must be one of"):
        op.with_backend("autograd", dtype=torch.float16)
    with pytest.raises(ValueError, match="fd_step must be a positive finite number"):
        op.with_backend("finite_difference", fd_step=0.0)
    assert "finite_difference" in BACKENDS


@pytest.mark.parametrize("fd_step", [0, -1e-3, float("nan"), "1e-3"])
def test_bad_fd_step(fd_step):
    with pytest.raises(ValueError, match="HessianOperator: fd_step must be a positive finite number"):
        HessianOperator(mlp(), mse_loss, regression_batches(), fd_step=fd_step)


def test_fd_backend_measures_a_compiled_model_that_has_no_double_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    compiled = torch.compile(model, backend="aot_eager")
    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))]
    op = HessianOperator(compiled, loss, batches, dtype=torch.float64, backend="autograd")
    v = unit(op.dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="double backward"):
            op.matvec(v)
        fd = op.with_backend("finite_difference")
        assert rel(fd.matvec(v), fd_hvp(model, loss, batches, v)) <= 1e-7
    # backend="auto" sees the compiled module and uses finite differences from the start, and says so
    with pytest.warns(RuntimeWarning, match="compiled with torch.compile"):
        auto = HessianOperator(compiled, loss, batches, dtype=torch.float64)
    assert auto.backend == "finite_difference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel(auto.matvec(v), fd_hvp(model, loss, batches, v)) <= 1e-7
