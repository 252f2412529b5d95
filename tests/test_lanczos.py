"""Lanczos with full re-orthogonalisation against matrices with known spectra (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from _reference import spectrum_matrix

from lightning_rpe.curvature.eigen import eigenpairs
from lightning_rpe.curvature.lanczos import lanczos
from lightning_rpe.curvature.operator import DenseOperator


def true_residuals(A: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    return (A @ vectors - vectors * values.to(vectors.dtype)).norm(dim=0)


def abs_cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u @ v).abs() / (u.norm() * v.norm()))


def run(A: torch.Tensor, **kw):
    kw.setdefault("method", "lanczos")
    return eigenpairs(DenseOperator(A), **kw)


def test_large_top_eigenvalue_is_unbiased():
    # A Lanczos whose beta_j is not the norm of the orthogonalised vector returns biased values
    # (690 instead of 1000 in public research code). Tight tolerance: the exact value must come out.
    n = 400
    l = torch.cat([torch.tensor([1000.0, 400.0]), torch.linspace(-5.0, 50.0, n - 2)])
    A, Q = spectrum_matrix(l, seed=1)
    res = run(A, k=2, tol=1e-10, max_hvp=n)
    assert res.all_converged
    assert res.eigenvalues[0].item() == pytest.approx(1000.0, rel=1e-10)
    assert res.eigenvalues[1].item() == pytest.approx(400.0, rel=1e-10)
    assert abs_cos(res.eigenvectors[:, 0], Q[:, 0]) > 1 - 1e-10
    # default tolerance: relative error of lambda_max is below tol (it is ~ residual^2 / gap)
    res = run(A, k=1, tol=1e-3)
    assert abs(res.lambda_max - 1000.0) / 1000.0 < 1e-3
    assert res.n_hvp < 40


def test_clustered_top_eigenvalues():
    n = 300
    l = torch.cat([torch.tensor([10.0, 10.0 - 1e-3, 10.0 - 2e-3]), torch.linspace(-2.0, 6.0, n - 3)])
    A, Q = spectrum_matrix(l, seed=2)
    tol = 1e-3
    res = run(A, k=3, tol=tol)
    assert res.all_converged and res.reason is None
    scale = 10.0
    for i in range(3):
        assert abs(res.eigenvalues[i].item() - l[i].item()) <= tol * scale
    # the cluster is found as a subspace: principal angles between span(V) and the true span are small
    s = torch.linalg.svdvals(Q[:, :3].T @ res.eigenvectors)
    assert float(s.min()) > 0.999
    assert torch.allclose(res.residuals, true_residuals(A, res.eigenvalues, res.eigenvectors), atol=1e-10)


def test_gap_of_1e_minus_3_resolved_at_tight_tolerance():
    # eigenvalues 1 and 0.999: resolving the eigenvector needs residual << gap
    n = 200
    l = torch.cat([torch.tensor([1.0, 0.999]), torch.linspace(-0.5, 0.9, n - 2)])
    A, Q = spectrum_matrix(l, seed=3)
    res = run(A, k=2, tol=1e-7, max_hvp=n)
    assert res.all_converged
    assert res.eigenvalues[0].item() == pytest.approx(1.0, abs=1e-8)
    assert res.eigenvalues[1].item() == pytest.approx(l[1].item(), abs=1e-8)
    assert abs_cos(res.eigenvectors[:, 0], Q[:, 0]) > 0.999
    assert abs_cos(res.eigenvectors[:, 1], Q[:, 1]) > 0.999


def test_large_negative_eigenvalue_and_both():
    n = 300
    l = torch.cat([torch.tensor([3.0, 2.0]), torch.linspace(-1.0, 1.0, n - 3), torch.tensor([-30.0])])
    A, Q = spectrum_matrix(l, seed=4)
    res = run(A, k=2, which="both", tol=1e-6)
    assert res.all_converged
    assert res.eigenvalues.shape == (3,) and res.eigenvectors.shape == (n, 3)
    assert res.lambda_max == pytest.approx(3.0, abs=1e-6 * 30)
    assert res.eigenvalues[1].item() == pytest.approx(2.0, abs=1e-6 * 30)
    assert res.lambda_min == pytest.approx(-30.0, abs=1e-6 * 30)
    assert abs_cos(res.eigenvectors[:, 0], Q[:, 0]) > 0.999
    assert abs_cos(res.eigenvectors[:, 2], Q[:, -1]) > 0.999
    # the convergence threshold is relative to max|theta| = 30, so residuals <= 3e-5
    assert float(res.residuals.max()) <= 1e-6 * 30 * (1 + 1e-9)
    assert torch.allclose(res.residuals, true_residuals(A, res.eigenvalues, res.eigenvectors), atol=1e-10)
    # "largest" alone finds 3, not the larger-in-magnitude -30
    top = run(A, k=1, which="largest", tol=1e-6)
    assert top.lambda_max == pytest.approx(3.0, abs=1e-4)
    assert top.lambda_min is None


def test_indefinite_smallest():
    n = 250
    l = torch.linspace(-4.0, 4.0, n)
    A, Q = spectrum_matrix(l, seed=5)
    res = run(A, k=2, which="smallest", tol=1e-8, max_hvp=n)
    assert res.all_converged
    assert res.eigenvalues.tolist() == pytest.approx([-4.0, l[1].item()], abs=1e-6)
    assert res.lambda_min == pytest.approx(-4.0, abs=1e-6)
    assert res.lambda_max is None


def test_ritz_residuals_equal_true_residuals_when_not_converged():
    n = 300
    l = torch.linspace(0.0, 1.0, n)  # no gap: cannot converge in 10 products
    A, _ = spectrum_matrix(l, seed=6)
    res = run(A, k=3, which="both", tol=1e-8, max_hvp=10)
    assert res.n_hvp == 10
    assert not res.converged.any()
    assert "max_hvp=10" in res.reason
    true = true_residuals(A, res.eigenvalues, res.eigenvectors)
    assert torch.allclose(res.residuals, true, rtol=1e-8, atol=1e-12)
    assert torch.allclose(res.eigenvectors.norm(dim=0), torch.ones(4, dtype=torch.float64))


def test_stops_on_residuals_not_a_fixed_count():
    n = 300
    l = torch.cat([torch.tensor([5.0]), torch.linspace(0.0, 4.0, n - 1)])
    A, _ = spectrum_matrix(l, seed=7)
    counts = [run(A, k=1, tol=tol, max_hvp=n).n_hvp for tol in (1e-2, 1e-4, 1e-8)]
    assert counts[0] < counts[1] < counts[2]


def test_invariant_subspace_breakdown_restarts():
    # three distinct eigenvalues: the Krylov space of any start vector is invariant after 3 steps
    n = 60
    l = torch.tensor([3.0] * 20 + [1.0] * 20 + [-2.0] * 20)
    A, _ = spectrum_matrix(l, seed=8)
    res = run(A, k=5, which="largest", tol=1e-8, max_hvp=n)
    # single-vector Krylov finds every distinct eigenvalue; k=5 forces restarts after breakdowns
    assert res.all_converged
    assert res.eigenvalues[0].item() == pytest.approx(3.0, abs=1e-10)
    assert float(res.residuals.max()) < 1e-8 * 3
    assert torch.allclose(res.residuals, true_residuals(A, res.eigenvalues, res.eigenvectors), atol=1e-9)
    # returned vectors are orthonormal
    G = res.eigenvectors.T @ res.eigenvectors
    assert torch.allclose(G, torch.eye(5, dtype=torch.float64), atol=1e-10)
    assert set(round(v, 8) for v in res.eigenvalues.tolist()) <= {3.0, 1.0, -2.0}


def test_dimension_exhausted_is_exact():
    n = 12
    l = torch.linspace(-1.0, 2.0, n)
    A, _ = spectrum_matrix(l, seed=9)
    res = run(A, k=3, which="both", tol=0.0, max_hvp=50)
    assert res.n_hvp == n
    assert res.all_converged
    ref = torch.linalg.eigvalsh(A)
    assert torch.allclose(res.eigenvalues, torch.stack([ref[-1], ref[-2], ref[-3], ref[0]]), atol=1e-12)
    assert float(true_residuals(A, res.eigenvalues, res.eigenvectors).max()) < 1e-12


def test_max_hvp_cap_respected():
    n = 300
    l = torch.linspace(0.0, 1.0, n)
    A, _ = spectrum_matrix(l, seed=10)
    op = DenseOperator(A)
    res = eigenpairs(op, k=2, tol=1e-12, max_hvp=17, method="lanczos")
    assert res.n_hvp == 17 == op.n_hvp
    assert not res.all_converged


def test_float32_operator():
    n = 300
    l = torch.cat([torch.tensor([20.0, 15.0]), torch.linspace(-3.0, 8.0, n - 2)])
    A, Q = spectrum_matrix(l, seed=11)
    res = eigenpairs(DenseOperator(A.float()), k=2, which="both", tol=1e-4, method="lanczos")
    assert res.eigenvectors.dtype == torch.float32
    assert res.all_converged
    assert res.eigenvalues.tolist() == pytest.approx([20.0, 15.0, -3.0], abs=2e-3)
    true = true_residuals(A, res.eigenvalues, res.eigenvectors.double())
    assert float((true - res.residuals).abs().max()) < 1e-4


def test_lanczos_function_start_vector_is_used():
    # starting exactly at an eigenvector of a 2-eigenvalue matrix breaks down at once and restarts
    n = 40
    l = torch.tensor([2.0] * 20 + [1.0] * 20)
    A, Q = spectrum_matrix(l, seed=12)
    op = DenseOperator(A)
    g = torch.Generator().manual_seed(0)
    out = lanczos(op, k=1, which="both", tol=1e-10, max_hvp=n, generator=g, start=Q[:, 0])
    assert out.values.tolist() == pytest.approx([2.0, 1.0], abs=1e-10)
    assert bool(out.converged.all())
    assert op.n_hvp <= 4
    assert math.isfinite(float(out.residuals.max()))
