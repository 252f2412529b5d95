"""Bounded working memory of the eigen-solvers, reductions through ``CurvatureOperator.inner``, and
the eigenvalue-error stopping rule, against matrices with known spectra (float64)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from _reference import spectrum_matrix
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_rpe.curvature.eigen import eigenpairs, working_vectors
from lightning_rpe.curvature.hessian import HessianOperator
from lightning_rpe.curvature.lanczos import (
    default_max_basis,
    eigenvalue_errors,
    ritz_gaps,
)
from lightning_rpe.curvature.operator import CurvatureOperator, DenseOperator
from lightning_rpe.curvature.trace import trace


def spectrum(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # clustered top (gaps of 2-5 %), a bulk around 0 and a few negative outliers
    g = torch.Generator().manual_seed(seed)
    bulk = torch.randn(n - 8, generator=g, dtype=torch.float64) * 0.05
    l = torch.cat([torch.tensor([10.0, 9.8, 9.5, 9.0, 6.0, -1.0, -0.9, -0.5], dtype=torch.float64), bulk])
    A, Q = spectrum_matrix(l, seed=seed)
    return A, Q, torch.sort(l, descending=True).values


@pytest.mark.parametrize("which,k", [("largest", 1), ("largest", 3), ("smallest", 2), ("both", 1), ("both", 3)])
@pytest.mark.parametrize("cap", [6, 8, 12])
def test_restarted_lanczos_finds_the_same_eigenvalues(which, k, cap):
    A, _, l = spectrum()
    nw = k + 1 if which == "both" else k
    cap = max(cap, nw + 3)
    tol = 1e-8
    full = eigenpairs(DenseOperator(A), k=k, which=which, tol=tol, max_hvp=300, max_basis=300, method="lanczos")
    rest = eigenpairs(DenseOperator(A), k=k, which=which, tol=tol, max_hvp=2000, max_basis=cap, method="lanczos")
    assert full.all_converged and rest.all_converged, rest.reason
    expected = {"largest": l[:k], "smallest": l.flip(0)[:k], "both": torch.cat([l[:k], l[-1:]])}[which]
    scale = float(l.abs().max())
    assert torch.allclose(rest.eigenvalues, expected, atol=tol * scale, rtol=0)
    assert torch.allclose(rest.eigenvalues, full.eigenvalues, atol=tol * scale, rtol=0)
    true_res = (A @ rest.eigenvectors - rest.eigenvectors * rest.eigenvalues).norm(dim=0)
    assert bool((true_res <= 10 * tol * scale).all())
    # the restarted basis is capped, so it needs more products than the full one
    assert rest.n_hvp >= full.n_hvp


def test_restart_keeps_products_counted_and_budget_respected():
    A, _, _ = spectrum()
    op = DenseOperator(A)
    res = eigenpairs(op, k=1, which="both", tol=0.0, max_hvp=57, max_basis=7, method="lanczos")
    assert res.n_hvp == 57 == op.n_hvp
    assert not res.all_converged and "max_hvp=57" in res.reason


def test_solvers_reserve_their_working_vectors_on_the_operator():
    A, _, _ = spectrum(n=200)
    op = DenseOperator(A)
    assert op.reserved_vectors == 0
    eigenpairs(op, k=1, which="both")
    assert op.reserved_vectors == default_max_basis(200, 1, "both") + 1 + 2 == working_vectors(200, 1, "both", "lanczos")
    assert op.reserved_bytes == op.reserved_vectors * 200 * 8
    eigenpairs(op, k=1, which="both", init=torch.randn(200, 2, dtype=torch.float64), method="block")
    assert op.reserved_vectors == 10 * 2 + 2  # the larger request wins
    op2 = DenseOperator(A)
    trace(op2, n_hvp=30)
    assert op2.reserved_vectors > 0


def test_default_basis_cap_formula():
    assert default_max_basis(10_000, 1, "largest") == 12
    assert default_max_basis(10_000, 1, "both") == 12
    assert default_max_basis(10_000, 5, "both") == 20
    assert default_max_basis(7, 1, "largest") == 7
    with pytest.raises(ValueError, match="max_basis"):
        eigenpairs(DenseOperator(torch.eye(20, dtype=torch.float64)), k=2, max_basis=3)


class MetricOperator(CurvatureOperator):
    """``M^-1 A`` with the inner product ``<x, y> = x^T M y`` (M diagonal, positive): self-adjoint in
    that inner product, with the eigenvalues of ``M^-1/2 A M^-1/2``. A solver that reduces over the
    parameter dimension anywhere else than through ``inner`` gets wrong answers."""

    def __init__(self, A: torch.Tensor, m: torch.Tensor) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.m = A, m
        self.n_inner = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return (self.A @ V) / self.m.unsqueeze(1)

    def inner(self, X, Y, *, columnwise=False):
        self.n_inner += 1
        X = X.unsqueeze(1) if X.ndim == 1 else X
        Y = Y.unsqueeze(1) if Y.ndim == 1 else Y
        if columnwise:
            return (X * self.m.unsqueeze(1) * Y).sum(dim=0)
        return X.T @ (self.m.unsqueeze(1) * Y)


@pytest.mark.parametrize("method,init", [("lanczos", False), ("lanczos", True), ("block", False), ("block", True)])
def test_every_reduction_goes_through_inner(method, init):
    A, _, _ = spectrum(n=120, seed=3)
    g = torch.Generator().manual_seed(1)
    m = torch.rand(120, generator=g, dtype=torch.float64) * 3 + 0.2
    op = MetricOperator(A, m)
    s = m.rsqrt()
    expected = torch.linalg.eigvalsh(s[:, None] * A * s[None, :])
    start = torch.randn(120, 2, generator=g, dtype=torch.float64) if init else None
    res = eigenpairs(op, k=1, which="both", tol=1e-9, max_hvp=600, method=method, init=start, max_basis=10)
    assert res.all_converged, res.reason
    assert res.eigenvalues[0].item() == pytest.approx(float(expected[-1]), abs=1e-7)
    assert res.eigenvalues[1].item() == pytest.approx(float(expected[0]), abs=1e-7)
    # unit vectors in the operator's inner product
    assert torch.allclose(op.inner(res.eigenvectors, res.eigenvectors, columnwise=True), torch.ones(2, dtype=torch.float64))
    assert op.n_inner > 0


def test_trace_reductions_go_through_inner():
    A, _, _ = spectrum(n=60, seed=4)
    calls = []

    class Counting(DenseOperator):
        def inner(self, X, Y, *, columnwise=False):
            calls.append(columnwise)
            return super().inner(X, Y, columnwise=columnwise)

    est = trace(Counting(A), n_hvp=30)
    ref = trace(DenseOperator(A), n_hvp=30)
    assert est.estimate == pytest.approx(ref.estimate, rel=1e-12)
    assert True in calls and False in calls


def test_inner_validates_shapes():
    op = DenseOperator(torch.eye(4))
    assert op.inner(torch.ones(4), torch.ones(4)).shape == (1, 1)
    assert op.norms(torch.ones(4, 2)).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="inner"):
        op.inner(torch.ones(4, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="columnwise"):
        op.inner(torch.ones(4, 2), torch.ones(4, 3), columnwise=True)


# ---------------------------------------------------------------- eigenvalue-error stopping rule


def test_eigenvalue_error_estimate_formula():
    res = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    gaps = torch.tensor([1.0, 0.05, float("nan")], dtype=torch.float64)
    assert eigenvalue_errors(res, gaps).tolist() == pytest.approx([0.01, 0.1, 0.1])
    theta = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64)
    assert ritz_gaps(theta, r, torch.tensor([2, 0])).tolist() == pytest.approx([1.8, 0.8])


@pytest.mark.parametrize("method", ["lanczos", "block"])
def test_eigenvalue_criterion_is_accurate_and_cheaper(method):
    A, Q, l = spectrum(n=400, seed=5)
    scale = float(l.abs().max())
    tol = 1e-4
    kw = {"k": 1, "which": "both", "tol": tol, "max_hvp": 400, "method": method}
    g0 = torch.Generator().manual_seed(0)
    init = None
    if method == "block":  # a warm start a little off the true eigenvectors
        init = Q[:, [0, -1]] + 0.05 * torch.randn(400, 2, generator=g0, dtype=torch.float64) / 20
    by_res = eigenpairs(DenseOperator(A), init=init, criterion="residual", **kw)
    by_val = eigenpairs(DenseOperator(A), init=init, criterion="eigenvalue", gap=0.15, **kw)
    assert by_val.all_converged, by_val.reason
    expected = torch.tensor([l[0], l[-1]], dtype=torch.float64)
    assert bool(((by_val.eigenvalues - expected).abs() <= tol * scale).all())
    assert by_val.n_hvp <= by_res.n_hvp
    assert by_val.gaps is not None and bool((by_val.gaps <= 0.15).all())


@pytest.mark.parametrize("gap", [None, 0.05])
@pytest.mark.parametrize("bad", ["random", "bulk_and_top", "swapped", "interior", "neighbours"])
def test_eigenvalue_criterion_recovers_from_a_bad_warm_start(bad, gap):
    # Warm starts that are poor guesses end at the right eigenvalues whenever the residual
    # criterion does. spectrum(): Q[:, 0] is lambda_max = 10 (next 9.8), Q[:, 5] lambda_min = -1
    # (next -0.9, at Q[:, 6]); other columns >= 4 are the 6.0 eigenvector and the bulk near 0.
    A, Q, l = spectrum(n=300, seed=6)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(300, 2, generator=g, dtype=torch.float64) / 17  # about unit columns
    init = {
        "random": noise,
        "bulk_and_top": Q[:, [-1, 0]] + 0.1 * noise,  # no lambda_min direction
        "swapped": Q[:, [5, 0]] + 0.3 * noise,  # bottom first, top second, 30 % off
        "interior": Q[:, [4, 20]] + 0.3 * noise,  # the 6.0 eigenvector and a bulk one
        "neighbours": Q[:, [1, 6]] + 0.1 * noise,  # next to both wanted ones
    }[bad]
    tol = 1e-3
    scale = float(l.abs().max())
    expected = torch.tensor([float(l[0]), float(l[-1])], dtype=torch.float64)
    for method in ("block", "lanczos"):
        kw = {"k": 1, "which": "both", "tol": tol, "init": init, "method": method, "max_hvp": 300}
        by_val = eigenpairs(DenseOperator(A), criterion="eigenvalue", gap=gap, **kw)
        by_res = eigenpairs(DenseOperator(A), criterion="residual", **kw)
        assert by_val.all_converged, (method, by_val.reason)
        ok_val = (by_val.eigenvalues - expected).abs() <= tol * scale
        ok_res = (by_res.eigenvalues - expected).abs() <= tol * scale
        assert bool((ok_val | ~ok_res).all()), (method, by_val.eigenvalues, by_res.eigenvalues)
        assert by_val.n_hvp <= by_res.n_hvp
        if bad in ("random", "bulk_and_top", "swapped"):
            assert bool(ok_val.all()), (method, by_val.eigenvalues)


def test_a_start_next_to_the_neighbour_misleads_both_criteria():
    # the known limit of any warm start, whatever the stopping rule: a start that holds almost
    # nothing of the lambda_min eigenvector converges to its neighbour (-0.9) first
    A, Q, _ = spectrum(n=300, seed=6)
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / 17
    for criterion in ("residual", "eigenvalue"):
        res = eigenpairs(DenseOperator(A), k=1, which="both", tol=1e-3, init=Q[:, [1, 6]] + 0.1 * noise,
                         method="block", criterion=criterion, gap=0.05)
        assert res.lambda_min == pytest.approx(-0.9, abs=1e-2)


def test_gap_argument_is_validated():
    op = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
    with pytest.raises(ValueError, match="gap"):
        eigenpairs(op, k=1, which="both", gap=torch.ones(3))
    with pytest.raises(ValueError, match="criterion"):
        eigenpairs(op, criterion="vector")


# ---------------------------------------------------------------- memory does not grow with max_hvp

class _LiveVectors(TorchDispatchMode):
    """Peak number of live parameter-sized storages created inside the block (every ATen op's
    outputs seen; a storage counts from its creation until the tensor that created it dies).
    Storages of the tensors in ``existing`` (returned again by views, e.g. ``detach``) are not new."""

    def __init__(self, dim: int, itemsize: int = 8, min_bytes: int | None = None, existing=()) -> None:
        super().__init__()
        self.min_bytes = dim * 4 if min_bytes is None else min_bytes
        self.unit = dim * itemsize  # one vector in the solver's dtype (float64 by default)
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, int] = {}
        self.peak = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes >= self.min_bytes and ptr not in self.live and ptr not in self.existing:
                    self.live[ptr] = nbytes
                    weakref.finalize(t, self.live.pop, ptr, None)
                    self.peak = max(self.peak, sum(self.live.values()) / self.unit)
        return out


class Diagonal(CurvatureOperator):
    def __init__(self, d: torch.Tensor) -> None:
        super().__init__(d.shape[0], d.dtype, d.device)
        self.d = d

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d.unsqueeze(1) * V


@pytest.mark.parametrize("method,k,which,warm", [
    ("lanczos", 1, "both", False), ("lanczos", 5, "both", False), ("lanczos", 1, "largest", False),
    ("lanczos", 1, "both", True), ("block", 1, "both", True), ("block", 3, "largest", True),
])
def test_peak_vector_count_is_the_documented_bound(method, k, which, warm):
    dim = 20_000
    g = torch.Generator().manual_seed(0)
    d = torch.rand(dim, generator=g, dtype=torch.float64)
    nw = k + 1 if which == "both" else k
    init = torch.randn(dim, nw, generator=g, dtype=torch.float64) if warm else None
    bound = working_vectors(dim, k, which, method, init)
    peaks = []
    for max_hvp in (40, 200):
        tracker = _LiveVectors(dim, existing=[d, *([] if init is None else [init])])
        with tracker:
            res = eigenpairs(Diagonal(d), k=k, which=which, tol=0.0, max_hvp=max_hvp, method=method, init=init)
        assert res.n_hvp == max_hvp
        peaks.append(tracker.peak)
    # the bound includes the product A q the operator returns; Lanczos reaches it exactly, so a
    # Lanczos that keeps one more vector (a projection temporary, its start vector) fails here
    assert peaks[1] <= bound, (peaks, bound)
    assert peaks[1] == peaks[0], peaks
    if method == "lanczos" and nw <= 2:
        assert peaks[1] == bound, (peaks, bound)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    sys.path.insert(0, sys.argv[4])
    from test_bounded_memory import Diagonal
    from lightning_rpe.curvature.eigen import eigenpairs, working_vectors
    torch.set_num_threads(1)
    dim, max_hvp, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    g = torch.Generator().manual_seed(0)
    d = torch.rand(dim, generator=g) * 0.98
    d[:3] = torch.tensor([1.0, 0.995, -0.5])
    init = torch.randn(dim, 2, generator=g) if method == "block" else None
    # warm-up on a small operator: library code pages and workspaces are not the solver's vectors
    eigenpairs(Diagonal(d[:2000].clone()), k=1, which="both", tol=0.0, max_hvp=40, method=method,
               init=None if init is None else init[:2000].clone())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = eigenpairs(Diagonal(d), k=1, which="both", tol=0.0, max_hvp=max_hvp, method=method, init=init)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_kib": after - before, "n_hvp": res.n_hvp}))
    """
)


def _peak_rss(dim: int, max_hvp: int, method: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(dim), str(max_hvp), method, here],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["lanczos", "block"])
def test_peak_rss_does_not_grow_with_max_hvp(method):
    dim = 500_000  # 2 MB per float32 vector
    vec_kib = dim * 4 / 1024
    small, large = _peak_rss(dim, 20, method), _peak_rss(dim, 80, method)
    assert small["n_hvp"] == 20 and large["n_hvp"] == 80
    # an unrestarted Lanczos basis alone would grow by 60 vectors; allow the allocator's slack
    # (measured: Lanczos 21-22 vectors of RSS for 16 live, block 31-34 for 18 live)
    assert large["delta_kib"] <= small["delta_kib"] + 4 * vec_kib, (small, large)
    assert large["delta_kib"] <= 40 * vec_kib, large


# ---------------------------------------------------------------- what the Hessian operator holds

def _wide_model() -> tuple[torch.nn.Module, list]:
    # one 500 x 400 weight: the parameter vector is that weight, activations are tiny beside it
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(400, 500, bias=False), torch.nn.Tanh(), torch.nn.Linear(500, 1, bias=False))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 400, generator=g), torch.randn(4, 1, generator=g)) for _ in range(3)]
    return model, batches


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def _tracker(op, model, batches) -> _LiveVectors:
    # storages of at least 1/8 vector; the parameters, the operator's snapshot and cached graphs and the
    # batches existed before (an op returning a view of them, e.g. detach, allocates nothing)
    tensors = [*model.parameters(), *op._snapshot, *(t for b in batches for t in b)]
    for _, _, grads, _ in op._graphs or []:
        tensors += [g for g in grads if g is not None]
    return _LiveVectors(op.dim, itemsize=4, min_bytes=op.dim // 2, existing=tensors)


@pytest.mark.parametrize("cache_graphs", [True, False])
@pytest.mark.parametrize("n_batches", [1, 3])
def test_one_product_holds_one_vector_beside_its_output(cache_graphs, n_batches):
    """A product writes each batch's autograd result into its preallocated output: at most the output and
    one batch's result (before: a zeroed output, the joined result, its scaled copy and the divided sum)."""
    model, batches = _wide_model()
    batches = batches[:n_batches]
    op = HessianOperator(model, _mse, batches, cache_graphs=cache_graphs)
    v = torch.randn(op.dim)
    expected = op.matvec(v)  # builds (and with cache_graphs keeps) the graphs
    tracker = _tracker(op, model, batches)
    tracker.existing.add(v.untyped_storage().data_ptr())
    with tracker:
        hv = op.matvec(v)
    assert torch.equal(hv, expected)
    # the output and one autograd result (second-layer parts and activations are below 1/8 vector);
    # without cached graphs also the gradient inside the graph being built
    assert tracker.peak <= (2.2 if cache_graphs else 3.2), tracker.peak
    ref = HessianOperator(model, _mse, batches, dtype=torch.float64).matvec(v.double())
    assert torch.allclose(hv.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_loss_and_gradient_holds_one_vector():
    model, batches = _wide_model()
    op = HessianOperator(model, _mse, batches, cache_graphs=True)
    loss, grad = op.loss_and_gradient()  # builds the cached graphs
    tracker = _tracker(op, model, batches)
    with tracker:
        loss2, grad2 = op.loss_and_gradient()
    assert tracker.peak <= 1.01, tracker.peak
    assert loss2 == loss and torch.equal(grad2, grad)
    total = sum(b[0].shape[0] * _mse(model, b) for b in batches) / sum(b[0].shape[0] for b in batches)
    expected = torch.autograd.grad(total, list(model.parameters()))
    assert torch.allclose(grad, torch.cat([e.reshape(-1) for e in expected]), rtol=1e-5, atol=1e-7)


def test_operator_can_share_the_parameters_instead_of_copying_them():
    model, batches = _wide_model()
    first = HessianOperator(model, _mse, batches)
    tracker = _tracker(first, model, batches)
    with tracker:
        shared = HessianOperator(model, _mse, batches, copy_parameters=False)
    assert tracker.peak == 0.0, tracker.peak  # no parameter-sized allocation at all
    with tracker:
        copied = HessianOperator(model, _mse, batches)
    assert tracker.peak >= 0.99  # the snapshot (the default, copy_parameters=True): the whole 500 x 400 weight
    v = torch.randn(shared.dim)
    assert torch.equal(shared.matvec(v), copied.matvec(v))
    # a cast is a copy whatever copy_parameters says, so the float64 operator keeps its snapshot
    cast = HessianOperator(model, _mse, batches, dtype=torch.float64, copy_parameters=False)
    before = cast.matvec(v.double())
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # the live model moves (an optimizer step)
    assert torch.equal(copied.matvec(v), copied.matvec(v)) and torch.equal(cast.matvec(v.double()), before)
    with pytest.raises(RuntimeError, match="copy_parameters"):
        shared.matvec(v)
    with pytest.raises(RuntimeError, match="modified in place"):
        shared.loss_and_gradient()
    with pytest.raises(ValueError, match="copy_parameters"):
        HessianOperator(model, _mse, batches, copy_parameters=None)


def test_with_backend_in_another_dtype_casts_per_evaluation():
    # verify_operator's float64 finite-difference reference of a float32 operator: no float64 copy of the
    # snapshot is kept beside the float32 one, and the products are those of an eagerly cast operator
    model, batches = _wide_model()
    op = HessianOperator(model, _mse, batches)
    tracker = _tracker(op, model, batches)
    with tracker:
        fd = op.with_backend("finite_difference", dtype=torch.float64)
        ad = op.with_backend("autograd", dtype=torch.float64)
    assert tracker.peak == 0.0, tracker.peak
    v = torch.randn(op.dim, dtype=torch.float64)
    twin, _ = _wide_model()  # the same weights, cast eagerly
    reference = HessianOperator(twin.double(), _mse, [(x.double(), y.double()) for x, y in batches], dtype=torch.float64)
    assert torch.equal(ad.matvec(v), reference.matvec(v))
    assert torch.equal(fd.matvec(v), reference.with_backend("finite_difference").matvec(v))


def test_eigenvalue_criterion_needs_a_ritz_gap():
    # a gap passed in (here absurdly large) says nothing about the neighbours of the first Ritz value:
    # the solve must not stop after one product on the Rayleigh quotient of its start vector
    A, _, l = spectrum(n=300, seed=7)
    res = eigenpairs(DenseOperator(A), k=1, which="largest", tol=1e-3, criterion="eigenvalue", gap=1e30,
                     method="lanczos")
    assert res.n_hvp > 1
    assert res.lambda_max == pytest.approx(float(l[0]), rel=1e-3)


def test_available_memory_counts_what_the_allocators_hold_unused(monkeypatch):
    from lightning_rpe.curvature import hessian

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 << 30)
    # free on the device plus the 4 GiB PyTorch's caching allocator keeps without using them
    assert hessian._available_bytes(torch.device("cuda", 0)) == 7 << 30
    cpu = hessian._available_bytes(torch.device("cpu"))
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    # free pages plus reclaimable cache (read twice: other processes move it a little in between)
    assert abs(cpu - int(meminfo["MemAvailable"].split()[0]) * 1024) <= 256 << 20


def test_lanczos_frees_a_warm_block_passed_as_the_only_reference():
    """eigenpairs drops the warm block once the start vector is built (measure.solve passes its only
    reference): k + 1 parameter vectors less during the whole warm solve."""
    A, Q, _ = spectrum(200)
    base = DenseOperator(A)
    seen: list[bool] = []

    class Watching(DenseOperator):
        def matmat(self, V):
            seen.append(ref() is None)
            return super().matmat(V)

    op = Watching(A)
    block = [Q[:, :2].clone() + 1e-3]
    ref = weakref.ref(block[0])
    res = eigenpairs(op, k=1, which="both", tol=1e-8, method="lanczos", init=block.pop())
    assert seen and all(seen)  # dead before the first product
    ref_res = eigenpairs(base, k=1, which="both", tol=1e-8, method="lanczos")
    assert torch.allclose(res.eigenvalues, ref_res.eigenvalues, rtol=1e-6)


def test_tracker_update_holds_no_float64_copy_of_the_block():
    """The geometry of a top_k=5 measurement works one float64 row range at a time: measured 50 float32
    vectors at its peak before (float64 copies and QRs of (dim, 5) blocks), 9 now."""
    from lightning_rpe.geometry import EigenvectorTracker

    dim, k = 2_000_000, 5
    g = torch.Generator().manual_seed(0)

    def block() -> torch.Tensor:
        return torch.linalg.qr(torch.randn(dim, k, generator=g))[0].contiguous()

    a, b, c = block(), block(), block()
    tracker = EigenvectorTracker()
    tracker.update(0, a, torch.randn(dim, generator=g), k=k)
    tracker.update(1, b, torch.randn(dim, generator=g), k=k)
    held = [a, b, c, tracker.previous_top, tracker.reference_top, tracker.previous_min, tracker.polarity.reference]
    mode = _LiveVectors(dim, itemsize=4, min_bytes=1 << 20, existing=[t for t in held if t is not None])
    with mode:
        rot = tracker.update(2, c, None, k=k)
    assert mode.peak <= 12
    assert rot.subspace_similarity is not None and rot.subspace_similarity_to_first is not None
