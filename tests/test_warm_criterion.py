"""The stopping rule of the monitor's warm solves (MeasureSettings.criterion) against dense float64 Hessians."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_rpe.geometry import EigenvectorTracker
from lightning_rpe.measure import MeasureSettings, solve, stopping_rule


def _model_and_data(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(96, 6, generator=g)
    y = torch.randn(96, 3, generator=g)
    return model, (x, y)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _dense(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the float64 Hessian of the loss."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    x, y = batch[0].double(), batch[1].double()

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        out = torch.func.functional_call(model, parts, (x,))
        return ((out - y) ** 2).mean()

    H = torch.func.hessian(f)(flat)
    return torch.linalg.eigh((H + H.T) / 2)


def _gd(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float) -> None:
    params = list(model.parameters())
    for _ in range(steps):
        grads = torch.autograd.grad(_loss(model, batch), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=lr)


def _trajectory(criterion: str, measurements: int = 8, every: int = 5, lr: float = 0.1) -> list[dict]:
    model, batch = _model_and_data()
    settings = MeasureSettings(criterion=criterion, grad_alignment=False, verify="off", dtype="float64")
    tracker = EigenvectorTracker()
    out = []
    for m in range(measurements):
        if m:
            _gd(model, batch, every, lr)
        gaps_in = tracker.previous_gaps
        s = solve(model, _loss, [batch], settings, step=m * every, warm=tracker)
        tracker.update(m * every, s.top_vectors, s.min_vector, k=1, gaps=s.gaps)
        evals, evecs = _dense(model, batch)
        out.append({"solve": s, "evals": evals, "evecs": evecs, "gaps_in": gaps_in})
    return out


def test_stopping_rule_arguments() -> None:
    assert stopping_rule("residual", [1.0, 2.0], 2, 1) == ("residual", None)
    assert stopping_rule("eigenvalue", None, 2, 1) == ("residual", None)
    assert stopping_rule("eigenvalue", [1.0], 2, 1) == ("residual", None)  # wrong length: no gap known
    crit, gap = stopping_rule("eigenvalue", [1.0, float("nan")], 2, 1)
    assert crit == "eigenvalue" and gap.tolist() == [1.0, 0.0]  # unknown gap: that pair stops on its residual
    crit, gap = stopping_rule("auto", [1.0, 0.5], 2, 1)
    assert crit == "eigenvalue" and gap.tolist() == [0.0, 0.5]  # the reported pair keeps the residual rule
    assert stopping_rule("auto", [1.0], 1, 1) == ("residual", None)  # nothing left for the eigenvalue rule
    assert stopping_rule("eigenvalue", [-1.0, float("inf")], 2, 1) == ("residual", None)


def test_settings_refuse_an_unknown_criterion() -> None:
    with pytest.raises(ValueError, match="criterion"):
        MeasureSettings(criterion="vector")


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    return {c: _trajectory(c) for c in ("residual", "eigenvalue", "auto")}


def test_eigenvalue_rule_spends_fewer_products_along_a_trajectory(runs: dict[str, list[dict]]) -> None:
    warm = {c: sum(r["solve"].n_hvp for r in rs[1:]) for c, rs in runs.items()}
    assert warm["eigenvalue"] < warm["residual"], warm
    # the first solve is cold (no previous gaps): every rule spends the same there
    assert len({rs[0]["solve"].n_hvp for rs in runs.values()}) == 1


def test_eigenvalue_rule_meets_the_eigenvalue_tolerance_and_the_stated_vector_bound(runs: dict[str, list[dict]]) -> None:
    tol = MeasureSettings().tol
    tol_min = MeasureSettings().lambda_min_tol
    for r in runs["eigenvalue"][1:]:
        s, evals, evecs = r["solve"], r["evals"], r["evecs"]
        lam_max, lam_min = float(evals[-1]), float(evals[0])
        scale = max(abs(lam_max), abs(lam_min))
        assert abs(s.eigenvalues[0] - lam_max) <= tol * scale
        assert abs(s.lambda_min - lam_min) <= tol_min * scale
        # vector: sin(angle) <= r / true gap, and the rule keeps r <= sqrt(tol * max|theta| * gap estimate)
        true_gap = lam_max - float(evals[-2])
        gap_est = max(r["gaps_in"][0], 0.0)
        assert s.residuals[0] <= math.sqrt(tol * scale * gap_est) * (1 + 1e-9) or s.residuals[0] <= tol * scale
        sin = math.sqrt(max(0.0, 1.0 - float(s.top_vectors[:, 0].double() @ evecs[:, -1]) ** 2))
        assert sin <= s.residuals[0] / true_gap * (1 + 1e-6) + 1e-7


def test_auto_keeps_the_residual_rule_for_the_reported_vector(runs: dict[str, list[dict]]) -> None:
    tol = MeasureSettings().tol
    for r in runs["auto"]:
        s, evals = r["solve"], r["evals"]
        scale = max(abs(float(evals[-1])), abs(float(evals[0])))
        assert s.residuals[0] <= tol * scale * (1 + 1e-9)


def test_residual_rule_is_unchanged_by_the_gaps(runs: dict[str, list[dict]]) -> None:
    tol = MeasureSettings().tol
    for r in runs["residual"]:
        s, evals = r["solve"], r["evals"]
        assert len(s.gaps) == 2
        scale = max(abs(float(evals[-1])), abs(float(evals[0])))
        assert s.residuals[0] <= tol * scale * (1 + 1e-9)


def test_tracker_keeps_the_gaps_across_a_checkpoint() -> None:
    tracker = EigenvectorTracker()
    top = torch.nn.functional.normalize(torch.randn(10, 1), dim=0)
    tracker.update(0, top, top[:, 0], preconditioned=top[:, 0], k=1, gaps=(0.5, 0.01), preconditioned_gap=0.2)
    state = tracker.state_dict()
    other = EigenvectorTracker()
    other.load_state_dict(state)
    assert other.previous_gaps == (0.5, 0.01) and other.previous_preconditioned_gap == 0.2
    # a state written before the gaps were kept loads without them: the next warm solve uses the residual rule
    for key in ("gaps", "prev_pre_gap"):
        state.pop(key)
    other.load_state_dict(state)
    assert other.previous_gaps is None and other.previous_preconditioned_gap is None


def test_monitor_default_is_auto() -> None:
    from lightning_rpe import SharpnessMonitor

    assert MeasureSettings().criterion == "auto" and SharpnessMonitor().criterion == "auto"


def _adam_trajectory(criterion: str, measurements: int = 7, every: int = 5) -> list[dict]:
    from lightning_rpe.stability import group_thresholds, step_scales

    model, batch = _model_and_data(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    settings = MeasureSettings(criterion=criterion, grad_alignment=False, verify="off", dtype="float64")
    tracker = EigenvectorTracker()
    out = []
    for m in range(measurements):
        for _ in range(every):
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
        gap_in = tracker.previous_preconditioned_gap
        s = solve(model, _loss, [batch], settings, step=m * every, optimizer=opt, warm=tracker)
        tracker.update(m * every, s.top_vectors, s.min_vector, s.preconditioned_vector, k=1, gaps=s.gaps,
                       preconditioned_gap=s.preconditioned_gap)
        params = list(model.parameters())
        scales = step_scales(opt, params, list(group_thresholds(opt)))
        d = torch.cat([t.reshape(-1) for t in scales.inverse_preconditioner]).double().sqrt()
        H = _dense_matrix(model, batch)
        pre = torch.linalg.eigvalsh(d[:, None] * H * d[None, :])
        out.append({"solve": s, "pre": pre, "gap_in": gap_in})
    return out


def _dense_matrix(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    evals, evecs = _dense(model, batch)
    return (evecs * evals) @ evecs.T


def test_auto_runs_the_preconditioned_solve_on_the_eigenvalue_rule() -> None:
    tol = MeasureSettings().tol
    runs = {c: _adam_trajectory(c) for c in ("residual", "auto")}
    pre_hvp = {}
    for c, rs in runs.items():
        for r in rs:
            s, pre = r["solve"], r["pre"]
            assert s.preconditioned_gap is not None
            # eigenvalue within tol * (preconditioned lambda_max) of the dense float64 value
            assert abs(s.preconditioned_sharpness - float(pre[-1])) <= tol * float(pre.abs().max())
        pre_hvp[c] = sum(r["solve"].n_hvp for r in rs[1:])
    # the top pair and lambda_min solve identically under residual and auto only when lambda_min has no gap;
    # the products the preconditioned solves save show in the totals
    assert pre_hvp["auto"] < pre_hvp["residual"], pre_hvp
    # the first warm solve had the cold solve's gap
    assert runs["auto"][1]["gap_in"] is not None


def test_a_warm_measurement_spends_only_the_solver_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """With top_k=1 the crossing check multiplies the previous v_1 only when the new v_1 left it
    (|cos| < 0.5); along a smooth trajectory a warm measurement's products are the solver's alone."""
    from lightning_rpe import measure

    spent: list[int] = []
    original = measure.eigenpairs

    def counting(*args, **kwargs):
        res = original(*args, **kwargs)
        spent.append(res.n_hvp)
        return res

    monkeypatch.setattr(measure, "eigenpairs", counting)
    model, batch = _model_and_data()
    settings = MeasureSettings(grad_alignment=True, verify="off")
    tracker = EigenvectorTracker()
    for m in range(4):
        if m:
            _gd(model, batch, 5, 0.1)
        spent.clear()
        s = solve(model, _loss, [batch], settings, step=m * 5, warm=tracker)
        tracker.update(m * 5, s.top_vectors, s.min_vector, k=1, crossed=s.crossed, gaps=s.gaps)
        assert s.n_hvp == sum(spent) and len(spent) == 1
        if m:
            assert s.crossed is False  # checked without a product: the vectors overlap


@pytest.mark.parametrize("solver", ["block", "auto"])
def test_a_warm_block_solve_carries_no_stale_gaps(solver: str) -> None:
    """The block solver's gaps only repeat the ones passed in: they are not carried forward, so a
    gap that shrinks during training cannot stay over-estimated (the next solve uses the residual rule)."""
    model, batch = _model_and_data()
    settings = MeasureSettings(solver=solver, criterion="eigenvalue", grad_alignment=False, verify="off")
    tracker = EigenvectorTracker()
    cold = solve(model, _loss, [batch], settings, step=0, warm=tracker)
    tracker.update(0, cold.top_vectors, cold.min_vector, k=1, gaps=cold.gaps)
    assert len(cold.gaps) == 2 if solver == "auto" else cold.gaps == ()  # auto: a cold Lanczos solve
    _gd(model, batch, 5, 0.1)
    warm = solve(model, _loss, [batch], settings, step=5, warm=tracker)
    assert warm.gaps == ()
    tracker.update(5, warm.top_vectors, warm.min_vector, k=1, gaps=warm.gaps)
    assert tracker.previous_gaps is None


def test_solve_vectors_stay_where_the_model_is_and_travel_by_vectors_to() -> None:
    """The eigenvectors come back on the model's device (no host copy per measurement); the CPU
    generator is the default and ``vectors_to`` moves all three vectors, values unchanged."""
    model, batch = _model_and_data(3)
    settings = MeasureSettings(top_k=2, seed=5)
    assert settings.generator(0).device.type == "cpu" and settings.generator(0, "cpu").device.type == "cpu"
    first = settings.generator(7).initial_seed()
    assert settings.generator(7, torch.device("cpu")).initial_seed() == first
    res = solve(model, _loss, [batch], settings, step=0)
    assert res.top_vectors.device.type == "cpu" and res.min_vector is not None
    moved = res.vectors_to("meta")
    assert moved.top_vectors.is_meta and moved.min_vector is not None and moved.min_vector.is_meta
    assert moved.eigenvalues == res.eigenvalues
    back = res.vectors_to("cpu")
    assert torch.equal(back.top_vectors, res.top_vectors) and torch.equal(back.min_vector, res.min_vector)


def test_max_basis_caps_the_basis_and_keeps_the_values() -> None:
    """A capped basis (thick restarts) spends more products for the same eigenvalues, checked against the
    dense float64 Hessian; a cap below the pairs the solve needs is refused with the bound in the message."""
    model, batch = _model_and_data(4)
    evals, _ = _dense(model, batch)
    runs = {cap: solve(model, _loss, [batch], MeasureSettings(max_basis=cap, max_hvp=600, tol=1e-6, lambda_min_tol=1e-6),
                       step=0) for cap in (None, 5)}
    for res in runs.values():
        assert res.eigenvalues[0] == pytest.approx(float(evals[-1]), rel=1e-5)
        assert res.lambda_min == pytest.approx(float(evals[0]), rel=1e-4)
    assert runs[5].n_hvp > runs[None].n_hvp
    with pytest.raises(ValueError, match=r"max_basis must be an int >= 6 \(top_k \+ 3, plus 1 with lambda_min=True\)"):
        MeasureSettings(top_k=2, max_basis=5)


def test_cold_solves_get_twice_the_default_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first (cold) solve of a run may spend twice the solver's default products; warm ones keep
    the default; an explicit max_hvp is used as given for both."""
    import lightning_rpe.measure as measure
    from lightning_rpe.curvature.eigen import default_max_hvp

    budgets: list[int | None] = []
    real = measure.eigenpairs

    def spy(*args, **kwargs):
        budgets.append(kwargs.get("max_hvp"))
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "eigenpairs", spy)
    model, batch = _model_and_data(5)
    dim = sum(p.numel() for p in model.parameters())
    for settings, expected in ((MeasureSettings(), [2 * default_max_hvp(dim, 1, "both"), None]),
                               (MeasureSettings(max_hvp=70), [70, 70])):
        budgets.clear()
        tracker = EigenvectorTracker()
        for step in range(2):
            res = solve(model, _loss, [batch], settings, step=step, warm=tracker)
            tracker.update(step, res.top_vectors, res.min_vector, k=1, gaps=res.gaps)
        assert budgets == expected
    assert MeasureSettings().budget(10, 1, "both", warm=False) == 10  # never more than dim
