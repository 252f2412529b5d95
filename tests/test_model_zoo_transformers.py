"""A real (tiny, locally configured) Hugging Face BERT in training mode: SDPA attention dropout and
hidden dropout are off under dropout="off", the padded word embedding's pad row is left out, and
the product matches float64 finite differences of the eval-mode model. Skipped without transformers;
nothing is downloaded (the model is built from a config)."""

from __future__ import annotations

import copy

import pytest
import torch
from _reference import fd_hvp

from lightning_rpe.curvature import HessianOperator, verify_operator

transformers = pytest.importorskip("transformers")


def _loss(model, batch):
    return model(**batch).loss


def test_tiny_bert_sdpa_dropout_off_in_train_mode():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2,
        attn_implementation="sdpa",
    )
    model = transformers.BertForSequenceClassification(config).double().train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (4, 7), generator=g)
    ids[:, -2:] = 0  # padding
    batches = [{"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.randint(0, 3, (4,), generator=g)}]
    op = HessianOperator(model, _loss, batches, dtype=torch.float64)
    assert op.frozen_rows == (("bert.embeddings.word_embeddings.weight", 0),)
    assert verify_operator(op).passed
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(v)
    mask[: config.hidden_size] = 0  # the pad row: first rows of the first parameter
    ref = mask * fd_hvp(copy.deepcopy(model).eval(), _loss, batches, mask * v)
    assert float((op.matvec(v) - ref).norm() / ref.norm()) <= 1e-6
    assert model.training and all(m.training for m in model.modules())
