"""The eigenpairs() contract: validation, ordering, result fields, RNG hygiene, failure flags."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _reference import spectrum_matrix

from lightning_rpe.curvature import EigenResult, eigenpairs
from lightning_rpe.curvature.eigen import default_max_hvp
from lightning_rpe.curvature.operator import CurvatureOperator, DenseOperator, PreconditionedOperator, ScaledOperator

METHODS = ["lanczos", "block"]


@pytest.fixture(scope="module")
def matrix():
    n = 200
    l = torch.cat(
        [torch.tensor([6.0, 5.0, 4.0], dtype=torch.float64), torch.linspace(-1.0, 2.0, n - 5, dtype=torch.float64),
         torch.tensor([-6.0, -8.0], dtype=torch.float64)]
    )
    A, Q = spectrum_matrix(l, seed=21)
    return A, Q, l


class NaNAfter(CurvatureOperator):
    """Dense operator whose products turn non-finite after ``good`` products."""

    def __init__(self, A: torch.Tensor, good: int, value: float = math.nan) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.good, self.value = A, good, value

    def _matmat(self, V):
        out = self.A @ V
        if self.n_hvp + V.shape[1] > self.good:
            out = out.clone()
            out[0] = self.value
        return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_ordering_and_fields(matrix, method, which):
    A, Q, l = matrix
    op = DenseOperator(A)
    res = eigenpairs(op, k=2, which=which, tol=1e-8, max_hvp=200, method=method)
    assert isinstance(res, EigenResult)
    expected = {"largest": [6.0, 5.0], "smallest": [-8.0, -6.0], "both": [6.0, 5.0, -8.0]}[which]
    m = len(expected)
    assert res.eigenvalues.shape == (m,) and res.eigenvalues.dtype == torch.float64
    assert res.eigenvectors.shape == (200, m) and res.eigenvectors.dtype == torch.float64
    assert res.residuals.shape == (m,) and res.converged.shape == (m,) and res.converged.dtype == torch.bool
    assert res.eigenvalues.tolist() == pytest.approx(expected, abs=1e-6)
    assert res.which == which and res.reason is None and res.all_converged
    assert res.n_hvp == op.n_hvp
    assert torch.allclose(res.eigenvectors.norm(dim=0), torch.ones(m, dtype=torch.float64))
    true = (A @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
    assert torch.allclose(res.residuals, true, atol=1e-10)
    if which == "largest":
        assert res.lambda_max == pytest.approx(6.0) and res.lambda_min is None
        assert res.top.tolist() == pytest.approx([6.0, 5.0])
    elif which == "smallest":
        assert res.lambda_max is None and res.lambda_min == pytest.approx(-8.0) and res.top is None
    else:
        assert res.lambda_max == pytest.approx(6.0) and res.lambda_min == pytest.approx(-8.0)
        assert res.top.tolist() == pytest.approx([6.0, 5.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.n_hvp = 0  # type: ignore[misc]


@pytest.mark.parametrize("method", METHODS)
def test_global_rng_untouched_and_reproducible(matrix, method):
    A, _, _ = matrix
    state = torch.get_rng_state()
    a = eigenpairs(DenseOperator(A), k=2, which="both", tol=1e-3, method=method)
    b = eigenpairs(DenseOperator(A), k=2, which="both", tol=1e-3, method=method)
    c = eigenpairs(DenseOperator(A), k=2, which="both", tol=1e-3, method=method,
                   generator=torch.Generator().manual_seed(5))
    d = eigenpairs(DenseOperator(A), k=2, which="both", tol=1e-3, method=method,
                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.eigenvectors, b.eigenvectors) and a.n_hvp == b.n_hvp  # seeded default
    assert torch.equal(c.eigenvectors, d.eigenvectors) and torch.equal(c.eigenvalues, d.eigenvalues)
    assert not torch.equal(a.eigenvectors, c.eigenvectors)  # the seed matters


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_product_is_flagged_not_raised(matrix, method, bad):
    A, _, _ = matrix
    op = NaNAfter(A, good=7, value=bad)
    res = eigenpairs(op, k=2, which="both", tol=1e-10, method=method)
    assert res.reason == "non-finite Hessian-vector product"
    assert not res.converged.any()
    assert res.eigenvalues.shape == (3,) and bool(torch.isnan(res.eigenvalues).all())
    assert res.eigenvectors.shape == (200, 3)
    assert res.n_hvp == op.n_hvp > 0
    assert math.isnan(res.lambda_max)


def test_auto_dispatch(matrix):
    A, Q, _ = matrix
    cold = eigenpairs(DenseOperator(A), k=1, tol=1e-6, method="auto")
    ref = eigenpairs(DenseOperator(A), k=1, tol=1e-6, method="lanczos")
    assert torch.equal(cold.eigenvectors, ref.eigenvectors)
    init = Q[:, :1] + 1e-3 * torch.randn(200, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    warm = eigenpairs(DenseOperator(A), k=1, tol=1e-6, init=init, method="auto")
    blk = eigenpairs(DenseOperator(A), k=1, tol=1e-6, init=init, method="block")
    assert torch.equal(warm.eigenvectors, blk.eigenvectors)


def test_lanczos_accepts_init_as_start(matrix):
    A, Q, _ = matrix
    init = Q[:, [0, -1]] + 1e-4 * torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    warm = eigenpairs(DenseOperator(A), k=1, which="both", tol=1e-6, init=init, method="lanczos")
    cold = eigenpairs(DenseOperator(A), k=1, which="both", tol=1e-6, method="lanczos")
    assert warm.all_converged and warm.eigenvalues.tolist() == pytest.approx([6.0, -8.0], abs=1e-5)
    assert warm.n_hvp <= cold.n_hvp


def test_default_max_hvp_and_float32(matrix):
    A, _, _ = matrix
    assert default_max_hvp(200, 1, "largest") == 80
    assert default_max_hvp(200, 3, "both") == 170
    assert default_max_hvp(30, 3, "both") == 30
    op = DenseOperator(A.float())
    res = eigenpairs(op, k=1, tol=0.0)  # tol 0: runs to the default budget
    assert res.n_hvp == 80
    assert res.eigenvectors.dtype == torch.float32
    assert res.eigenvalues.tolist() == pytest.approx([6.0], abs=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must satisfy 1 <= k <= 200"),
        (dict(k=201), "k must satisfy"),
        (dict(k=200, which="both"), "k \\+ 1 <= dim"),
        (dict(k=1.5), "k must be an int"),
        (dict(which="top"), "which must be one of \\('largest', 'smallest', 'both'\\)"),
        (dict(method="arnoldi"), "method must be one of \\('auto', 'lanczos', 'block'\\)"),
        (dict(tol=-1e-3), "tol must be a finite float >= 0"),
        (dict(tol=math.nan), "tol must be a finite float >= 0"),
        (dict(tol=math.inf), "tol must be a finite float >= 0"),
        (dict(k=3, which="both", max_hvp=3, method="lanczos"), "max_hvp must be >= 4"),
        (dict(k=2, max_hvp=1, method="block"), "max_hvp must be >= "),
        (dict(max_hvp=2.5), "max_hvp must be an int"),
        (dict(init=torch.zeros(199, 2, dtype=torch.float64)), "init must have shape \\(dim=200, j\\)"),
        (dict(init=torch.zeros(200, 2, 2, dtype=torch.float64)), "init must have shape"),
        (dict(init=torch.full((200, 1), math.nan, dtype=torch.float64)), "init must be finite"),
        (dict(init=[1.0, 2.0]), "init must be a tensor"),
        (dict(generator=3), "generator must be a torch.Generator"),
    ],
)
def test_bad_arguments(matrix, kwargs, match):
    A, _, _ = matrix
    with pytest.raises(ValueError, match=match):
        eigenpairs(DenseOperator(A), **kwargs)


def test_bad_operator():
    with pytest.raises(ValueError, match="operator must be a CurvatureOperator"):
        eigenpairs(torch.eye(3))  # type: ignore[arg-type]


def test_tol_smallest_loosens_only_the_smallest_pair():
    # lambda_min sits in a cluster near 0, far below lambda_max: a looser tolerance for it alone
    # saves products while the top pair still meets the tight one
    g = torch.Generator().manual_seed(3)
    n = 300
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spec = torch.cat([torch.tensor([40.0, 35.0]), torch.linspace(-0.2, 0.2, n - 2, dtype=torch.float64)])
    A = DenseOperator(Q @ torch.diag(spec) @ Q.T)
    for method in ("lanczos", "block"):
        noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
        init = None if method == "lanczos" else Q[:, [0, 2]] + 0.05 * noise / noise.norm(dim=0)
        tight = eigenpairs(A, k=1, which="both", tol=1e-6, method=method, init=init, max_hvp=n)
        loose = eigenpairs(A, k=1, which="both", tol=1e-6, tol_smallest=1e-2, method=method, init=init, max_hvp=n)
        assert bool(tight.converged.all()) and bool(loose.converged.all())
        assert loose.n_hvp < tight.n_hvp
        assert loose.residuals[0] <= 1e-6 * 40.0
        assert loose.residuals[-1] <= 1e-2 * 40.0
        assert abs(loose.lambda_max - 40.0) < 1e-6


def test_tol_smallest_validation():
    A = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
    with pytest.raises(ValueError, match="tol_smallest applies to which='both'"):
        eigenpairs(A, which="largest", tol_smallest=1e-2)
    with pytest.raises(ValueError, match="tol_smallest must be a finite float"):
        eigenpairs(A, which="both", tol_smallest=-1.0)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-25), (torch.float32, 1e-30), (torch.float32, 1e20),
                                          (torch.float64, 1e-170), (torch.float64, 1e160)])
def test_extreme_scales_give_the_right_values_or_no_convergence(dtype: torch.dtype, scale: float) -> None:
    # The norm of a vector was the square root of its sum of squares: at these scales it underflowed
    # to 0 (a false breakdown with zero residuals: values 50-66 % off reported converged) or
    # overflowed (a "non-finite product" that was not). A review's sweep; now scaled when needed.
    evals = torch.arange(1, 21, dtype=torch.float64) * scale
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    op = DenseOperator((q @ torch.diag(evals) @ q.T).to(dtype))
    res = eigenpairs(op, k=1, which="both", tol=1e-4, generator=torch.Generator().manual_seed(1))
    assert res.all_converged, res.reason
    assert float(res.eigenvalues[0]) == pytest.approx(20 * scale, rel=1e-4)
    assert float(res.eigenvalues[-1]) == pytest.approx(scale, rel=1e-3)
    assert float(op.norms(torch.full((20, 1), scale, dtype=dtype))[0]) == pytest.approx(scale * 20 ** 0.5, rel=1e-6)


@pytest.mark.parametrize("bad", [True, False, "1e-3", b"1"])
def test_tolerances_refuse_bools_and_strings(bad: object) -> None:
    # tol=True ran with a tolerance of 1 and tol="1e-3" was parsed (a review)
    op = DenseOperator(torch.diag(torch.arange(1.0, 6.0)))
    with pytest.raises(ValueError, match="tol must be a finite float >= 0"):
        eigenpairs(op, tol=bad)
    with pytest.raises(ValueError, match="tol_smallest must be a finite float >= 0"):
        eigenpairs(op, which="both", tol_smallest=bad)


def test_operators_refuse_non_tensors_with_the_parameter_named() -> None:
    # lists, integer and complex matrices raised AttributeError / TypeError / NotImplementedError from
    # deep inside (a review)
    for bad in ([[1.0]], torch.eye(2, dtype=torch.int64), torch.eye(2, dtype=torch.complex64)):
        with pytest.raises(ValueError, match="DenseOperator: matrix must be a real floating-point torch.Tensor"):
            DenseOperator(bad)
    op = DenseOperator(torch.eye(2))
    for cls in (ScaledOperator, PreconditionedOperator):
        with pytest.raises(ValueError, match=f"{cls.__name__}: diagonal must be a flat torch.Tensor"):
            cls(op, [1.0, 1.0])
        with pytest.raises(ValueError, match=f"{cls.__name__}: operator must be a CurvatureOperator"):
            cls(torch.eye(2), torch.ones(2))
