"""Dropout / normalization policies by the training flag, the snapshot contract under activation
checkpointing, and embeddings with sparse gradients or padding rows (shared cases 04, 06, 08)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_hessian_operator import rel, unit
from torch import nn
from zoo import CheckpointedMLP, EmbeddingClassifier, _ce, _seq_ce, _tabular, _tokens

from lightning_rpe.curvature import eigenpairs
from lightning_rpe.curvature.hessian import HessianOperator

ALL_BACKENDS = ["autograd", "func", "finite_difference"]


class _FlagRecorder(nn.Module):
    """Records the training flag of every module of ``root`` each time it runs."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.drop = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)
        self.inner = nn.Sequential(nn.Linear(4, 2), nn.Identity())
        self.seen = []

    def forward(self, x):
        self.seen.append({n: (m.training, getattr(m, "track_running_stats", None)) for n, m in self.named_modules()})
        return self.inner(self.drop(self.bn(self.lin(x))))


@pytest.mark.parametrize("dropout", ["off", "on"])
@pytest.mark.parametrize("batchnorm", ["eval", "batch"])
def test_policies_set_flags_by_training_flag_and_restore_them(dropout, batchnorm):
    model = _FlagRecorder().train()
    model.inner[1].eval()  # a module the user keeps in eval mode
    before = {n: m.training for n, m in model.named_modules()}
    batches = [(torch.randn(6, 4), torch.randn(6, 2))]
    op = HessianOperator(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batches, dropout=dropout, batchnorm=batchnorm)
    op.matvec(torch.ones(op.dim))
    seen = model.seen[-1]
    for name, (training, track) in seen.items():
        if name == "bn":
            assert training == (batchnorm == "batch") and track == (batchnorm == "eval")
        elif dropout == "off":
            assert training is False, name  # every module as in model.eval()
        else:
            assert training == before[name], name  # the model's own flags
    assert {n: m.training for n, m in model.named_modules()} == before
    assert model.bn.track_running_stats


def test_case06_sdpa_dropout_p_is_off_in_train_mode():
    """Shared case 06: train-mode lambda_max with dropout="off" equals the dropout-free value (1.1812)."""

    class Block(nn.Module):  # the case's model, verbatim
        def __init__(self, d=8, h=2, p=0.2):
            super().__init__()
            self.h, self.p = h, p
            self.ln = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.resid_drop = nn.Dropout(p)
            self.head = nn.Linear(d, 5)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.qkv(self.ln(x)).split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
            return self.head(x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C))))

    torch.manual_seed(0)
    model = Block()
    batches = [(torch.randn(4, 6, 8), torch.randint(0, 5, (4, 6)))]
    lam_eval = eigenpairs(HessianOperator(model.eval(), _seq_ce, batches, dtype=torch.float64), tol=1e-8).lambda_max
    lam_train = eigenpairs(HessianOperator(model.train(), _seq_ce, batches, dtype=torch.float64), tol=1e-8).lambda_max
    assert lam_train == pytest.approx(lam_eval, rel=1e-8)
    assert lam_eval == pytest.approx(1.1812, abs=1e-4)
    assert model.training and model.ln.training


def test_case08_checkpoint_non_reentrant_sees_the_snapshot_in_its_dtype():
    """Shared case 08: float64 products work, and moving the live model does not change the operator."""
    torch.manual_seed(0)
    model = CheckpointedMLP(reentrant=False).train()  # float32 model, checkpointing in every mode
    batches = [(torch.randn(12, 5), torch.randint(0, 3, (12,)))]
    ref_model = CheckpointedMLP(reentrant=False, use_checkpoint=False)
    ref_model.load_state_dict(model.state_dict())
    ref = HessianOperator(ref_model, _ce, batches, dtype=torch.float64)
    v = unit(ref.dim)
    expected = ref.matvec(v)
    ops = {(dt, cache): HessianOperator(model, _ce, batches, dtype=dt, dropout="on", cache_graphs=cache)
           for dt in (torch.float32, torch.float64) for cache in (True, False)}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # an optimizer step after the operators were built
    for (dt, _), op in ops.items():
        assert rel(op.matvec(v.to(dt)).double(), expected) <= (1e-12 if dt == torch.float64 else 1e-5)
    fd = ops[(torch.float64, False)].with_backend("finite_difference")
    assert rel(fd.matvec(v), expected) <= 1e-8


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_case08_reentrant_checkpoint_fd_backend_gets_the_gradient_torch_drops(backend):
    torch.manual_seed(0)
    model = CheckpointedMLP(reentrant=True).double().train()
    ref_model = CheckpointedMLP(reentrant=True, use_checkpoint=False).double()
    ref_model.load_state_dict(model.state_dict())
    batches = _tabular()
    expected = HessianOperator(ref_model, _ce, batches, dtype=torch.float64).to_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator(model, _ce, batches, dtype=torch.float64, dropout="on", backend=backend)
        H = op.to_dense()
        if backend == "finite_difference":
            assert rel(H, expected) <= 1e-7
            _, grad = op.loss_and_gradient()
            assert float(grad[:60].abs().sum()) > 0  # the checkpointed blocks get their gradient
        else:
            assert rel(H, expected) > 1e-2  # torch's double backward is wrong here: verification's job


def _padded_model():
    torch.manual_seed(0)
    model = EmbeddingClassifier(padding_idx=0).double()
    with torch.no_grad():
        model.emb.weight[0] = 0.3
    return model


def test_case04_padding_idx_every_backend_gives_the_hessian_over_trained_rows():
    model, batches = _padded_model(), _tokens()
    ops = {b: HessianOperator(model, _ce, batches, dtype=torch.float64, backend=b) for b in ALL_BACKENDS}
    assert ops["autograd"].frozen_rows == (("emb.weight", 0),)
    dense = {b: op.to_dense() for b, op in ops.items()}
    keep = torch.ones(ops["autograd"].dim, dtype=torch.bool)
    keep[:3] = False  # the pad row
    H = dense["autograd"]
    assert rel(H, H.T) <= 1e-14
    assert float(H[~keep].abs().max()) == 0.0 and float(H[:, ~keep].abs().max()) == 0.0
    for b in ("func", "finite_difference"):
        assert rel(dense[b], H) <= (1e-12 if b == "func" else 1e-8), b
    # the reference of the case: the Hessian over the parameters that train (pad row frozen)
    frozen = EmbeddingClassifier().double()
    frozen.load_state_dict(model.state_dict())
    full = HessianOperator(frozen, _ce, batches, dtype=torch.float64).to_dense()
    assert rel(H[keep][:, keep], full[keep][:, keep]) <= 1e-12


class _TiedPadded(nn.Module):
    """Embedding with ``padding_idx=0`` whose weight is also the output layer's, tied ``"by_module"``
    (``self.out.weight = self.emb.weight``) or ``"in_code"`` (``F.linear(h, self.emb.weight)``)."""

    def __init__(self, tie, padding_idx=0):
        super().__init__()
        self.tie = tie
        self.emb = nn.Embedding(6, 3, padding_idx=padding_idx)
        if tie == "by_module":
            self.out = nn.Linear(3, 6, bias=False)
            self.out.weight = self.emb.weight

    def forward(self, x):
        h = torch.tanh(self.emb(x)).mean(1)
        return self.out(h) if self.tie == "by_module" else F.linear(h, self.emb.weight)


@pytest.mark.parametrize("tie", ["by_module", "in_code"])
def test_tied_padded_embedding_every_backend_agrees_and_warns(tie):
    # The pad row trains through the output layer while the embedding's backward masks its embedding
    # gradient: PyTorch's gradient is then no gradient of any loss. Before, a tie by module was not
    # masked (double backward gave one symmetric matrix, func and finite differences a non-symmetric
    # one, top eigenvalues 0.172 and 0.147 on this model) and a tie in code was masked silently. Now
    # every path gives M H M, whose block over the other coordinates is the Hessian of the loss
    # (the same model without padding_idx), and the operator says why the numbers are approximate.
    torch.manual_seed(0)
    model = _TiedPadded(tie).double()
    with torch.no_grad():
        model.emb.weight[0] = 0.3
    x = torch.randint(0, 6, (16, 4), generator=torch.Generator().manual_seed(1))
    x[:, -1] = 0
    batches = [(x, torch.randint(0, 6, (16,), generator=torch.Generator().manual_seed(2)))]
    dense = {}
    for b in ALL_BACKENDS:
        with pytest.warns(RuntimeWarning, match="padding row 0 of emb.weight is also read outside") as caught:
            op = HessianOperator(model, _ce, batches, dtype=torch.float64, backend=b)
        assert any("padding_idx=None" in str(w.message) for w in caught)
        assert op.frozen_rows == (("emb.weight", 0),) and op.padding_rows_read_elsewhere == (("emb.weight", 0),)
        dense[b] = op.to_dense()
    H = dense["autograd"]
    assert rel(H, H.T) <= 1e-14 and float(H[:3].abs().max()) == 0.0 and float(H[:, :3].abs().max()) == 0.0
    for b in ("func", "finite_difference"):
        assert rel(dense[b], H) <= (1e-12 if b == "func" else 1e-8), b
    unpadded = _TiedPadded(tie, padding_idx=None).double()
    unpadded.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pad row: no warning, nothing left out
        full_op = HessianOperator(unpadded, _ce, batches, dtype=torch.float64)
    assert full_op.frozen_rows == ()
    full = full_op.to_dense()
    assert rel(H[3:, 3:], full[3:, 3:]) <= 1e-12


def test_untied_padded_embedding_is_not_read_elsewhere():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = HessianOperator(_padded_model(), _ce, _tokens(), dtype=torch.float64)
    assert op.frozen_rows == (("emb.weight", 0),) and op.padding_rows_read_elsewhere == ()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_case04_sparse_embedding_products_and_gradient(backend):
    torch.manual_seed(0)
    sparse = EmbeddingClassifier(sparse=True).double()
    dense = EmbeddingClassifier().double()
    dense.load_state_dict(sparse.state_dict())
    batches = _tokens(pad=False)
    op = HessianOperator(sparse, _ce, batches, dtype=torch.float64, backend=backend)
    ref = HessianOperator(dense, _ce, batches, dtype=torch.float64, backend="autograd")
    v = unit(op.dim)
    assert rel(op.matvec(v), ref.matvec(v)) <= (1e-12 if backend != "finite_difference" else 1e-8)
    assert rel(op.loss_and_gradient()[1], ref.loss_and_gradient()[1]) <= 1e-14
    assert sparse.emb.sparse  # restored


def test_functional_sparse_embedding_gradient_is_made_dense():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 2, dtype=torch.float64))

        def forward(self, x):
            return F.embedding(x, self.weight, sparse=True).sum(1)

    batches = [(torch.randint(0, 8, (5, 3)), torch.randint(0, 2, (5,)))]
    op = HessianOperator(Functional(), _ce, batches, dtype=torch.float64, backend="finite_difference")
    _, grad = op.loss_and_gradient()
    assert grad.shape == (16,) and not grad.is_sparse
    H = op.to_dense()
    assert rel(H, H.T) <= 1e-7
