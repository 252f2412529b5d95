"""The lr-scaled stability ratio lambda_max(S^1/2 H S^1/2) against PyTorch's own optimizers on quadratics.

On L(w) = w^T H w / 2 every supported update rule is linear, so stability is a property of the
iteration matrix: stable iff its spectral radius is < 1. These tests build that matrix for SGD
(plain, heavy ball, Nesterov) with per-group learning rates, check that the ratio crosses 1 exactly
where the spectral radius does (shared rule: exact), and run torch.optim.SGD itself on both sides.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_rpe.curvature import DenseOperator, ScaledOperator
from lightning_rpe.geometry import Rotation
from lightning_rpe.measure import MeasureSettings, assemble, at_lr_scales, solve
from lightning_rpe.stability import adam_preconditioner, group_thresholds, step_scales

D = torch.float64


def _spd(n: int, seed: int, coupled: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    evals = torch.linspace(0.5, 10.0, n, dtype=D)
    H = q @ torch.diag(evals) @ q.T
    return H if coupled else torch.diag(torch.diag(H))


def _params(sizes: tuple[int, ...]) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(n, dtype=D)) for n in sizes]


def _optimizer(params: list[nn.Parameter], lrs: tuple[float, ...], momenta: tuple[float, ...], nesterov: bool) -> torch.optim.SGD:
    groups = [{"params": [p], "lr": lr, "momentum": m, "nesterov": nesterov and m > 0} for p, lr, m in zip(params, lrs, momenta)]
    return torch.optim.SGD(groups, lr=lrs[0])


def _ratio(H: torch.Tensor, opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
    scales = step_scales(opt, params, group_thresholds(opt))
    s = torch.cat([t.reshape(-1) for t in scales.scales])
    if scales.uniform is not None:
        return scales.uniform * float(torch.linalg.eigvalsh(H)[-1])
    return float(torch.linalg.eigvalsh(s.sqrt()[:, None] * H * s.sqrt()[None, :])[-1])


def _spectral_radius(H: torch.Tensor, lrs: torch.Tensor, beta: torch.Tensor, nesterov: bool) -> float:
    """Spectral radius of PyTorch SGD's iteration on (w, buf) for the quadratic (dampening 0)."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=D)
    B = torch.diag(beta)
    L = torch.diag(lrs)
    # buf' = B buf + H w ; w' = w - L (H w + B buf') if nesterov else w - L buf'
    buf_w, buf_b = H, B
    if nesterov:
        w_w, w_b = eye - L @ (H + B @ H), -L @ B @ B
    else:
        w_w, w_b = eye - L @ H, -L @ B
    M = torch.cat([torch.cat([w_w, w_b], 1), torch.cat([buf_w, buf_b], 1)], 0)
    return float(torch.linalg.eigvals(M).abs().max())


def _coordinate(values: tuple[float, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.full((n,), v, dtype=D) for v, n in zip(values, sizes)])


def _run_torch_sgd(H: torch.Tensor, opt: torch.optim.SGD, params: list[nn.Parameter], steps: int) -> float:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    for _ in range(steps):
        w = torch.cat([p.reshape(-1) for p in params])
        grad = H @ w
        i = 0
        for p in params:
            p.grad = grad[i : i + p.numel()].view_as(p).clone()
            i += p.numel()
        opt.step()
    return float(torch.cat([p.detach().reshape(-1) for p in params]).norm())


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
def test_shared_rule_ratio_crosses_one_where_pytorch_sgd_turns_unstable(momentum: float, nesterov: bool) -> None:
    sizes = (3, 4)
    H = _spd(sum(sizes), seed=0)
    base = (1.0, 0.02)  # head-like fast group, backbone-like slow group
    params = _params(sizes)
    r1 = _ratio(H, _optimizer(params, base, (momentum, momentum), nesterov), params)
    for target, stable in ((0.97, True), (1.03, False)):
        lrs = tuple(lr * target / r1 for lr in base)
        params = _params(sizes)
        opt = _optimizer(params, lrs, (momentum, momentum), nesterov)
        assert _ratio(H, opt, params) == pytest.approx(target, rel=1e-10)
        rho = _spectral_radius(H, _coordinate(lrs, sizes), _coordinate((momentum, momentum), sizes), nesterov)
        assert (rho < 1.0) == stable, (target, rho)
    # and torch.optim.SGD itself: shrinks at ratio 0.9, blows up at 1.1
    for target, stable in ((0.9, True), (1.1, False)):
        params = _params(sizes)
        opt = _optimizer(params, tuple(lr * target / r1 for lr in base), (momentum, momentum), nesterov)
        norm = _run_torch_sgd(H, opt, params, steps=600)
        assert (norm < 1.0) == stable, (target, norm)


def test_one_learning_rate_gives_the_classical_ratio_without_a_solve() -> None:
    params = _params((3, 2))
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scales = step_scales(opt, params, group_thresholds(opt))
    assert scales.uniform == pytest.approx(0.1 / 3.8) and scales.frozen == 0


def test_per_group_lrs_case_ratio_is_half_of_lambda_max_of_lr_scaled_hessian() -> None:
    # issue case 17: head lr 1.0 with curvature 1, backbone lr 0.001 with curvature 100
    H = torch.diag(torch.tensor([1.0, 100.0], dtype=D))
    params = _params((1, 1))
    opt = _optimizer(params, (1.0, 0.001), (0.0, 0.0), False)
    assert _ratio(H, opt, params) == pytest.approx(0.5)  # lambda_max(diag(1, 0.1)) / 2


def test_different_momenta_are_exact_for_block_diagonal_hessians() -> None:
    sizes = (2, 3)
    H = torch.block_diag(_spd(2, seed=3), _spd(3, seed=4))
    params = _params(sizes)
    base, momenta = (0.5, 0.05), (0.9, 0.0)
    r1 = _ratio(H, _optimizer(params, base, momenta, False), params)
    for target, stable in ((0.98, True), (1.02, False)):
        lrs = tuple(lr * target / r1 for lr in base)
        rho = _spectral_radius(H, _coordinate(lrs, sizes), _coordinate(momenta, sizes), False)
        assert (rho < 1.0) == stable, (target, rho)


@pytest.mark.parametrize("momenta, nesterov", [((0.9, 0.0), False), ((0.0, 0.9), False), ((0.9, 0.5), True)])
def test_different_momenta_with_a_coupled_hessian_lose_stability_where_the_ratio_crosses_one(
    momenta: tuple[float, float], nesterov: bool
) -> None:
    # On a positive-definite quadratic these rules lose stability through a period-2 mode
    # (iteration eigenvalue -1), which exists exactly when lambda_max(S^1/2 H S^1/2) = 1 with
    # s = lr / K per coordinate, whatever the per-group momenta (derivation in docs/metrics.md).
    sizes = (2, 3)
    params = _params(sizes)
    for seed in range(4):
        H = _spd(5, seed=seed)
        for base in ((0.1, 0.1), (0.03, 0.2), (0.2, 0.03)):
            r1 = _ratio(H, _optimizer(params, base, momenta, nesterov), params)
            lo, hi = 1e-3, 1e3  # bisection on the lr scale c where the spectral radius crosses 1
            for _ in range(60):
                c = math.sqrt(lo * hi)
                lrs = _coordinate(tuple(lr * c for lr in base), sizes)
                if _spectral_radius(H, lrs, _coordinate(momenta, sizes), nesterov) < 1.0:
                    lo = c
                else:
                    hi = c
            assert lo * r1 == pytest.approx(1.0, rel=1e-6), (seed, base)


def test_adam_scales_are_lr_over_threshold_times_inverse_preconditioner_and_zero_where_frozen() -> None:
    used, unused = nn.Parameter(torch.ones(3, dtype=D)), nn.Parameter(torch.ones(2, dtype=D))
    opt = torch.optim.Adam([used, unused], lr=0.01, betas=(0.9, 0.99))
    used.grad = torch.tensor([1.0, 0.0, -2.0], dtype=D)  # the middle coordinate never gets a gradient
    opt.step()
    scales = step_scales(opt, [used, unused], group_thresholds(opt), ["used", "unused"])
    P = adam_preconditioner(opt)[used]
    k = (2 + 2 * 0.9) / (1 - 0.9)
    expected = torch.tensor([0.01 / k / float(P[0]), 0.0, 0.01 / k / float(P[2])], dtype=D)
    torch.testing.assert_close(scales.scales[0], expected)
    torch.testing.assert_close(scales.scales[1], torch.zeros(2, dtype=D))
    assert scales.no_state == ("unused",) and scales.frozen == 3 and scales.uniform == pytest.approx(0.01 / k)
    # the preconditioned operator stays finite: the eps-only coordinate is masked, not 1/eps
    inverse = torch.cat([t.reshape(-1) for t in scales.inverse_preconditioner])
    op = ScaledOperator(DenseOperator(torch.eye(5, dtype=D) * 2.0), inverse)
    assert float(op.to_dense().max()) == pytest.approx(2.0 / float(P[2]) if P[2] < P[0] else 2.0 / float(P[0]))


def test_adam_before_its_first_step_has_no_scales() -> None:
    p = nn.Parameter(torch.ones(2, dtype=D))
    opt = torch.optim.Adam([p], lr=0.1)
    assert step_scales(opt, [p], group_thresholds(opt)) is None


class _Quadratic(nn.Module):
    """``L(w) = w^T H w / 2`` over two parameters (two param groups); the batch is unused."""

    def __init__(self, H: torch.Tensor, sizes: tuple[int, int]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = nn.Parameter(torch.randn(sizes[0], generator=g, dtype=D))
        self.b = nn.Parameter(torch.randn(sizes[1], generator=g, dtype=D))
        self.register_buffer("H", H)

    def forward(self, batch: object) -> torch.Tensor:
        w = torch.cat([self.a, self.b])
        return 0.5 * w @ self.H @ w


@pytest.mark.parametrize("controlled", [(0,), (1,)])
def test_controlled_ratio_is_the_ratio_of_the_controlled_groups_alone(controlled: tuple[int, ...]) -> None:
    # An InstabilityController scaling a subset C of the groups steers lambda_max(S_C^1/2 H S_C^1/2)
    # (the other groups' steps set to 0), which scaling C's lrs by f scales by exactly f; the joint
    # ratio does not move in proportion (a review saw a controller chase it to its bound).
    H, sizes = _spd(5, seed=4), (3, 2)
    model = _Quadratic(H, sizes)
    lrs = (0.05, 0.2)
    opt = torch.optim.SGD([{"params": [model.a], "lr": lrs[0]}, {"params": [model.b], "lr": lrs[1]}], lr=lrs[0])
    settings = MeasureSettings(dtype="float64", tol=1e-10, verify="off", lambda_min=False, grad_alignment=False)
    s = solve(model, lambda m, b: m(b), [torch.zeros(1)], settings, step=0, optimizer=opt, controlled_groups=controlled)
    mask = _coordinate(tuple(1.0 if i in controlled else 0.0 for i in range(2)), sizes)
    s_c = _coordinate(tuple(lr / 2 for lr in lrs), sizes) * mask
    expected = float(torch.linalg.eigvalsh(s_c.sqrt()[:, None] * H * s_c.sqrt()[None, :])[-1])
    assert s.controlled_ratio == pytest.approx(expected, rel=1e-9)
    s_all = _coordinate(tuple(lr / 2 for lr in lrs), sizes)
    joint = float(torch.linalg.eigvalsh(s_all.sqrt()[:, None] * H * s_all.sqrt()[None, :])[-1])
    assert s.stability_ratio == pytest.approx(joint, rel=1e-9)
    # every group controlled: no second ratio (the joint one is the controlled one)
    assert solve(model, lambda m, b: m(b), [torch.zeros(1)], settings, step=0, optimizer=opt,
                 controlled_groups=(0, 1)).controlled_ratio is None
    # restated after a decision that scales C by 3: the controlled ratio exactly 3x; the joint ratio has
    # no closed form then and is left out instead of bounded
    m = assemble(s, Rotation(), step=0, epoch=0, seconds=0.0, trigger="step")
    after = [3.0 if i in controlled else 1.0 for i in range(2)]
    restated = at_lr_scales(m, [1.0, 1.0], after, controlled=controlled)
    assert restated.controlled_ratio == pytest.approx(3 * expected, rel=1e-12)
    assert restated.stability_ratio is None
    s3 = _coordinate(tuple(lr / 2 * f for lr, f in zip(lrs, after)), sizes) * mask
    assert restated.controlled_ratio == pytest.approx(
        float(torch.linalg.eigvalsh(s3.sqrt()[:, None] * H * s3.sqrt()[None, :])[-1]), rel=1e-9)
    uniform = at_lr_scales(m, [1.0, 1.0], [2.0, 2.0])
    assert uniform.stability_ratio == pytest.approx(2 * joint, rel=1e-12)
