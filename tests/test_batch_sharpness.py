"""batch_sharpness: closed forms on linear least squares, a direct loop on an MLP, reduce, skips."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_rpe.curvature import HessianOperator, batch_sharpness, sample_minibatches

torch.set_num_threads(1)


def _least_squares(n_batches: int = 5, batch: int = 8, dim: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, dim, generator=g, dtype=torch.float64))
    batches = [
        (torch.randn(batch, dim, generator=g, dtype=torch.float64), torch.randn(batch, 1, generator=g, dtype=torch.float64))
        for _ in range(n_batches)
    ]
    return model, batches


def _half_mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).mean()


def _closed_form(model: nn.Linear, batches, scales: torch.Tensor | None = None) -> list[float]:
    """L_B = |X_B w - y_B|^2 / (2 n_B): g_B = X_B^T r / n_B, H_B = X_B^T X_B / n_B (exact)."""
    w = model.weight.detach().reshape(-1)
    out = []
    for x, y in batches:
        n = x.shape[0]
        r = x @ w - y.reshape(-1)
        g = x.T @ r / n
        h = x.T @ x / n
        u = g if scales is None else g * scales
        out.append(float(u @ h @ u / (g @ u)))
    return out


def test_least_squares_matches_the_closed_form() -> None:
    model, batches = _least_squares()
    expected = _closed_form(model, batches)
    result = batch_sharpness(model, _half_mse, batches, dtype=torch.float64)
    assert result.values == pytest.approx(expected, rel=1e-12)
    assert result.mean == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    mean = sum(expected) / len(expected)
    var = sum((q - mean) ** 2 for q in expected) / (len(expected) - 1)
    assert result.std_error == pytest.approx(math.sqrt(var / len(expected)), rel=1e-10)
    assert result.n_batches == len(batches) and result.n_hvp == len(batches) and result.n_skipped == 0
    assert not result.scaled
    # a Rayleigh quotient: between the smallest and largest eigenvalue of each H_B
    for q, (x, _) in zip(result.values, batches):
        eig = torch.linalg.eigvalsh(x.T @ x / x.shape[0])
        assert float(eig[0]) - 1e-12 <= q <= float(eig[-1]) + 1e-12


def test_scaled_quotient_matches_the_closed_form() -> None:
    model, batches = _least_squares(seed=1)
    scales = torch.tensor([2.0, 0.5, 1.0, 0.0], dtype=torch.float64)  # P^-1 of an Adam-like P, one frozen coordinate
    result = batch_sharpness(model, _half_mse, batches, dtype=torch.float64, scales=scales)
    assert result.values == pytest.approx(_closed_form(model, batches, scales), rel=1e-12)
    assert result.scaled
    # = the Rayleigh quotient of S^1/2 H_B S^1/2 along S^1/2 g_B
    for q, (x, y) in zip(result.values, batches):
        n = x.shape[0]
        w = model.weight.detach().reshape(-1)
        g = x.T @ (x @ w - y.reshape(-1)) / n
        half = scales.sqrt()
        a = half[:, None] * (x.T @ x / n) * half[None, :]
        v = half * g
        assert q == pytest.approx(float(v @ a @ v / (v @ v)), rel=1e-12)
    # a constant scale c multiplies the plain quotient by c
    plain = batch_sharpness(model, _half_mse, batches, dtype=torch.float64)
    three = batch_sharpness(model, _half_mse, batches, dtype=torch.float64, scales=torch.full((4,), 3.0))
    assert three.values == pytest.approx([3 * v for v in plain.values], rel=1e-12)


def test_mlp_matches_a_direct_double_backward_loop() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    batches = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(4)]

    def ce(m: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    params = list(model.parameters())
    expected = []
    for batch in batches:
        grads = torch.autograd.grad(ce(model, batch), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        hg = torch.autograd.grad(flat, params, grad_outputs=flat.detach())
        hg_flat = torch.cat([h.reshape(-1) for h in hg])
        expected.append(float(flat.detach() @ hg_flat / (flat.detach() @ flat.detach())))
    before = [p.detach().clone() for p in params]
    result = batch_sharpness(model, ce, batches, dtype=torch.float64)
    assert result.values == pytest.approx(expected, rel=1e-10)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # the float32 default agrees to float32 accuracy
    result32 = batch_sharpness(model, ce, batches)
    assert result32.mean == pytest.approx(result.mean, rel=1e-4)


def test_reduce_reaches_the_products() -> None:
    """Two processes holding identical mini-batches (reduce = x2): the union has the same quotient; a
    reduce that is not a sum of identical halves changes it (so the hook is really used)."""
    model, batches = _least_squares(seed=2)
    alone = batch_sharpness(model, _half_mse, batches, dtype=torch.float64)
    doubled = batch_sharpness(model, _half_mse, batches, dtype=torch.float64, reduce=lambda t: 2 * t)
    assert doubled.values == pytest.approx(alone.values, rel=1e-12)
    calls: list[int] = []

    def counting(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return t

    batch_sharpness(model, _half_mse, batches, dtype=torch.float64, reduce=counting)
    assert len(calls) == 3 * len(batches)  # per mini-batch: weight, loss and gradient, product


def test_unusable_batches_are_skipped_and_all_unusable_raises() -> None:
    model, batches = _least_squares(n_batches=3, seed=4)
    w = model.weight.detach().reshape(-1)
    x0 = batches[0][0]
    zero_grad_batch = (x0, (x0 @ w).reshape(-1, 1))  # residual 0: gradient 0
    nan_batch = (batches[1][0], torch.full_like(batches[1][1], math.nan))
    result = batch_sharpness(model, _half_mse, [zero_grad_batch, nan_batch, batches[2]], dtype=torch.float64)
    assert result.n_batches == 1 and result.n_skipped == 2 and math.isnan(result.std_error)
    assert result.values == pytest.approx(_closed_form(model, [batches[2]]), rel=1e-12)
    with pytest.raises(ValueError, match="no usable mini-batch"):
        batch_sharpness(model, _half_mse, [zero_grad_batch, nan_batch], dtype=torch.float64)


def test_bad_arguments_name_the_function_and_parameter() -> None:
    model, batches = _least_squares()
    with pytest.raises(ValueError, match="batch_sharpness: batches"):
        batch_sharpness(model, _half_mse, [])
    with pytest.raises(ValueError, match="batch_sharpness: scales must be a flat tensor of length dim=4"):
        batch_sharpness(model, _half_mse, batches, scales=torch.ones(3))
    with pytest.raises(ValueError, match="batch_sharpness: scales must be finite and non-negative"):
        batch_sharpness(model, _half_mse, batches, scales=-torch.ones(4))
    with pytest.raises(ValueError, match="batchnorm"):
        batch_sharpness(model, _half_mse, batches, batchnorm="train")


def test_batchnorm_policy_is_the_operators() -> None:
    """With batch-statistics BatchNorm each quotient is the operator's Rayleigh quotient on that batch."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()
    batches = [(torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)) for _ in range(3)]
    result = batch_sharpness(model, _half_mse, batches, dtype=torch.float64, batchnorm="batch")
    for q, batch in zip(result.values, batches):
        op = HessianOperator(model, _half_mse, [batch], dtype=torch.float64, batchnorm="batch")
        _, g = op.loss_and_gradient()
        assert q == pytest.approx(float(g @ op.matvec(g) / (g @ g)), rel=1e-12)
    assert model[1].running_mean.abs().max() == 0  # running statistics untouched


def test_sample_minibatches_draws_distinct_examples_reproducibly() -> None:
    x = torch.arange(40.0).reshape(20, 2)
    y = torch.arange(20)
    probe = [(x[:12], y[:12]), (x[12:], y[12:])]
    a = sample_minibatches(probe, 5, 3, torch.Generator().manual_seed(0))
    b = sample_minibatches(probe, 5, 3, torch.Generator().manual_seed(0))
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (5, 2) and len(set(ya.tolist())) == 5  # distinct examples
        assert torch.equal(xa[:, 0], 2.0 * ya)  # inputs and targets stay paired
    (full,) = sample_minibatches(probe, 20, 3, torch.Generator().manual_seed(0))
    assert torch.equal(full[0], x) and torch.equal(full[1], y)
    with pytest.raises(ValueError, match="sample_minibatches: batch_size"):
        sample_minibatches(probe, 0, 3, torch.Generator())
