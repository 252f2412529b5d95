"""LOBPCG block solver: known spectra, warm starts, budgets, multiplicities (float64)."""

from __future__ import annotations

import pytest
import torch
from _reference import spectrum_matrix

from lightning_rpe.curvature.block import block_size, lobpcg
from lightning_rpe.curvature.eigen import eigenpairs
from lightning_rpe.curvature.operator import DenseOperator


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def true_residuals(A, values, vectors):
    return (A @ vectors - vectors * values.to(vectors.dtype)).norm(dim=0)


def abs_cos(u, v):
    return float((u @ v).abs() / (u.norm() * v.norm()))


def perturbed(A: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    """A + rel * ||A||_2 * E with E symmetric, ||E||_2 = 1."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(A.shape, generator=g, dtype=A.dtype)
    E = (E + E.T) / 2
    E = E / torch.linalg.matrix_norm(E, 2)
    return A + rel * float(torch.linalg.matrix_norm(A, 2)) * E


def block(A, **kw):
    kw.setdefault("method", "block")
    return eigenpairs(DenseOperator(A), **kw)


def test_clustered_top_and_residuals_true():
    n = 300
    l = torch.cat([f64(10.0, 10.0 - 1e-3, 10.0 - 2e-3), torch.linspace(-2.0, 6.0, n - 3, dtype=torch.float64)])
    A, Q = spectrum_matrix(l, seed=1)
    tol = 1e-3
    res = block(A, k=3, tol=tol)
    assert res.all_converged and res.reason is None
    assert (res.eigenvalues - l[:3]).abs().max() <= tol * 10.0
    s = torch.linalg.svdvals(Q[:, :3].T @ res.eigenvectors)
    assert float(s.min()) > 0.999
    assert torch.allclose(res.residuals, true_residuals(A, res.eigenvalues, res.eigenvectors), atol=1e-10)
    assert float(res.residuals.max()) <= tol * 10.0 * (1 + 1e-9)


def test_gap_of_1e_minus_3_and_large_negative_both():
    n = 250
    l = torch.cat([f64(1.0, 0.999), torch.linspace(-0.5, 0.5, n - 3, dtype=torch.float64), f64(-3.0)])
    A, Q = spectrum_matrix(l, seed=2)
    res = block(A, k=2, which="both", tol=1e-7, max_hvp=2000)
    assert res.all_converged
    assert res.eigenvalues.tolist() == pytest.approx([1.0, l[1].item(), -3.0], abs=1e-8)
    assert abs_cos(res.eigenvectors[:, 0], Q[:, 0]) > 0.999
    assert abs_cos(res.eigenvectors[:, 1], Q[:, 1]) > 0.999
    assert abs_cos(res.eigenvectors[:, 2], Q[:, -1]) > 0.999
    assert torch.allclose(res.residuals, true_residuals(A, res.eigenvalues, res.eigenvectors), atol=1e-10)
    G = res.eigenvectors.T @ res.eigenvectors
    assert torch.allclose(G, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_indefinite_smallest():
    n = 200
    l = torch.cat([f64(2.0), torch.linspace(-1.0, 1.0, n - 3, dtype=torch.float64), f64(-4.0, -5.0)])
    A, _ = spectrum_matrix(l, seed=3)
    res = block(A, k=2, which="smallest", tol=1e-6)
    assert res.all_converged
    assert res.eigenvalues.tolist() == pytest.approx([-5.0, -4.0], abs=1e-5)
    assert res.lambda_min == pytest.approx(-5.0, abs=1e-5)


def test_repeated_eigenvalue_found_with_multiplicity():
    # single-vector Krylov sees a double eigenvalue once; a block of random columns sees both copies
    n = 150
    l = torch.cat([f64(4.0, 4.0, 3.0), torch.linspace(-1.0, 1.0, n - 3, dtype=torch.float64)])
    A, Q = spectrum_matrix(l, seed=4)
    res = block(A, k=3, tol=1e-8, max_hvp=1000)
    assert res.all_converged
    assert res.eigenvalues.tolist() == pytest.approx([4.0, 4.0, 3.0], abs=1e-7)
    s = torch.linalg.svdvals(Q[:, :2].T @ res.eigenvectors[:, :2])
    assert float(s.min()) > 0.999


@pytest.mark.parametrize(
    "which, k, rel", [("largest", 1, 1e-3), ("both", 1, 1e-3), ("both", 3, 1e-3), ("largest", 5, 1e-3),
                      ("largest", 1, 1e-2), ("both", 1, 1e-2)]
)
def test_warm_start_needs_far_fewer_products(which, k, rel):
    # a Hessian-like spectrum: a few outliers above a bulk, one negative outlier
    n = 400
    l = torch.cat([f64(12.0, 9.0, 7.5, 6.5, 6.0, 5.6), torch.linspace(-0.5, 3.0, n - 7, dtype=torch.float64),
                   f64(-2.5)])
    A, _ = spectrum_matrix(l, seed=5)
    A2 = perturbed(A, rel, seed=6)
    tol = 1e-3
    before = eigenpairs(DenseOperator(A), k=k, which=which, tol=tol)
    cold_lanczos = eigenpairs(DenseOperator(A2), k=k, which=which, tol=tol)
    cold_block = eigenpairs(DenseOperator(A2), k=k, which=which, tol=tol, method="block")
    op = DenseOperator(A2)
    warm = eigenpairs(op, k=k, which=which, tol=tol, init=before.eigenvectors)
    assert before.all_converged and cold_lanczos.all_converged and cold_block.all_converged
    assert warm.all_converged, warm.reason
    assert warm.n_hvp == op.n_hvp
    assert warm.n_hvp < 0.5 * cold_lanczos.n_hvp
    assert warm.n_hvp < 0.5 * cold_block.n_hvp
    ref = torch.linalg.eigvalsh(A2)
    expected = list(ref.flip(0)[:k]) + ([ref[0]] if which == "both" else [])
    scale = float(ref.abs().max())
    assert (warm.eigenvalues - torch.stack(expected)).abs().max() <= tol * scale
    assert torch.allclose(warm.residuals, true_residuals(A2, warm.eigenvalues, warm.eigenvectors), atol=1e-10)


def test_init_padding_and_rank_deficient_init():
    n = 200
    l = torch.cat([f64(5.0, 4.0, 3.0), torch.linspace(-1.0, 1.0, n - 4, dtype=torch.float64), f64(-6.0)])
    A, Q = spectrum_matrix(l, seed=7)
    # one column for k=3 + smallest: padded with random columns to the block size
    one = block(A, k=3, which="both", tol=1e-6, init=Q[:, :1])
    assert one.all_converged
    assert one.eigenvalues.tolist() == pytest.approx([5.0, 4.0, 3.0, -6.0], abs=1e-5)
    # duplicated and zero columns are dropped and replaced by random ones
    bad = torch.cat([Q[:, :1], Q[:, :1], torch.zeros(n, 1, dtype=torch.float64)], 1)
    dup = block(A, k=2, which="both", tol=1e-6, init=bad)
    assert dup.all_converged
    assert dup.eigenvalues.tolist() == pytest.approx([5.0, 4.0, -6.0], abs=1e-5)
    # float32 init on a float64 operator is cast
    f = block(A, k=1, tol=1e-6, init=Q[:, :1].float())
    assert f.eigenvectors.dtype == torch.float64 and f.all_converged


def test_exact_init_converges_with_block_products_only():
    n = 200
    l = torch.cat([f64(5.0), torch.linspace(-1.0, 1.0, n - 2, dtype=torch.float64), f64(-6.0)])
    A, Q = spectrum_matrix(l, seed=8)
    init = Q[:, [0, -1]]
    op = DenseOperator(A)
    res = eigenpairs(op, k=1, which="both", tol=1e-6, init=init)
    assert res.all_converged
    assert res.n_hvp == block_size(n, 1, "both", init)  # the first A X only
    assert res.eigenvalues.tolist() == pytest.approx([5.0, -6.0], abs=1e-9)


def test_max_hvp_cap_respected():
    n = 300
    l = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    A, _ = spectrum_matrix(l, seed=9)
    for cap in (5, 11, 23):
        op = DenseOperator(A)
        res = eigenpairs(op, k=2, which="both", tol=1e-12, max_hvp=cap, method="block")
        assert res.n_hvp == op.n_hvp <= cap
        assert res.n_hvp >= cap - 0  # the whole budget is used when not converging
        assert not res.all_converged and "max_hvp" in res.reason
        assert torch.allclose(res.residuals, true_residuals(A, res.eigenvalues, res.eigenvectors), atol=1e-10)


def test_small_dimension_exact():
    # block plus residuals plus directions exceed the dimension: dependent columns are dropped
    n = 7
    l = torch.linspace(-2.0, 3.0, n, dtype=torch.float64)
    A, _ = spectrum_matrix(l, seed=10)
    res = block(A, k=2, which="both", tol=1e-10, max_hvp=100)
    assert res.all_converged
    assert res.eigenvalues.tolist() == pytest.approx([3.0, l[-2].item(), -2.0], abs=1e-9)


def test_float32_operator():
    n = 300
    l = torch.cat([f64(20.0, 15.0), torch.linspace(-3.0, 8.0, n - 2, dtype=torch.float64)])
    A, _ = spectrum_matrix(l, seed=11)
    res = eigenpairs(DenseOperator(A.float()), k=2, which="both", tol=1e-4, method="block", max_hvp=600)
    assert res.eigenvectors.dtype == torch.float32 and res.all_converged
    assert res.eigenvalues.tolist() == pytest.approx([20.0, 15.0, -3.0], abs=3e-3)
    true = true_residuals(A, res.eigenvalues, res.eigenvectors.double())
    assert float((true - res.residuals).abs().max()) < 1e-4


def test_lobpcg_guard_argument():
    n = 200
    l = torch.cat([f64(5.0, 4.0), torch.linspace(-1.0, 1.0, n - 2, dtype=torch.float64)])
    A, _ = spectrum_matrix(l, seed=12)
    op = DenseOperator(A)
    out = lobpcg(op, k=1, which="largest", tol=1e-6, max_hvp=400, generator=torch.Generator().manual_seed(0), guard=3)
    assert out.values.tolist() == pytest.approx([5.0], abs=1e-5)
    assert bool(out.converged.all())
    with pytest.raises(ValueError, match="max_hvp must be >= 4"):
        lobpcg(op, k=1, which="largest", tol=1e-6, max_hvp=3, generator=torch.Generator(), guard=3)
