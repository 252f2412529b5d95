"""Smoke test of the benchmark scripts: they import, their workloads build, and every measurement
path runs end to end on tiny sizes. No timing is asserted; the reference-library parts are skipped
cleanly when those libraries are not installed (``bash benchmarks/install.sh`` installs them)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workloads():
    pytest.importorskip("sklearn")
    return _load("workloads")


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("sklearn")
    return _load("bench_engine")


def test_workload_sizes_match_the_issue(workloads):
    # parameter counts of the full-size models (construction only, no data)
    sizes = {name: workloads.count_parameters(workloads.make_model(name)) for name in workloads.WORKLOADS}
    assert 3_000 <= sizes["mlp_small"] <= 4_000
    assert 20_000 <= sizes["cnn"] <= 30_000
    assert 280_000 <= sizes["mlp_wide"] <= 320_000
    with pytest.raises(ValueError, match="workload"):
        workloads.make_model("resnet")


@pytest.mark.parametrize("name", ["mlp_small", "cnn", "mlp_wide"])
def test_tiny_workloads_build_and_train(workloads, name):
    w = workloads.build_workload(name, n_samples=24, width=8, pretrain_steps=2)
    assert w.x.shape == (24, 64) and w.y.shape == (24,)
    assert torch.allclose(w.x.mean(0), torch.zeros(64), atol=1e-5)
    loss = w.loss_fn(w.model, w.batch)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    grads = w.gradient()
    assert len(grads) == len(list(w.model.parameters()))
    w64 = w.to(torch.float64)
    assert next(w64.model.parameters()).dtype == torch.float64 and w64.x.dtype == torch.float64


def test_squared_error_convention(workloads):
    crit = workloads.SquaredError(num_classes=3)
    out = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    # sample 0 is exact, sample 1 misses by 1 in one class: mean over samples of the class sum
    assert float(crit(out, y)) == pytest.approx(0.5)


def test_engine_measurements_run_without_reference_libraries(engine):
    w = engine.build_workload("mlp_small", n_samples=24, width=6, pretrain_steps=2)
    ref = engine.reference_spectrum(w, k=5, tol=1e-10)
    assert ref["converged"]
    dense = engine.dense_check(w, ref)
    assert dense["max_rel_diff_top"] < 1e-8 and dense["rel_diff_lambda_min"] < 1e-8
    a = engine.measure_lmax(w, ref, repeats=1, refs_available=False)
    assert a["ours"]["err"] <= engine.GOAL_LMAX_ERR and "pyhessian" not in a
    b = engine.measure_top5(w, ref, repeats=1, refs_available=False)
    assert b["ours"]["err"] <= engine.GOAL_TOP5_ERR and "curvlinops" not in b
    c = engine.measure_hvp(w, repeats=1, block=3)
    assert c["autograd"]["single"] > 0 and c["func"]["block_per_vector"] > 0
    d = engine.measure_warm(w, repeats=1)
    assert d["warm"]["converged"] and d["warm"]["n_hvp"] <= d["cold"]["n_hvp"]
    rows = engine.build_rows({"workloads": {"mlp_small": {"n_params": w.n_params, "lmax": a, "top5": b,
                                                          "hvp": c, "warm": d}}})
    table = engine.format_table(rows, markdown=True)
    assert "(a) lambda_max" in table and "(d) warm re-solve" in table


def test_engine_reference_library_calls(engine):
    pytest.importorskip("pyhessian")
    pytest.importorskip("curvlinops")
    pytest.importorskip("hessian_eigenthings")
    pytest.importorskip("scipy")
    w = engine.build_workload("mlp_small", n_samples=24, width=6, pretrain_steps=2)
    ref = engine.reference_spectrum(w, k=5, tol=1e-10)
    value, n = engine.pyhessian_top1(w, seed=0)
    assert n >= 2 and engine.rel_err(value, ref["top"][0]) < 0.1
    assert all(p.grad is None for p in w.model.parameters())
    eq = engine.measure_lmax_equal_accuracy(w, ref, repeats=1)
    assert eq["pyhessian_ladder"] and (eq["pyhessian"] is None or eq["pyhessian"]["err"] <= engine.GOAL_LMAX_ERR)
    values, n = engine.curvlinops_top5(w, tol=1e-6, seed=0)
    assert n >= 5 and engine.max_rel_err(values, ref["top"]) < 1e-3
    values, n = engine.eigenthings_top5(w, seed=0, max_iter=60)
    assert n == 60 and len(values) == 5


def test_monitor_benchmark_helpers():
    pytest.importorskip("sklearn")
    monitor = _load("bench_monitor")
    state = {"a": torch.zeros(10), "b": [torch.zeros(3, dtype=torch.float64), None, 1.5], "c": {"d": "x"}}
    assert monitor.tensor_bytes(state) == 10 * 4 + 3 * 8
    shared = torch.zeros(5)
    assert monitor.tensor_bytes({"x": shared, "y": shared}) == 20
    r = monitor.run(steps=4, runs=1, hidden=[4], lr=0.05, n_train=32, every=2, probe_size=16, verbose=False)
    assert r["n_measurements_per_run"] >= 2 and r["warm_hvp_median"] is not None
    assert r["state_bytes"] > 0 and r["skipped"] == 0
    table = monitor.format_table(r, markdown=True)
    assert "state memory" in table


def test_hvp_timing_runs_on_tiny_sizes(capsys):
    timing = _load("hvp_timing")
    timing.main(["--examples", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "workload" in out and "CNN + CE" in out and "MLP 64-512-512-10" in out


def test_oracle_lanczos_against_a_known_spectrum(workloads):
    # diag(1..50) in float64: after m products the Ritz values interlace the spectrum, the residuals
    # follow Paige's formula (checked against ||A y - theta y|| directly), and at m = 50 the space is
    # invariant, so the extreme Ritz values are the extreme eigenvalues with zero residual.
    d = torch.arange(1, 51, dtype=torch.float64)
    v0 = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    history = workloads.oracle_lanczos(lambda v: d * v, v0, 60)
    assert len(history) == 50  # stops at the invariant subspace
    theta, res = history[-1]
    assert torch.allclose(theta, d, atol=1e-9) and float(res.max()) < 1e-8
    for m, (theta, res) in enumerate(history[:10], start=1):
        assert theta.shape == (m,) and torch.all(res >= 0)
        assert 1 - 1e-12 <= float(theta[0]) and float(theta[-1]) <= 50 + 1e-12
    # residual formula: rebuild the Ritz vector of the largest pair after 5 products
    q = [v0 / v0.norm()]
    for _ in range(4):
        w = d * q[-1]
        Q = torch.stack(q)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        q.append(w / w.norm())
    Q = torch.stack(q).T
    theta_5, s = torch.linalg.eigh(Q.T @ (d[:, None] * Q))
    y = Q @ s[:, -1]
    theta, res = history[4]
    assert math.isclose(float(theta[-1]), float(theta_5[-1]), rel_tol=1e-12)
    assert math.isclose(float(res[-1]), float((d * y - theta_5[-1] * y).norm()), rel_tol=1e-6)
    # the largest Ritz value only grows with m (the Krylov spaces are nested)
    tops = [float(t[-1]) for t, _ in history]
    assert all(b >= a - 1e-12 for a, b in zip(tops, tops[1:]))
