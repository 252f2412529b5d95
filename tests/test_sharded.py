"""ShardedHessianOperator: FSDP2 on 2 gloo CPU processes against a dense float64 reference, and
single-process argument checks. The 2-process worker runs once per session (module fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _launch import run_worker
from torch import nn

from lightning_rpe.curvature import HessianOperator
from lightning_rpe.curvature.sharded import (
    DEFAULT_EPS,
    ShardedHessianOperator,
    sharded_eigenpairs,
    sharding_kind,
)

WORKER = Path(__file__).with_name("_sharded_worker.py")


def _run_worker(worker: Path, out: Path, *args: str) -> None:
    run_worker(worker, str(out), *args, timeout=600)


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("sharded")
    _run_worker(WORKER, out)
    results = {d: [torch.load(out / f"{d}_rank{r}.pt", weights_only=False) for r in (0, 1)]
               for d in ("float64", "float32")}
    results["refusals"] = torch.load(out / "refusals_rank0.pt", weights_only=False)
    results["padded"] = [torch.load(out / f"padded_rank{r}.pt", weights_only=False) for r in (0, 1)]
    return results


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "rel"), [("float64", 1e-8), ("float32", 1e-4)])
def test_fsdp2_spectrum_matches_dense_reference(fsdp2_results, dtype: str, rel: float) -> None:
    r0, r1 = fsdp2_results[dtype]
    ref = r0["ref_eigenvalues"]
    # identical on both ranks (every decision comes from all-reduced numbers)
    assert r0["eigenvalues"] == r1["eigenvalues"] and r0["converged"] == r1["converged"] == [True] * 3
    top, second, smallest = r0["eigenvalues"]
    assert top == pytest.approx(ref[-1], rel=rel)
    assert second == pytest.approx(ref[-2], rel=rel)
    assert smallest == pytest.approx(ref[0], rel=rel) and smallest < 0
    assert r0["vector_dtype"] == f"torch.{dtype}" and r0["eps"] == DEFAULT_EPS[getattr(torch, dtype)]
    assert r0["eigvec_norm"] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "rel"), [("float64", 1e-8), ("float32", 1e-3)])
def test_fsdp2_products_and_gradient_match_reference_entrywise(fsdp2_results, dtype: str, rel: float) -> None:
    for r in fsdp2_results[dtype]:
        assert torch.allclose(r["hv"], r["hv_ref"], rtol=0, atol=rel * float(r["hv_ref"].abs().max() + 1))
        assert torch.allclose(r["grad"], r["grad_ref"], rtol=0, atol=1e-6 * float(r["grad_ref"].abs().max() + 1))


@pytest.mark.slow
def test_fsdp2_uneven_and_empty_shards_and_bitwise_restoration(fsdp2_results) -> None:
    for dtype in ("float64", "float32"):
        r0, r1 = fsdp2_results[dtype]
        # 3->5->1 MLP: rows of (5,3) split 3/2, bias 3/2, (1,5) and (1,) all on rank 0
        assert r0["local_numels"] == [9, 3, 5, 1] and r1["local_numels"] == [6, 2, 0, 0]
        assert r0["total_dim"] == r1["total_dim"] == 26 and r0["dim"] + r1["dim"] == 26
        assert r0["weights_bitwise"] and r1["weights_bitwise"]
        assert r0["grads_bitwise"] and r1["grads_bitwise"]
        for r in (r0, r1):  # refused on every process while FSDP's gradient sync is off
            assert "gradient sync is off" in r["accumulating"]
            assert r["flatten_dtensors"]
            assert r["loss_bitwise"]  # a forward after the products sees the unperturbed weights  # DTensors (parameters, optimizer state) flatten to their local shards
        # a product costs two gradients (plus one for loss_and_gradient)
        assert r0["n_gradients"] == 2 * r0["n_hvp"] + 1


# ------------------------------------------------------------------ one process, no sharding
def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 3, generator=g).to(dtype), torch.randn(5, 2, generator=g).to(dtype)) for _ in range(2)]


def test_fsdp2_padded_embedding_leaves_the_pad_row_out(fsdp2_results) -> None:
    # Finite differences of the gradient give M H on a padded embedding (pad row masked by its
    # backward, pad column not): non-symmetric input to Lanczos (asymmetry 0.08 in a review's run).
    # The pad row (row 4 of 6) lives on rank 1's shard; both ranks' products equal HessianOperator's M H M.
    for r in fsdp2_results["padded"]:
        assert r["frozen_rows"] == (("emb.weight", 4),)
        assert torch.allclose(r["hv"], r["hv_ref"], rtol=0, atol=1e-7 * float(r["hv_ref"].abs().max()))
    assert float(fsdp2_results["padded"][1]["hv"][2:4].abs().max()) == 0.0  # rank 1's local row 1 is the pad row


def test_unsharded_module_matches_hessian_operator_and_restores_weights() -> None:
    model = _mlp(torch.float64)
    batches = _batches(torch.float64)
    assert sharding_kind(model) == "none"
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad = torch.ones_like(model[0].weight)
    op = ShardedHessianOperator(model, _loss, batches)
    assert op.group is None and op.dim == op.total_dim == 26 and op.dtype == torch.float64
    ref = HessianOperator(model, _loss, batches, dtype=torch.float64).to_dense()
    V = torch.randn(26, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(op.matmat(V), ref @ V, rtol=0, atol=1e-8 * float(ref.abs().max()))
    assert op.n_hvp == 3 and op.n_gradients == 6
    res = sharded_eigenpairs(op, k=1, which="both", tol=1e-10, max_hvp=26)
    evals = torch.linalg.eigvalsh(ref)
    assert res.lambda_max == pytest.approx(float(evals[-1]), rel=1e-8)
    assert res.lambda_min == pytest.approx(float(evals[0]), rel=1e-8)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[2].weight.grad is None


def test_parameters_changed_after_construction_raise() -> None:
    model = _mlp(torch.float64)
    op = ShardedHessianOperator(model, _loss, _batches(torch.float64))
    with pytest.raises(ValueError, match="dense matrix is not available"):
        op.to_dense()
    with torch.no_grad():
        model[0].bias.add_(1.0)
    with pytest.raises(ValueError, match="parameters changed"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))


def test_zero_and_non_finite_columns() -> None:
    model = _mlp(torch.float32)
    op = ShardedHessianOperator(model, _loss, _batches(torch.float32))
    assert op.dtype == torch.float32 and op.eps == DEFAULT_EPS[torch.float32]
    V = torch.zeros(op.dim, 2)
    V[0, 1] = float("nan")
    out = op.matmat(V)
    assert bool(torch.isnan(out).all())  # a non-finite entry anywhere makes the block non-finite
    assert torch.equal(op.matvec(torch.zeros(op.dim)), torch.zeros(op.dim))


def test_flatten_and_unflatten_in_vector_order() -> None:
    model = _mlp(torch.float64)
    op = ShardedHessianOperator(model, _loss, _batches(torch.float64))
    params = list(model.parameters())
    flat = op.flatten({p: torch.full_like(p, float(i)) for i, p in enumerate(params)})
    assert torch.equal(flat, torch.cat([torch.full((p.numel(),), float(i), dtype=torch.float64)
                                        for i, p in enumerate(params)]))
    assert [t.shape for t in op.unflatten(flat)] == [p.shape for p in params]
    assert torch.equal(op.flatten(op.unflatten(flat)), flat)
    with pytest.raises(ValueError, match="missing entries"):
        op.flatten({params[0]: params[0]})
    with pytest.raises(ValueError, match="'0.bias' has 2 local elements"):
        op.flatten([params[0], torch.zeros(2), params[2], params[3]])


def test_inner_and_norms_are_float64_dot_products() -> None:
    op = ShardedHessianOperator(_mlp(torch.float32), _loss, _batches(torch.float32))
    X = torch.randn(op.dim, 3)
    Y = torch.randn(op.dim, 2)
    assert torch.allclose(op.inner(X, Y), X.T @ Y, atol=1e-5)
    assert torch.allclose(op.inner(X[:, :2], Y, columnwise=True), (X[:, :2] * Y).sum(0), atol=1e-5)
    assert torch.allclose(op.norms(X), X.norm(dim=0), atol=1e-5)
    with pytest.raises(ValueError, match="same dim"):
        op.inner(X[:3], Y)
    with pytest.raises(ValueError, match="equal width"):
        op.inner(X, Y, columnwise=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "eps must be a finite float > 0"),
        ({"dtype": torch.float16}, "dtype must be one of"),
        ({"batchnorm": "train"}, "batchnorm must be one of"),
        ({"batches": []}, "non-empty sequence"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"batches": _batches(torch.float32)}
    args.update(kwargs)
    batches = args.pop("batches")
    with pytest.raises(ValueError, match=match):
        ShardedHessianOperator(_mlp(torch.float32), _loss, batches, **args)


def test_half_precision_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="float32 or float64"):
        ShardedHessianOperator(_mlp(torch.bfloat16), _loss, _batches(torch.bfloat16))


def test_sharded_eigenpairs_argument_checks() -> None:
    op = ShardedHessianOperator(_mlp(torch.float64), _loss, _batches(torch.float64))
    with pytest.raises(ValueError, match="which must be one of"):
        sharded_eigenpairs(op, which="middle")
    with pytest.raises(ValueError, match="k must be"):
        sharded_eigenpairs(op, k=26, which="both")
    with pytest.raises(ValueError, match="max_hvp must be"):
        sharded_eigenpairs(op, k=2, max_hvp=1)


@pytest.mark.slow
def test_unsupported_layouts_are_refused_with_a_clear_message(fsdp2_results) -> None:
    cases = fsdp2_results["refusals"]
    assert "Replicate" in cases["hsdp"] and "HSDP" in cases["hsdp"]
    assert "Replicate" in cases["replicate"]
    assert "is not sharded" in cases["plain"] and "'2.weight'" in cases["plain"]
    assert "bfloat16" in cases["bf16"] and "refused" in cases["bf16"]
    assert "use_orig_params=True" in cases["flat"]
    assert "NO_SHARD" in cases["no_shard"]


@pytest.mark.parametrize(("batchnorm", "dropout"), [("eval", "off"), ("batch", "off"), ("batch", "on")])
def test_normalisation_and_dropout_policies_match_hessian_operator(batchnorm: str, dropout: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2)).double()
    model.train()
    model(torch.randn(8, 3, dtype=torch.float64))  # non-trivial running statistics
    batches = _batches(torch.float64)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.random.get_rng_state()
    op = ShardedHessianOperator(model, _loss, batches, batchnorm=batchnorm, dropout=dropout)
    ref = HessianOperator(model, _loss, batches, dtype=torch.float64, batchnorm=batchnorm, dropout=dropout)
    V = torch.randn(op.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = ref.matmat(V)
    assert torch.allclose(op.matmat(V), expected, rtol=0, atol=1e-8 * float(expected.abs().max()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # running statistics untouched
    assert torch.equal(rng, torch.random.get_rng_state()) and model.training
