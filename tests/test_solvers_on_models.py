"""Solvers on real network Hessians: eigenpairs and trace against dense float64 references.

The reference Hessian of each small model is built independently of ``HessianOperator``, row by
row with double backward through ``torch.autograd``, and checked against central finite
differences of the gradient. Then Lanczos, the block solver and Hutch++ running on
``HessianOperator`` must reproduce its top-k eigenvalues, lambda_min, eigenvectors and trace.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_rpe.curvature.eigen import eigenpairs
from lightning_rpe.curvature.hessian import HessianOperator
from lightning_rpe.curvature.trace import trace


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


class TiedFrozen(nn.Module):
    """enc and dec share one weight (tied); mid is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.mid = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight
        self.mid.requires_grad_(False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.mid(torch.tanh(self.enc(x)))))))


def make_case(name: str):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)  # stable across processes
    torch.manual_seed(1234)  # module initialisation only; the solvers never touch the global RNG
    if name == "tanh_mlp":
        model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(40, 8, generator=g)
        batches = [(x[:25], torch.randn(25, 3, generator=g)), (x[25:], torch.randn(15, 3, generator=g))]
        loss = mse
    elif name == "relu_mlp":
        model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
        x = torch.randn(48, 8, generator=g)
        y = torch.randint(0, 4, (48,), generator=g)
        batches = [(x[:32], y[:32]), (x[32:], y[32:])]
        loss = cross_entropy
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        x = torch.randn(30, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (30,), generator=g)
        batches = [(x[:20], y[:20]), (x[20:], y[20:])]
        loss = cross_entropy
    elif name == "batchnorm_eval":
        model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 3))
        bn = model[1]
        bn.running_mean.copy_(0.3 * torch.randn(10, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(10, generator=g))
        with torch.no_grad():
            bn.weight.copy_(1 + 0.3 * torch.randn(10, generator=g))
            bn.bias.copy_(0.2 * torch.randn(10, generator=g))
        x = torch.randn(36, 6, generator=g)
        y = torch.randint(0, 3, (36,), generator=g)
        batches = [(x[:20], y[:20]), (x[20:], y[20:])]
        loss = cross_entropy
    elif name == "tied_frozen":
        model = TiedFrozen()
        x = torch.randn(30, 6, generator=g)
        batches = [(x[:18], torch.randn(18, 3, generator=g)), (x[18:], torch.randn(12, 3, generator=g))]
        loss = mse
    else:  # pragma: no cover
        raise KeyError(name)
    model = model.double()
    batches = [(bx.double(), by.double() if by.is_floating_point() else by) for bx, by in batches]
    return model, loss, batches


def mean_loss(model, loss_fn, batches):
    total = sum(b[0].shape[0] for b in batches)
    return sum(b[0].shape[0] * loss_fn(model, b) for b in batches) / total


def flat_grad(model, loss_fn, batches, params, create_graph=False):
    grads = torch.autograd.grad(mean_loss(model, loss_fn, batches), params, create_graph=create_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1) for gr, p in zip(grads, params)])


def dense_hessian(model, loss_fn, batches):
    """Row-by-row double backward over the trainable parameters (deduplicated), float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = flat_grad(model, loss_fn, batches, params, create_graph=True)
    rows = []
    for i in range(g.shape[0]):
        r = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(r, params)]))
    H = torch.stack(rows).detach()
    return (H + H.T) / 2, params


def finite_difference_check(model, loss_fn, batches, params, H, n_dir=3, h=1e-5):
    g = torch.Generator().manual_seed(7)
    for _ in range(n_dir):
        v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
        v = v / v.norm()

        def grad_at(shift):
            with torch.no_grad():
                offset = 0
                for p in params:
                    p.add_(shift * v[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            out = flat_grad(model, loss_fn, batches, params).detach()
            with torch.no_grad():
                offset = 0
                for p in params:
                    p.sub_(shift * v[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            return out

        fd = (grad_at(h) - grad_at(-h)) / (2 * h)
        Hv = H @ v
        assert float((fd - Hv).norm() / Hv.norm()) < 1e-6


CASES = ["tanh_mlp", "relu_mlp", "cnn", "batchnorm_eval", "tied_frozen"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model, loss_fn, batches = make_case(request.param)
    was_training = model.training
    model.eval()  # the reference uses running statistics, as batchnorm="eval" does
    H, params = dense_hessian(model, loss_fn, batches)
    finite_difference_check(model, loss_fn, batches, params, H)
    model.train(was_training)
    evals, evecs = torch.linalg.eigh(H)
    return request.param, model, loss_fn, batches, H, evals, evecs


def operator_for(model, loss_fn, batches, dtype=torch.float64):
    return HessianOperator(model, loss_fn, batches, dtype=dtype, batchnorm="eval")


def test_dense_operator_matches_reference(case):
    name, model, loss_fn, batches, H, evals, _ = case
    op = operator_for(model, loss_fn, batches)
    assert op.dim == H.shape[0]
    if name == "tied_frozen":
        assert op.dim == 6 * 6 + 6 + 6 + 3 * 6 + 3  # enc weight (tied with dec) and bias, dec bias, head; mid frozen
    dense = op.to_dense()
    assert torch.allclose(dense, H, atol=1e-10 * float(H.abs().max()), rtol=1e-8)
    # the exact trace through to_dense equals the reference
    assert float(dense.trace()) == pytest.approx(float(H.trace()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("method", ["lanczos", "block"])
def test_top_k_and_lambda_min(case, method):
    name, model, loss_fn, batches, H, evals, evecs = case
    op = operator_for(model, loss_fn, batches)
    scale = float(evals.abs().max())
    k = 3
    for tol in (1e-3, 1e-7):
        # Lanczos is exact after dim products; LOBPCG keeps a 3-block subspace and needs ~2x Lanczos
        budget = op.dim if method == "lanczos" else 3 * op.dim
        res = eigenpairs(op, k=k, which="both", tol=tol, max_hvp=budget, method=method)
        assert res.all_converged, res.reason
        expected = torch.cat([evals.flip(0)[:k], evals[:1]])
        # Kato bound: |theta - lambda| <= residual (<= tol * max|theta| <= tol * scale)
        assert (res.eigenvalues - expected).abs().max() <= tol * scale * (1 + 1e-6) + 1e-12
        true = (H @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
        assert torch.allclose(res.residuals, true, atol=1e-9 * scale)
    # eigenvectors: |cos| > 0.999 wherever the residual / gap bound allows it
    order = torch.cat([torch.arange(H.shape[0] - 1, H.shape[0] - 1 - k, -1), torch.tensor([0])])
    checked = 0
    for j, i in enumerate(order.tolist()):
        gap = min([abs(float(evals[i] - evals[t])) for t in (i - 1, i + 1) if 0 <= t < H.shape[0]])
        if float(res.residuals[j]) / gap < 0.03:
            cos = float((res.eigenvectors[:, j] @ evecs[:, i]).abs())
            assert cos > 0.999, (name, j, cos)
            checked += 1
    assert checked >= 2  # lambda_max and lambda_min are separated in every case here


def test_warm_start_after_a_parameter_step(case):
    name, model, loss_fn, batches, H, evals, _ = case
    op = operator_for(model, loss_fn, batches)
    before = eigenpairs(op, k=2, which="both", tol=1e-4, max_hvp=op.dim)
    # a small gradient step moves the Hessian a little; re-solve warm and cold
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    grads = torch.autograd.grad(mean_loss(model.eval(), loss_fn, batches), params, allow_unused=True)
    try:
        with torch.no_grad():
            for p, gr in zip(params, grads):
                if gr is not None:
                    p.sub_(1e-3 * gr / max(float(evals.abs().max()), 1.0))
        moved = operator_for(model, loss_fn, batches)
        cold = eigenpairs(moved, k=2, which="both", tol=1e-4, max_hvp=moved.dim)
        moved2 = operator_for(model, loss_fn, batches)
        warm = eigenpairs(moved2, k=2, which="both", tol=1e-4, max_hvp=moved2.dim, init=before.eigenvectors)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    assert cold.all_converged and warm.all_converged
    scale = float(evals.abs().max())
    assert (warm.eigenvalues - cold.eigenvalues).abs().max() <= 2e-4 * scale
    assert warm.n_hvp < 0.5 * cold.n_hvp


def test_trace_hutchpp(case):
    name, model, loss_fn, batches, H, evals, _ = case
    op = operator_for(model, loss_fn, batches)
    true = float(H.trace())
    n_hvp = 3 * (op.dim // 6)  # sketch of dim/6 columns, leaving room for deflated probes
    for seed in range(3):
        res = trace(op, n_hvp=n_hvp, generator=torch.Generator().manual_seed(seed))
        assert res.n_hvp == n_hvp
        assert abs(res.estimate - true) <= 4 * res.std_error + 1e-10 * abs(true)


def test_float32_operator_on_a_model():
    model, loss_fn, batches = make_case("tanh_mlp")
    model.eval()
    H, _ = dense_hessian(model, loss_fn, batches)
    evals = torch.linalg.eigvalsh(H)
    op = operator_for(model, loss_fn, batches, dtype=torch.float32)
    state = torch.get_rng_state()
    res = eigenpairs(op, k=2, which="both", tol=1e-3)
    assert torch.equal(torch.get_rng_state(), state)
    assert res.eigenvectors.dtype == torch.float32 and res.all_converged
    scale = float(evals.abs().max())
    expected = torch.stack([evals[-1], evals[-2], evals[0]])
    assert (res.eigenvalues - expected).abs().max() <= 1e-3 * scale
