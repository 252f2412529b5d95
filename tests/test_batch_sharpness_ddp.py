"""Batch sharpness under DDP (2 CPU processes, gloo): every rank's examples count, every rank agrees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _launch import run_worker
from lit_models import TinyMLP

from lightning_rpe.curvature import batch_sharpness, sample_minibatches

WORKER = Path(__file__).with_name("_batch_sharpness_ddp_worker.py")


@pytest.mark.slow
def test_ddp_batch_sharpness_is_over_the_union_of_the_ranks_minibatches(tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    run_worker(WORKER, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["step"] == r1["step"] == 4
    for key in ("batch_sharpness", "batch_sharpness_se", "batch_sharpness_ratio"):
        assert r0[key] == r1[key], key  # every rank holds the same value
    # the two ranks' probe shares are disjoint
    x0 = torch.cat([b[0] for b in r0["probe"]])
    x1 = torch.cat([b[0] for b in r1["probe"]])
    assert not any(bool((x1 == row).all(dim=1).any()) for row in x0)

    # reference in one process: mini-batch k is the union of rank 0's and rank 1's k-th draw
    model = TinyMLP(hidden=6).double()
    model.load_state_dict({k: v.double() for k, v in r0["model_state"].items()})
    draws = []
    for r in (r0, r1):
        probe = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in r["probe"]]
        draws.append(sample_minibatches(probe, 6, 3, torch.Generator().manual_seed(r["generator_seed"])))
    unions = [tuple(torch.cat([a[i], b[i]]) for i in range(2)) for a, b in zip(*draws)]
    assert all(u[0].shape[0] == 12 for u in unions)  # the global batch: 2 ranks x 6
    ref = batch_sharpness(model, lambda mod, b: mod.compute_loss(b), unions, dtype=torch.float64)
    assert r0["batch_sharpness"] == pytest.approx(ref.mean, rel=1e-8)
    assert r0["batch_sharpness_se"] == pytest.approx(ref.std_error, rel=1e-6)
    assert r0["batch_sharpness_ratio"] == pytest.approx(ref.mean / r0["threshold"], rel=1e-8)
    # one rank's mini-batches alone give another value: the other rank's examples count
    alone = batch_sharpness(model, lambda mod, b: mod.compute_loss(b), draws[0], dtype=torch.float64)
    assert abs(alone.mean - ref.mean) > 1e-6 * abs(ref.mean)


@pytest.mark.slow
def test_ddp_batch_sharpness_with_a_rank_holding_at_most_one_minibatch(tmp_path: Path) -> None:
    # probe_size=13 over 2 ranks: rank 0 holds 7 examples (> 6: three random mini-batches), rank 1
    # holds 6 (one mini-batch, its whole share). Each rank drew its own number of mini-batches and
    # the all-reduced products no longer matched: gloo aborted the process (a review's repro).
    # Every rank now draws three; rank 1's k-th draw is its whole share.
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    run_worker(WORKER, str(tmp_path), "13")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert sum(b[0].shape[0] for b in r0["probe"]) == 7 and sum(b[0].shape[0] for b in r1["probe"]) == 6
    assert r0["batch_sharpness"] == r1["batch_sharpness"]
    model = TinyMLP(hidden=6).double()
    model.load_state_dict({k: v.double() for k, v in r0["model_state"].items()})
    draws = []
    for r in (r0, r1):
        probe = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in r["probe"]]
        draws.append(sample_minibatches(probe, 6, 3, torch.Generator().manual_seed(r["generator_seed"]), always=True))
    assert len(draws[1]) == 3 and all(d[0].shape[0] == 6 for d in draws[1])
    unions = [tuple(torch.cat([a[i], b[i]]) for i in range(2)) for a, b in zip(*draws)]
    ref = batch_sharpness(model, lambda mod, b: mod.compute_loss(b), unions, dtype=torch.float64)
    assert r0["batch_sharpness"] == pytest.approx(ref.mean, rel=1e-8)
