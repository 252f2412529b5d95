"""HessianOperator: products against finite differences and dense Hessians, weighting, reduce hook,
dtype handling, the "nothing observable changes" guarantees and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import cast_batch, fd_hvp, flat_grads
from torch import nn

from lightning_rpe.curvature.hessian import HessianOperator

BACKENDS = ["autograd", "func"]


# ----------------------------------------------------------------------------- references
def dense_double_backward(model, loss_fn, batches, *, mode=lambda m: m.eval()):
    """Dense float64 Hessian built row by row with double backward on a float64 copy."""
    ref = copy.deepcopy(model).double()
    mode(ref)
    params = [p for p in ref.parameters() if p.requires_grad]
    sizes = [float(b[0].shape[0]) for b in batches]
    total = sum(n * loss_fn(ref, cast_batch(b, torch.float64)) for n, b in zip(sizes, batches)) / sum(sizes)
    g = flat_grads(torch.autograd.grad(total, params, create_graph=True), params)
    rows = [flat_grads(torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True), params) for i in range(g.numel())]
    return torch.stack(rows)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def mse_loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def mlp(act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 4), act(), nn.Linear(4, 3))


def regression_batches(sizes=(8, 5), seed=1, d_in=5, d_out=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)) for n in sizes]


def unit(dim, seed=2):
    v = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


# ----------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.GELU])
def test_mlp_matches_finite_differences(backend, act):
    model, batches = mlp(act), regression_batches()
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float64, backend=backend)
    v = unit(op.dim)
    assert rel(op.matvec(v), fd_hvp(model, mse_loss, batches, v)) <= 1e-6
    assert op.backend == backend


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("cache", [None, True, False])
def test_dense_hessian_matches_row_by_row_double_backward(backend, cache):
    model, batches = mlp(nn.Tanh), regression_batches()
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float64, backend=backend, cache_graphs=cache)
    H = op.to_dense()
    ref = dense_double_backward(model, mse_loss, batches)
    assert rel(H, ref) <= 1e-12
    assert rel(H, H.T) <= 1e-12
    assert op.n_hvp == op.dim
    # block product and single products agree, and products are counted per column
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    before = op.n_hvp
    block = op.matmat(V)
    assert op.n_hvp == before + 3
    cols = torch.stack([op.matvec(V[:, j]) for j in range(3)], 1)
    assert rel(block, cols) <= 1e-12
    assert rel(block, ref @ V) <= 1e-12


def test_auto_uses_autograd_and_caches_small_graphs():
    model, batches = mlp(), regression_batches()
    op = HessianOperator(model, mse_loss, batches)
    assert op.backend == "autograd"
    op.matvec(torch.ones(op.dim))
    assert op.cache_graphs is True and op.graph_bytes_estimate > 0


def test_auto_rule_and_quiet_auto_fallback():
    from lightning_rpe.curvature.hessian import _auto_backend

    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
    assert _auto_backend(cnn, torch.device("cuda")) == "func"
    assert _auto_backend(cnn, torch.device("cpu")) == "autograd"
    assert _auto_backend(mlp(), torch.device("cuda")) == "autograd"
    # auto falls back without a warning when torch.func cannot trace (F.mse_loss on torch 2.13)
    model, batches = mlp(), regression_batches()

    def loss(m, b):
        return F.mse_loss(m(b[0]), b[1])

    op = HessianOperator(model, loss, batches, dtype=torch.float64, backend="auto")
    op.backend = "func"  # what auto picks for a CNN on CUDA; forced here on CPU
    v = unit(op.dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = op.matvec(v)
    if op.fallback_reason is not None:
        assert op.backend == "autograd" and "ZeroTensor" in op.fallback_reason
    assert rel(out, fd_hvp(model, loss, batches, v)) <= 1e-6


def test_auto_cache_declines_graphs_that_do_not_fit(monkeypatch):
    import lightning_rpe.curvature.hessian as hessian

    model, batches = mlp(), regression_batches()
    monkeypatch.setattr(hessian, "_available_bytes", lambda device: 1024)
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float64)
    H = op.to_dense()
    assert op.cache_graphs is False and op._graphs is None
    assert op.graph_bytes_estimate > 256  # the first graph alone saves more than a quarter of 1 KiB
    assert rel(H, dense_double_backward(model, mse_loss, batches)) <= 1e-12


def test_loss_using_model_parameters_sees_the_snapshot():
    """A penalty written with model.parameters() inside loss_fn is part of the Hessian."""
    model, batches = mlp(), regression_batches()

    def penalised(m, b):
        return mse_loss(m, b) + 0.05 * sum((p**2).sum() for p in m.parameters())

    for backend in BACKENDS:
        op = HessianOperator(model, penalised, batches, dtype=torch.float64, backend=backend)
        plain = HessianOperator(model, mse_loss, batches, dtype=torch.float64, backend=backend)
        assert rel(op.to_dense(), plain.to_dense() + 0.1 * torch.eye(op.dim, dtype=torch.float64)) <= 1e-12


def test_batched_double_backward_falls_back_to_a_column_loop(monkeypatch):
    model, batches = mlp(), regression_batches()
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float64, backend="autograd")
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    expected = op.matmat(V)
    real_grad = torch.autograd.grad

    def no_batched(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::something")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batched)
    with pytest.warns(RuntimeWarning, match="one by one"):
        out = op.matmat(V)
    assert rel(out, expected) <= 1e-14
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel(op.matmat(V), expected) <= 1e-14


def test_batch_size_weighting_with_unequal_batches():
    model = mlp()
    batches = regression_batches(sizes=(9, 2, 4))
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float64)
    per_batch = [HessianOperator(model, mse_loss, [b], dtype=torch.float64).to_dense() for b in batches]
    expected = (9 * per_batch[0] + 2 * per_batch[1] + 4 * per_batch[2]) / 15
    assert rel(op.to_dense(), expected) <= 1e-12
    # the plain (unweighted) mean of the per-batch Hessians is a different matrix
    assert rel(sum(per_batch) / 3, expected) > 1e-3
    # custom batch size function: equal weights give the plain mean
    eq = HessianOperator(model, mse_loss, batches, dtype=torch.float64, batch_size_fn=lambda b: 1)
    assert rel(eq.to_dense(), sum(per_batch) / 3) <= 1e-12


def test_default_batch_size_finds_first_tensor_in_nested_batches():
    model = mlp()
    x, y = regression_batches(sizes=(6,))[0]
    nested = {"meta": "text", "data": [(x,), y]}
    op = HessianOperator(model, lambda m, b: ((m(b["data"][0][0]) - b["data"][1]) ** 2).mean(), [nested])
    assert op.batch_sizes == (6.0,)


def test_reduce_hook_scaling_and_two_rank_simulation():
    model = mlp()
    batches = regression_batches(sizes=(7, 3, 5, 4))
    union = HessianOperator(model, mse_loss, batches, dtype=torch.float64)
    H = union.to_dense()
    doubled = HessianOperator(model, mse_loss, batches, dtype=torch.float64, reduce=lambda t: 2 * t)
    assert rel(doubled.to_dense(), H) <= 1e-12
    assert doubled.total_weight == 2 * 19

    # two "ranks": each reduce returns its own local sum plus the other rank's local sum
    local = [
        HessianOperator(model, mse_loss, batches[:1], dtype=torch.float64),
        HessianOperator(model, mse_loss, batches[1:], dtype=torch.float64),
    ]
    V = torch.randn(union.dim, 2, dtype=torch.float64)
    sums = [sum(n * HessianOperator(model, mse_loss, [b], dtype=torch.float64).matmat(V) for n, b in
                zip(op.batch_sizes, op.batches)) for op in local]
    ranks = [
        HessianOperator(model, mse_loss, batches[:1], dtype=torch.float64, reduce=lambda t, o=sums[1]: _add_other(t, o, 19 - 7)),
        HessianOperator(model, mse_loss, batches[1:], dtype=torch.float64, reduce=lambda t, o=sums[0]: _add_other(t, o, 7)),
    ]
    for op in ranks:
        assert op.total_weight == 19
        assert rel(op.matmat(V), H @ V) <= 1e-12


def _add_other(t, other_products, other_weight):
    if t.ndim == 0:
        return t + other_weight
    return t + other_products


def test_reduce_applied_once_per_product_and_to_loss_and_gradient():
    calls = []

    def reduce(t):
        calls.append(tuple(t.shape))
        return t

    model, batches = mlp(), regression_batches()
    op = HessianOperator(model, mse_loss, batches, reduce=reduce)
    assert calls == [()]
    op.matmat(torch.randn(op.dim, 4))
    assert calls[1:] == [(op.dim, 4)]
    op.loss_and_gradient()
    assert calls[2:] == [(op.dim + 1,)]


@pytest.mark.parametrize("cache", [True, False])
def test_loss_and_gradient(cache):
    model = mlp()
    batches = regression_batches(sizes=(6, 3))
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float64, cache_graphs=cache)
    loss, grad = op.loss_and_gradient()
    ref = copy.deepcopy(model).double()
    total = sum(n * mse_loss(ref, cast_batch(b, torch.float64)) for n, b in zip((6, 3), batches)) / 9
    expected = flat_grads(torch.autograd.grad(total, list(ref.parameters())), list(ref.parameters()))
    assert loss == pytest.approx(float(total.detach()), rel=1e-12)
    assert grad.dtype == torch.float64 and grad.shape == (op.dim,)
    assert rel(grad, expected) <= 1e-12
    assert op.n_hvp == 0


def test_snapshot_is_taken_at_construction():
    model, batches = mlp(), regression_batches()
    op = HessianOperator(model, mse_loss, batches, dtype=torch.float64, cache_graphs=False)
    H0 = op.to_dense()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    assert rel(op.to_dense(), H0) <= 1e-14
    assert rel(HessianOperator(model, mse_loss, batches, dtype=torch.float64).to_dense(), H0) > 1e-3


def test_flatten_unflatten_and_names():
    model = mlp()
    op = HessianOperator(model, mse_loss, regression_batches())
    assert op.names == tuple(n for n, _ in model.named_parameters())
    assert all(a is b for a, b in zip(op.parameters, model.parameters()))
    v = torch.arange(op.dim, dtype=torch.float32)
    parts = op.unflatten(v)
    assert [p.shape for p in parts] == [p.shape for p in model.parameters()]
    assert torch.equal(op.flatten(parts), v)
    assert torch.equal(op.flatten({p: t for p, t in zip(op.parameters, parts)}), v)
    with pytest.raises(ValueError, match="missing"):
        op.flatten({op.parameters[0]: parts[0]})
    with pytest.raises(ValueError, match="one per parameter"):
        op.flatten(parts[:-1])
    with pytest.raises(ValueError, match="shape"):
        op.unflatten(v[:-1])


# ----------------------------------------------------------------------------- dtype handling
def test_bf16_model_and_autocast_give_float32_products_of_a_float32_copy():
    model32 = mlp(nn.Tanh)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    batches = regression_batches()
    # the reference is the float32 copy of the bf16 weights
    ref_model = copy.deepcopy(model16).float()
    ref = HessianOperator(ref_model, mse_loss, batches)
    V = torch.randn(ref.dim, 2)
    expected = ref.matmat(V)
    op16 = HessianOperator(model16, mse_loss, [cast_batch(b, torch.bfloat16) for b in batches])
    assert op16.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op16.matmat(V)
        loss, grad = op16.loss_and_gradient()
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    # inputs were bf16 (cast to float32 inside), so compare with the float32 copy on bf16-rounded inputs
    ref_rounded = HessianOperator(ref_model, mse_loss, [cast_batch(cast_batch(b, torch.bfloat16), torch.float32) for b in batches])
    assert torch.equal(out, ref_rounded.matmat(V))  # the same float32 computation, bit for bit
    assert rel(out, expected) < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = ref.matmat(V)
    assert torch.equal(out32, expected)  # autocast is switched off inside products
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())


def test_products_work_inside_no_grad_and_inference_mode():
    model, batches = mlp(), regression_batches()
    op = HessianOperator(model, mse_loss, batches, cache_graphs=False)
    v = torch.randn(op.dim)
    expected = op.matvec(v)
    with torch.no_grad():
        assert torch.allclose(op.matvec(v), expected)
    with torch.inference_mode():
        inf_batches = [tuple(t.clone() for t in b) for b in batches]
        op_inf = HessianOperator(model, mse_loss, inf_batches, cache_graphs=False)
        assert torch.allclose(op_inf.matvec(v), expected)


# ----------------------------------------------------------------------------- nothing observable changes
class _BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(self.drop(torch.tanh(self.bn(self.l1(x)))))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", [*BACKENDS, "finite_difference"])
@pytest.mark.parametrize("batchnorm", ["eval", "batch"])
@pytest.mark.parametrize("dropout", ["off", "on"])
@pytest.mark.parametrize("training", [True, False])
def test_nothing_observable_changes(backend, batchnorm, dropout, training):
    torch.manual_seed(0)
    model = _BNDropNet()
    model.train(training)
    model.l1.train(not training)  # a non-norm/dropout module with its own mode: kept as is
    batches = regression_batches()
    # a training step first, so .grad and running statistics are non-trivial
    mse_loss(model, batches[0]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = _state(model)
    flags = {n: m.training for n, m in model.named_modules()}
    track = model.bn.track_running_stats
    rng = torch.get_rng_state()
    fastpath = torch.backends.mha.get_fastpath_enabled()

    op = HessianOperator(model, mse_loss, batches, backend=backend, batchnorm=batchnorm, dropout=dropout)
    op.matmat(torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(0)))
    op.matvec(torch.ones(op.dim))
    op.loss_and_gradient()
    op.to_dense()

    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    after = _state(model)
    assert after.keys() == state.keys()
    for k in state:
        assert torch.equal(after[k], state[k]), k  # params bit for bit, BN running stats, num_batches_tracked
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.bn.track_running_stats is track
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_flags_restored_when_loss_raises():
    model = _BNDropNet().train()
    def bad_loss(m, b):
        mse_loss(m, b)
        raise KeyError("boom")

    op = HessianOperator(model, bad_loss, regression_batches(sizes=(4,)), cache_graphs=False)
    rng = torch.get_rng_state()
    with pytest.raises(KeyError):
        op.matvec(torch.ones(op.dim))
    with pytest.raises(KeyError):
        op.matvec(torch.ones(op.dim))
    assert model.bn.training and model.drop.training and model.bn.track_running_stats
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", [True, False])
def test_dropout_on_is_deterministic_and_symmetric(backend, cache):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    batches = regression_batches()
    on = HessianOperator(model, mse_loss, batches, dtype=torch.float64, dropout="on", backend=backend, cache_graphs=cache)
    off = HessianOperator(model, mse_loss, batches, dtype=torch.float64, dropout="off", backend=backend)
    v = unit(on.dim)
    assert torch.equal(on.matvec(v), on.matvec(v))
    H = on.to_dense()
    assert rel(H, H.T) <= 1e-12
    assert rel(H, off.to_dense()) > 1e-2  # masks are really applied
    again = HessianOperator(model, mse_loss, batches, dtype=torch.float64, dropout="on", backend="autograd")
    assert rel(again.to_dense(), H) <= 1e-12  # both paths and both cache modes see the same masks
    # "off" equals the eval-mode Hessian
    assert rel(off.to_dense(), dense_double_backward(model, mse_loss, batches)) <= 1e-12


# ----------------------------------------------------------------------------- non-finite values and errors
def test_non_finite_loss_raises_in_loss_and_gradient_but_not_in_products():
    model = mlp()
    x, y = regression_batches(sizes=(4, 4))[0], regression_batches(sizes=(4,))[0]
    bad = (x[0].clone(), x[1].clone())
    bad[0][0, 0] = float("nan")
    op = HessianOperator(model, mse_loss, [y, bad])
    with pytest.raises(ValueError, match="batch 1"):
        op.loss_and_gradient()
    out = op.matvec(torch.ones(op.dim))
    assert not bool(torch.isfinite(out).all())
    # a "rank" whose own batches are finite still joins the reduction, then raises too
    calls = []

    def reduce_with_nan_peer(t):
        calls.append(t.shape)
        return t if t.ndim == 0 else t + float("nan")

    peer = HessianOperator(model, mse_loss, [y], reduce=reduce_with_nan_peer)
    with pytest.raises(ValueError, match="another process"):
        peer.loss_and_gradient()
    assert calls == [torch.Size([]), torch.Size([peer.dim + 1])]


def test_non_scalar_loss_names_the_batch():
    model = mlp()
    batches = regression_batches(sizes=(4, 4))

    def per_example(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean(1)

    for backend in BACKENDS:
        op = HessianOperator(model, per_example, batches, backend=backend)
        with pytest.raises(ValueError, match="scalar.*batch 0"):
            op.loss_and_gradient()
        with pytest.raises(ValueError, match="scalar.*batch 0"):
            op.matvec(torch.ones(op.dim))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backend": "jax"}, "backend must be one of 'auto', 'func', 'autograd'"),
        ({"batchnorm": "train"}, "batchnorm must be one of 'eval', 'batch'"),
        ({"dropout": True}, "dropout must be one of 'off', 'on'"),
        ({"dtype": torch.float16}, "dtype must be one of torch.float32, torch.float64"),
        ({"cache_graphs": "yes"}, "cache_graphs must be one of"),
        ({"batch_size_fn": lambda b: 0}, "positive"),
        ({"reduce": 3}, "reduce must be a callable"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianOperator(mlp(), mse_loss, regression_batches(), **kwargs)


def test_structural_errors():
    with pytest.raises(ValueError, match="non-empty"):
        HessianOperator(mlp(), mse_loss, [])
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(frozen, mse_loss, regression_batches())
    with pytest.raises(ValueError, match="batch_size_fn"):
        HessianOperator(mlp(), lambda m, b: m(b["x"]).sum(), [{"x": "not a tensor"}])
    op = HessianOperator(mlp(), mse_loss, regression_batches())
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.ones(op.dim + 1))


def test_func_fallback_warns_once_and_stays_correct():
    model, batches = mlp(), regression_batches()

    def loss(m, b):
        return F.mse_loss(m(b[0]), b[1])

    op = HessianOperator(model, loss, batches, dtype=torch.float64, backend="func")
    v = unit(op.dim)
    with pytest.warns(RuntimeWarning, match="falls back"):
        out = op.matvec(v)
    assert op.backend == "autograd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.matvec(v)
    assert rel(out, fd_hvp(model, loss, batches, v)) <= 1e-6
