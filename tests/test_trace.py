"""Hutchinson and Hutch++ trace estimates against matrices with known traces."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rpe.curvature.operator import CurvatureOperator, DenseOperator
from lightning_rpe.curvature.trace import TraceResult, trace


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.shape[0]
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = (Q * eigenvalues.double()) @ Q.T
    return (A + A.T) / 2


@pytest.fixture(scope="module")
def indefinite():
    n = 300
    g = torch.Generator().manual_seed(1)
    l = torch.cat([torch.tensor([40.0, 25.0, 18.0, -15.0], dtype=torch.float64),
                   torch.randn(n - 4, generator=g, dtype=torch.float64)])
    return spectrum_matrix(l, seed=2), float(l.sum())


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_within_four_standard_errors_over_seeds(indefinite, method):
    A, true = indefinite
    errors = []
    for seed in range(8):
        op = DenseOperator(A)
        res = trace(op, n_hvp=60, method=method, generator=torch.Generator().manual_seed(seed))
        assert isinstance(res, TraceResult) and res.method == method
        assert res.n_hvp == op.n_hvp == 60
        assert math.isfinite(res.std_error) and res.std_error > 0
        assert abs(res.estimate - true) <= 4 * res.std_error
        errors.append(res.estimate - true)
    # the errors are not all on one side (unbiased estimator, 8 seeds)
    assert min(errors) < 0 < max(errors) or max(abs(e) for e in errors) < 1e-8


def test_std_error_is_calibrated():
    # Hutchinson's variance for Rademacher probes is 2 (||A||_F^2 - sum A_ii^2): the reported
    # standard error must match sqrt(var / n) within sampling noise
    n = 200
    g = torch.Generator().manual_seed(3)
    A = spectrum_matrix(torch.randn(n, generator=g, dtype=torch.float64) + 0.5, seed=4)
    var = 2 * (float((A**2).sum()) - float((A.diagonal() ** 2).sum()))
    res = trace(DenseOperator(A), n_hvp=400, method="hutchinson")
    assert res.std_error == pytest.approx(math.sqrt(var / 400), rel=0.2)


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise():
    n = 400
    g = torch.Generator().manual_seed(5)
    l = torch.cat([torch.linspace(100.0, 20.0, 10, dtype=torch.float64),
                   0.05 * torch.randn(n - 10, generator=g, dtype=torch.float64)])
    A = spectrum_matrix(l, seed=6)
    true = float(l.sum())
    err = {"hutch++": [], "hutchinson": []}
    se = {"hutch++": [], "hutchinson": []}
    for seed in range(6):
        for method in err:
            res = trace(DenseOperator(A), n_hvp=45, method=method, generator=torch.Generator().manual_seed(seed))
            err[method].append(abs(res.estimate - true))
            se[method].append(res.std_error)
    rms = {m: math.sqrt(sum(e * e for e in v) / len(v)) for m, v in err.items()}
    assert rms["hutch++"] < 0.1 * rms["hutchinson"]
    assert max(se["hutch++"]) < 0.1 * min(se["hutchinson"])


def test_exact_when_sketch_spans_the_space():
    A = spectrum_matrix(torch.linspace(-3.0, 5.0, 12, dtype=torch.float64), seed=7)
    op = DenseOperator(A)
    res = trace(op, n_hvp=60)
    assert res.estimate == pytest.approx(float(A.trace()), abs=1e-10)
    assert res.std_error == 0.0
    assert res.n_hvp == op.n_hvp == 24  # 12 sketch + 12 exact, nothing left to estimate


def test_minimum_budgets_and_float32():
    A = spectrum_matrix(torch.linspace(0.0, 1.0, 50, dtype=torch.float64), seed=8)
    res = trace(DenseOperator(A), n_hvp=3)
    assert res.n_hvp == 3 and math.isnan(res.std_error) and math.isfinite(res.estimate)
    res = trace(DenseOperator(A), n_hvp=1, method="hutchinson")
    assert res.n_hvp == 1 and math.isnan(res.std_error)
    res32 = trace(DenseOperator(A.float()), n_hvp=90)
    res64 = trace(DenseOperator(A), n_hvp=90)
    assert res32.estimate == pytest.approx(res64.estimate, rel=1e-5)


def test_reproducible_and_global_rng_untouched():
    A = spectrum_matrix(torch.linspace(-1.0, 1.0, 80, dtype=torch.float64), seed=9)
    state = torch.get_rng_state()
    a = trace(DenseOperator(A), n_hvp=30)
    b = trace(DenseOperator(A), n_hvp=30)
    c = trace(DenseOperator(A), n_hvp=30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b
    assert a.estimate != c.estimate


class NaNOperator(CurvatureOperator):
    def __init__(self, A, good):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.good = A, good

    def _matmat(self, V):
        out = self.A @ V
        if self.n_hvp + V.shape[1] > self.good:
            out = out.clone()
            out[-1, -1] = math.inf
        return out


@pytest.mark.parametrize("method, good", [("hutch++", 0), ("hutch++", 15), ("hutch++", 35), ("hutchinson", 10)])
def test_non_finite_product_gives_nan(method, good):
    A = spectrum_matrix(torch.linspace(-1.0, 1.0, 80, dtype=torch.float64), seed=10)
    op = NaNOperator(A, good)
    res = trace(op, n_hvp=45, method=method)
    assert math.isnan(res.estimate) and math.isnan(res.std_error)
    assert res.n_hvp == op.n_hvp


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_hvp=2), "n_hvp must be an int >= 3 for method='hutch\\+\\+'"),
        (dict(n_hvp=0, method="hutchinson"), "n_hvp must be an int >= 1"),
        (dict(n_hvp=10.0), "n_hvp must be an int"),
        (dict(method="girard"), "method must be one of \\('hutch\\+\\+', 'hutchinson'\\)"),
        (dict(generator=1), "generator must be a torch.Generator"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trace(DenseOperator(torch.eye(5, dtype=torch.float64)), **kwargs)
