"""A zoo of tiny models with the constructs researchers really train, each with an independent reference.

Every :class:`ZooCase` holds a float64 model, its loss, probe batches, the operator settings it is
measured with, and a *reference model*: the same function written without the construct under test
(eval mode instead of dropout, no checkpointing, a dense embedding, ...) or the same model where
its first-order gradients are right, evaluated by :func:`_reference.fd_hvp` (float64 central
differences of gradients, Richardson-extrapolated; no lightning-rpe code).

``expect``: ``"exact"`` when the operator's own AD path must match the reference, ``"caught"``
when PyTorch's second derivatives are wrong (or missing) for this construct, so verification must
fail (naming ``suspect``) and the finite-difference backend must match the reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, spectral_norm, weight_norm
from torch.utils.checkpoint import checkpoint


@dataclass
class ZooCase:
    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batches: list[Any]
    reference: nn.Module
    expect: str = "exact"  # "exact" | "caught"
    suspect: str = ""  # substring of a Verification.suspects entry ("caught" cases)
    settings: dict[str, Any] = field(default_factory=dict)
    frozen: tuple[int, ...] = ()  # flat coordinates that never train (masked in the reference)


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _ce(m: nn.Module, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _seq_ce(m: nn.Module, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())


def _tabular(n: int = 12, d: int = 5, c: int = 3, seed: int = 1) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g))]


def _tokens(n: int = 6, t: int = 5, vocab: int = 12, c: int = 3, seed: int = 2, pad: bool = True) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, t), generator=g)
    if pad:
        x[:, -2:] = 0
    return [(x, torch.randint(0, c, (n,), generator=g))]


def _eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


# ----------------------------------------------------------------------------- dropout read from `training`
class FunctionalDropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(F.dropout(torch.tanh(self.l1(x)), 0.5, self.training))


class SDPABlock(nn.Module):
    """nanoGPT-style causal attention: ``dropout_p = p if self.training else 0``."""

    def __init__(self, d: int = 4, h: int = 2, p: float = 0.3) -> None:
        super().__init__()
        self.h, self.p = h, p
        self.ln = nn.LayerNorm(d)
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.qkv(self.ln(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        return self.head(x + self.proj(y.transpose(1, 2).reshape(B, T, C)))


class DropPath(nn.Module):
    """Stochastic depth (timm style): drops the whole residual branch per sample in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class ResidualDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.branch, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.drop_path = DropPath(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h + self.drop_path(torch.tanh(self.branch(h))))


# ----------------------------------------------------------------------------- custom autograd Functions
class TanhTwice(torch.autograd.Function):
    """tanh with a backward written in differentiable ops: twice differentiable."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class TanhCtx(torch.autograd.Function):
    """tanh whose backward reads a detached intermediate kept on ``ctx``: its double backward is wrong."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.y = y.detach()
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * (1 - ctx.y**2)


class TanhOnce(torch.autograd.Function):
    """tanh with a ``@once_differentiable`` backward: double backward raises."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2)


class FunctionMLP(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.fn(self.l1(x)))


# ----------------------------------------------------------------------------- activation checkpointing
class CheckpointedMLP(nn.Module):
    """Blocks run under ``checkpoint`` whatever the training flag (``use_checkpoint=False``: plain)."""

    def __init__(self, reentrant: bool, use_checkpoint: bool = True) -> None:
        super().__init__()
        self.reentrant, self.use_checkpoint = reentrant, use_checkpoint
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(5, 5), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant) if self.use_checkpoint else block(x)
        return self.head(x)


# ----------------------------------------------------------------------------- embeddings, LSTM
class EmbeddingClassifier(nn.Module):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 3, **kwargs)
        self.head = nn.Linear(15, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)).flatten(1))


class EmbeddingBagClassifier(nn.Module):
    """Mean-pooled bag of tokens with a padding index (torch has no double backward for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 3, mode="mean", padding_idx=0)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(x)))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


# ----------------------------------------------------------------------------- Hugging Face style
@dataclass
class TinyOutput:
    """A ``transformers.modeling_outputs.ModelOutput``-like result (dataclass with ``loss`` and ``logits``)."""

    loss: Tensor | None
    logits: Tensor


class TinyConfig:
    vocab_size, hidden, heads, labels = 12, 4, 2, 3
    hidden_dropout_prob, attention_probs_dropout_prob, pad_token_id = 0.2, 0.2, 0


class TinyBertLike(nn.Module):
    """BERT-shaped classifier: padded word embeddings, LayerNorm, attention with an additive mask,
    attention-probability and hidden dropout (``F.dropout(..., training=self.training)``), a
    pooled head; ``forward(input_ids, attention_mask, labels) -> TinyOutput``."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(8, h)
        self.ln = nn.LayerNorm(h)
        self.qkv, self.out = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.classifier = nn.Linear(h, config.labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> TinyOutput:
        B, T = input_ids.shape
        c, h = self.config, self.config.hidden
        x = self.ln(self.word_embeddings(input_ids) + self.position_embeddings(torch.arange(T)))
        x = F.dropout(x, c.hidden_dropout_prob, self.training)
        q, k, v = (t.view(B, T, c.heads, h // c.heads).transpose(1, 2) for t in self.qkv(x).split(h, dim=2))
        scores = q @ k.transpose(-1, -2) / (h // c.heads) ** 0.5
        scores = scores + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        probs = F.dropout(scores.softmax(-1), c.attention_probs_dropout_prob, self.training)
        x = x + self.out((probs @ v).transpose(1, 2).reshape(B, T, h))
        logits = self.classifier(torch.tanh(x[:, 0]))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return TinyOutput(loss=loss, logits=logits)


def _hf_loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return m(**batch).loss


def _hf_batches() -> list[Any]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 12, (4, 6), generator=g)
    ids[:, -2:] = 0
    return [{"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.randint(0, 3, (4,), generator=g)}]


# ----------------------------------------------------------------------------- the zoo
def _mlp_with(layer_wrap: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    _seed()
    return nn.Sequential(layer_wrap(nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, 3)).double()


class HookByHand(nn.Module):
    """The first layer of an old-hook model written by hand (parameters in the hooked model's order):
    ``W = g v / ||v||`` (rows) for weight_norm, ``W = W_orig / (u^T W_orig v)`` with the stored
    ``u``, ``v`` for spectral_norm in eval mode. (A hooked module cannot be deep-copied.)"""

    def __init__(self, hooked: nn.Sequential) -> None:
        super().__init__()
        layer = hooked[0]
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.spectral = hasattr(layer, "weight_orig")
        if self.spectral:
            self.weight_orig = nn.Parameter(layer.weight_orig.detach().clone())
            self.register_buffer("u", layer.weight_u.detach().clone())
            self.register_buffer("v", layer.weight_v.detach().clone())
        else:
            self.weight_g = nn.Parameter(layer.weight_g.detach().clone())
            self.weight_v = nn.Parameter(layer.weight_v.detach().clone())
        self.rest = nn.Sequential(nn.Tanh(), copy.deepcopy(hooked[2]))

    def forward(self, x: Tensor) -> Tensor:
        if self.spectral:
            weight = self.weight_orig / (self.u @ self.weight_orig @ self.v)
        else:
            weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return self.rest(F.linear(x, weight, self.bias))


def _pad_coordinates(model: EmbeddingClassifier, pad: int) -> tuple[int, ...]:
    d = model.emb.weight.shape[1]
    return tuple(range(pad * d, (pad + 1) * d))  # the embedding weight is the first parameter


def build_zoo() -> list[ZooCase]:
    """All zoo cases (fresh models each call)."""
    cases: list[ZooCase] = []
    train_off = {"dropout": "off"}

    _seed()
    m: nn.Module = FunctionalDropoutMLP().double().train()
    cases.append(ZooCase("functional_dropout", m, _ce, _tabular(), _eval_copy(m), settings=train_off))
    _seed()
    m = SDPABlock().double().train()
    g = torch.Generator().manual_seed(4)
    seq = [(torch.randn(3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3, 4), generator=g))]
    cases.append(ZooCase("sdpa_dropout_p", m, _seq_ce, seq, _eval_copy(m), settings=train_off))
    _seed()
    m = ResidualDropPath().double().train()
    cases.append(ZooCase("drop_path", m, _ce, _tabular(), _eval_copy(m), settings=train_off))

    for name, wrap, expect in (
        ("weight_norm_parametrization", parametrizations.weight_norm, "caught"),
        ("weight_norm_hook", weight_norm, "caught"),
        ("spectral_norm_parametrization", parametrizations.spectral_norm, "exact"),
        ("spectral_norm_hook", spectral_norm, "exact"),
    ):
        m = _mlp_with(wrap).eval()
        ref = HookByHand(m).eval() if name.endswith("_hook") else m
        cases.append(ZooCase(name, m, _ce, _tabular(), ref, expect=expect, suspect="weight_norm" if expect == "caught" else ""))

    for name, fn, expect, suspect in (
        ("function_twice_differentiable", TanhTwice.apply, "exact", ""),
        ("function_ctx_intermediate", TanhCtx.apply, "caught", "custom autograd.Function TanhCtx"),
        ("function_once_differentiable", TanhOnce.apply, "caught", "custom autograd.Function TanhOnce"),
    ):
        _seed()
        m = FunctionMLP(fn).double()
        ref = FunctionMLP(torch.tanh).double()
        ref.load_state_dict(m.state_dict())
        cases.append(ZooCase(name, m, _ce, _tabular(), ref, expect=expect, suspect=suspect))

    for reentrant in (False, True):
        _seed()
        m = CheckpointedMLP(reentrant).double().train()
        ref = CheckpointedMLP(reentrant, use_checkpoint=False).double()
        ref.load_state_dict(m.state_dict())
        cases.append(ZooCase(
            f"checkpoint_{'reentrant' if reentrant else 'non_reentrant'}", m, _ce, _tabular(), ref,
            expect="caught" if reentrant else "exact", suspect="reentrant activation checkpointing" if reentrant else "",
            settings={"dropout": "on"},  # keeps the training flags: the checkpointed path is what runs
        ))

    _seed()
    m = EmbeddingClassifier(sparse=True).double()
    ref = EmbeddingClassifier().double()
    ref.load_state_dict(m.state_dict())
    cases.append(ZooCase("embedding_sparse", m, _ce, _tokens(pad=False), ref))
    _seed()
    m = EmbeddingClassifier(padding_idx=0).double()
    with torch.no_grad():
        m.emb.weight[0] = 0.3  # a pad vector that is not zero (e.g. loaded from a checkpoint)
    cases.append(ZooCase("embedding_padding_idx", m, _ce, _tokens(), m, frozen=_pad_coordinates(m, 0)))

    _seed()
    m = EmbeddingBagClassifier().double()
    with torch.no_grad():
        m.bag.weight[0] = 0.3
    cases.append(ZooCase("embedding_bag_padding_idx", m, _ce, _tokens(), m, expect="caught",
                         suspect="nn.EmbeddingBag", frozen=tuple(range(3))))

    _seed()
    m = LSTMClassifier().double()
    g = torch.Generator().manual_seed(5)
    cases.append(ZooCase("lstm", m, _ce, [(torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
                                          torch.randint(0, 3, (4,), generator=g))], m))

    _seed()
    m = TinyBertLike(TinyConfig()).double().train()
    cases.append(ZooCase("hf_style_dict_batch_output_object", m, _hf_loss, _hf_batches(), _eval_copy(m),
                         settings=train_off, frozen=tuple(range(TinyConfig.hidden))))
    return cases
