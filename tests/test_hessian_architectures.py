"""HessianOperator on the architectures researchers use, against finite differences in float64.

Every case compares ``H v`` with a Richardson-extrapolated central difference of the float64
gradient (truncation error O(h^4)) at relative error <= 1e-6, for each AD path. Where
``torch.func`` cannot trace a loss, the operator must fall back (with a warning) and still be
right; ``backend="auto"`` must never pick a path that gives a wrong answer.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import fd_hvp
from torch import nn

from lightning_rpe.curvature.hessian import HessianOperator

TOL = 1e-6


# ----------------------------------------------------------------------------- reference
def eval_mode(m):
    m.eval()


def batch_stats_mode(m):
    m.eval()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()
            mod.track_running_stats = False


def check(model, loss_fn, batches, *, backend, mode=eval_mode, n_dirs=2, **kwargs):
    """Assert the operator matches finite differences; return the operator."""
    op = HessianOperator(model, loss_fn, batches, dtype=torch.float64, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(7)
    V = torch.randn(op.dim, n_dirs, dtype=torch.float64, generator=gen)
    V /= V.norm(dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fallback warnings are tested separately
        HV = op.matmat(V)
        hv0 = op.matvec(V[:, 0])
    for j in range(n_dirs):
        ref = fd_hvp(model, loss_fn, batches, V[:, j], mode)
        err = float((HV[:, j] - ref).norm() / ref.norm())
        assert err <= TOL, f"direction {j}: relative error {err:.2e} (backend {op.backend})"
    assert float((hv0 - HV[:, 0]).norm()) <= 1e-12 * float(HV[:, 0].norm())
    if backend == "auto":  # the auto rule on CPU: double backward (func only for CNNs on CUDA)
        assert op.backend == "autograd" and op.fallback_reason is None
    return op


ALL = ["auto", "autograd", "func"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def sq(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


# ----------------------------------------------------------------------------- CNN and norms
def _cnn(norm=None):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 3, 3, padding=1)]
    if norm == "bn":
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)]
    model = nn.Sequential(*layers)
    if norm == "bn":
        bn = model[1]
        bn.running_mean.normal_(0, 0.3, generator=_gen(3))
        bn.running_var.uniform_(0.5, 2.0, generator=_gen(4))
        nn.init.normal_(bn.weight, 1.0, 0.2)
        nn.init.normal_(bn.bias, 0.0, 0.2)
    return model


def _images(sizes=(6, 4), seed=1):
    g = _gen(seed)
    return [(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("backend", ALL)
def test_cnn_cross_entropy(backend):
    check(_cnn(), ce, _images(), backend=backend)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("policy", ["eval", "batch"])
def test_batchnorm_policies(backend, policy):
    model = _cnn("bn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = eval_mode if policy == "eval" else batch_stats_mode
    op = check(model, ce, _images(), backend=backend, mode=mode, batchnorm=policy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and model[1].training
    # the two policies are different matrices
    other = HessianOperator(model, ce, _images(), dtype=torch.float64, batchnorm="batch" if policy == "eval" else "eval")
    v = torch.ones(op.dim, dtype=torch.float64)
    assert float((op.matvec(v) - other.matvec(v)).norm()) > 1e-3 * float(op.matvec(v).norm())


def _normed_mlp(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), norm(6), nn.GELU(), nn.Linear(6, 3))
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.normal_(1.0, 0.3)
        if getattr(model[1], "bias", None) is not None:
            model[1].bias.normal_(0.0, 0.3)
    return model


def _regression(sizes=(7, 4), seed=1, d_in=5, d_out=3):
    g = _gen(seed)
    return [(torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)) for n in sizes]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm], ids=["layernorm", "rmsnorm"])
def test_layer_and_rms_norm(backend, norm):
    check(_normed_mlp(norm), sq, _regression(), backend=backend)


def test_torch_func_hessian_is_the_wrong_composition_not_ours():
    """torch.func.hessian (jacfwd over jacrev) is wrong through LayerNorm on torch 2.13 CPU; the
    operator's func path (vmap over jvp(grad)) is not. If torch fixes jacfwd(jacrev), only the
    first assertion is informative."""
    model = _normed_mlp(nn.LayerNorm).double()
    (x, y), = _regression(sizes=(6,))
    x, y = x.double(), y.double()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p):
        return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    op = HessianOperator(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), [(x, y)], dtype=torch.float64, backend="func")
    H = op.to_dense()
    assert op.backend == "func"
    ref = torch.stack([fd_hvp(model, sq, [(x, y)], e, eval_mode) for e in torch.eye(op.dim, dtype=torch.float64)], 1)
    assert float((H - ref).norm() / ref.norm()) <= TOL
    Hf = torch.func.hessian(f)(params)
    sizes = [params[n].numel() for n in names]
    dense = torch.cat([torch.cat([Hf[a][b].reshape(sa, sb) for b, sb in zip(names, sizes)], 1) for a, sa in zip(names, sizes)], 0)
    err = float((dense - ref).norm() / ref.norm())
    if err <= TOL:
        pytest.skip(f"torch.func.hessian is correct through LayerNorm on torch {torch.__version__}")
    assert err > 1e-3


# ----------------------------------------------------------------------------- attention
class _MHANet(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dropout=dropout)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a + h).mean(1)


def _sequences(sizes=(3, 2), seq=5, d=3, d_out=2, seed=1):
    g = _gen(seed)
    return [(torch.randn(n, seq, d, generator=g), torch.randn(n, d_out, generator=g)) for n in sizes]


@pytest.mark.parametrize("backend", ALL)
def test_multihead_attention(backend):
    torch.manual_seed(0)
    check(_MHANet().eval(), sq, _sequences(), backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_multihead_attention_dropout_off_in_training_mode(backend):
    torch.manual_seed(0)
    model = _MHANet(dropout=0.5).train()
    check(model, sq, _sequences(), backend=backend)  # reference: eval mode (no attention dropout)
    assert model.attn.training


class _EncoderNet(nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal
        self.inp = nn.Linear(3, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.1, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=h.dtype)
            h = self.enc(h, src_mask=mask, is_causal=True)
        else:
            h = self.enc(h)
        return self.out(h).mean(1)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_transformer_encoder_layer(backend, causal):
    torch.manual_seed(0)
    model = _EncoderNet(causal).eval()
    check(model, sq, _sequences(), backend=backend)
    assert not model.training and not model.enc.training


class _SDPANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, t, 4)).mean(1)


@pytest.mark.parametrize("backend", ALL)
def test_scaled_dot_product_attention_causal(backend):
    torch.manual_seed(0)
    check(_SDPANet(), sq, _sequences(d=4), backend=backend)


# ----------------------------------------------------------------------------- embeddings, tied and frozen weights
class _TinyLM(nn.Module):
    def __init__(self, tied=True, vocab=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.norm(torch.tanh(self.mix(self.emb(tokens)))))


def _tokens(sizes=(3, 2), t=5, vocab=7, seed=1):
    g = _gen(seed)
    return [(torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, vocab, (n, t), generator=g)) for n in sizes]


def lm_loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), label_smoothing=0.1)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_embedding_and_tied_unembedding_with_label_smoothing(backend, tied):
    torch.manual_seed(0)
    model = _TinyLM(tied=tied)
    op = check(model, lm_loss, _tokens(), backend=backend)
    n_unique = sum(p.numel() for p in model.parameters())
    assert op.dim == n_unique
    if tied:
        assert "head.weight" not in op.names and "emb.weight" in op.names
        assert op.dim == sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False)) - 7 * 4


class _SharedBlocks(nn.Module):
    """One block applied three times (ALBERT / universal-transformer style) plus an alias of it."""

    def __init__(self):
        super().__init__()
        block = nn.Linear(5, 5)
        self.blocks = nn.ModuleList([block] * 3)
        self.alias = block
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


@pytest.mark.parametrize("backend", [*ALL, "finite_difference"])
def test_submodule_registered_twice_keeps_its_parameter_objects(backend):
    # PyTorch's stateless reparametrization swaps the shared attribute once per name and restores it
    # in the same order, which left the snapshot tensor in place of the nn.Parameter: an optimizer then
    # stepped objects the model no longer used (training silently changed). Values against finite
    # differences; every module's parameters are the same objects after products on every path.
    torch.manual_seed(0)
    model = _SharedBlocks()
    before = [(name, id(p)) for name, p in model.named_parameters(remove_duplicate=False)]
    if backend == "finite_difference":
        op = HessianOperator(model, sq, _regression(), dtype=torch.float64, backend=backend)
        v = torch.randn(op.dim, dtype=torch.float64, generator=_gen(3))
        ref = fd_hvp(model, sq, _regression(), v, eval_mode)
        assert float((op.matvec(v) - ref).norm() / ref.norm()) <= 1e-6
        op.loss_and_gradient()
    else:
        op = check(model, sq, _regression(), backend=backend)
    assert op.dim == 30 + 18  # the shared block counted once
    after = [(name, id(p)) for name, p in model.named_parameters(remove_duplicate=False)]
    assert after == before
    assert all(isinstance(p, nn.Parameter) for _, p in model.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize("backend", ALL)
def test_frozen_parameters_are_excluded(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    op = check(model, sq, _regression(), backend=backend)
    assert op.names == ("0.bias", "2.weight", "2.bias")
    assert op.dim == 6 + 18 + 3


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("backend", ALL)
def test_functional_mse_loss(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def loss(m, b):
        return F.mse_loss(m(b[0]), b[1])

    if backend == "func":  # torch.func cannot trace F.mse_loss under jvp(grad) on torch 2.13
        op = HessianOperator(model, loss, _regression(), dtype=torch.float64, backend="func")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
        fell_back = any("falls back" in str(w.message) for w in caught)
        assert fell_back == (op.backend == "autograd")
    check(model, loss, _regression(), backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_cross_entropy_with_label_smoothing(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 4))
    g = _gen(2)
    batches = [(torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in (6, 3)]
    check(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=0.2), batches, backend=backend)


class _ModuleWithOwnLoss(nn.Module):
    """Like a LightningModule: the loss is a method that calls ``self(x)``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Softplus(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)

    def training_loss(self, batch):
        x, y = batch
        r = self(x) - y
        return (torch.log(torch.cosh(r)) + 0.1 * r**4).sum(1).mean()  # custom (log-cosh + quartic)


@pytest.mark.parametrize("backend", ALL)
def test_custom_loss_method_calling_self(backend):
    torch.manual_seed(0)
    check(_ModuleWithOwnLoss(), lambda m, b: m.training_loss(b), _regression(), backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_dict_batches_and_namedtuple_style_access(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = [{"x": x, "y": y} for x, y in _regression()]

    def loss(m, b):
        return ((m(b["x"]) - b["y"]) ** 2).mean()

    op = HessianOperator(model, loss, batches, dtype=torch.float64, backend=backend)
    v = torch.randn(op.dim, dtype=torch.float64, generator=_gen(3))
    ref = fd_hvp(model, sq, [(b["x"], b["y"]) for b in batches], v / v.norm(), eval_mode)
    assert float((op.matvec(v / v.norm()) - ref).norm() / ref.norm()) <= TOL
    assert op.batch_sizes == (7.0, 4.0)
    assert math.isclose(op.total_weight, 11.0)


def test_lightning_module_whose_loss_calls_self():
    pl = pytest.importorskip("lightning.pytorch")

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

        def forward(self, x):
            return self.net(x)

        def compute_loss(self, batch):
            x, y = batch
            return F.mse_loss(self(x), y)

    torch.manual_seed(0)
    module = Regressor()
    for backend in ALL:
        check(module, lambda m, b: m.compute_loss(b), _regression(), backend=backend)
    assert all(isinstance(p, nn.Parameter) for p in module.parameters())
