import copy
import io
import math

import pytest
import torch

from lightning_rpe.optim import ClippedAdam

D = torch.float64


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(D)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g, dtype=D), torch.randn(16, 1, generator=g, dtype=D)


def _groups(model, **extra):
    first, second = model[0], model[2]
    return [
        {"params": list(first.parameters()), "lr": 0.03, "weight_decay": 0.1, **extra},
        {"params": [second.weight], "lr": 0.01, "betas": (0.8, 0.99)},
        {"params": [second.bias], "lr": 0.02, "eps": 1e-3, "weight_decay": 0.05},
    ]


def _train(model, opt, steps, x, y, closure=False):
    for _ in range(steps):
        def loss_fn():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()


def _assert_same(m1, m2, atol):
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("clip,mode", [(float("inf"), "upper"), (0.0, "lower")])
def test_equals_torch_adam_and_adamw_when_clip_is_inactive(decoupled, clip, mode):
    x, y = _data()
    m_ref, m_ours = _model(), _model()
    ref_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = ref_cls(_groups(m_ref), lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ours = ClippedAdam(_groups(m_ours), lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                       decoupled_weight_decay=decoupled, clip=clip, mode=mode)
    _train(m_ref, ref, 50, x, y)
    _train(m_ours, ours, 50, x, y)
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(m_ours.parameters(), _model().parameters()))
    assert moved > 0.1  # the comparison is not vacuous
    _assert_same(m_ref, m_ours, atol=1e-12)
    for p_ref, p_ours in zip(m_ref.parameters(), m_ours.parameters()):
        s_ref, s_ours = ref.state[p_ref], ours.state[p_ours]
        assert set(s_ours) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(s_ours["step"]) == float(s_ref["step"]) == 50
        torch.testing.assert_close(s_ours["exp_avg"], s_ref["exp_avg"], atol=1e-12, rtol=0)
        torch.testing.assert_close(s_ours["exp_avg_sq"], s_ref["exp_avg_sq"], atol=1e-12, rtol=0)


def test_clipping_changes_the_trajectory():
    x, y = _data()
    m_ref, m_ours = _model(), _model()
    ref = torch.optim.Adam(m_ref.parameters(), lr=0.05)
    ours = ClippedAdam(m_ours.parameters(), lr=0.05, clip=1e-3, mode="upper")
    _train(m_ref, ref, 5, x, y)
    _train(m_ours, ours, 5, x, y)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(m_ref.parameters(), m_ours.parameters()))
    assert diff > 1e-3


def _two_param_steps(mode, clip, grads, lr=0.1, betas=(0.5, 0.75), eps=1e-8):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=D))
    opt = ClippedAdam([p], lr=lr, betas=betas, eps=eps, clip=clip, mode=mode)
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=D)
        opt.step()
        out.append(p.detach().clone())
    return out


@pytest.mark.parametrize("mode", ["upper", "lower"])
def test_hand_computed_two_parameter_update(mode):
    lr, b1, b2, eps, c = 0.1, 0.5, 0.75, 1e-8, 1.0
    grads = [[0.5, 4.0], [-0.2, 1.0]]
    got = _two_param_steps(mode, c, grads, lr=lr, betas=(b1, b2), eps=eps)
    clip = min if mode == "upper" else max
    theta = [1.0, -2.0]
    m, v = [0.0, 0.0], [0.0, 0.0]
    for t, g in enumerate(grads, start=1):
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            theta[i] -= lr * m_hat / (clip(math.sqrt(v_hat), c) + eps)
        assert got[t - 1].tolist() == pytest.approx(theta, abs=1e-14)
    # step 1 by inspection: m_hat = g, sqrt(v_hat) = |g| = (0.5, 4)
    first = got[0] - torch.tensor([1.0, -2.0], dtype=D)
    expected = [-lr * 0.5 / (0.5 + eps), -lr * 4.0 / (1.0 + eps)] if mode == "upper" else \
        [-lr * 0.5 / (1.0 + eps), -lr * 4.0 / (4.0 + eps)]
    assert first.tolist() == pytest.approx(expected, abs=1e-15)


def test_beta1_zero_is_clipped_rmsprop_and_matches_adam_when_unclipped():
    lr, b2, c, eps = 0.05, 0.9, 0.3, 1e-8
    grads = [[0.1, 2.0], [0.4, -1.0], [-0.2, 0.5]]
    got = _two_param_steps("upper", c, grads, lr=lr, betas=(0.0, b2), eps=eps)
    theta, v = [1.0, -2.0], [0.0, 0.0]
    for t, g in enumerate(grads, start=1):
        for i in range(2):
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            theta[i] -= lr * g[i] / (min(math.sqrt(v[i] / (1 - b2**t)), c) + eps)
        assert got[t - 1].tolist() == pytest.approx(theta, abs=1e-14)
    x, y = _data()
    m_ref, m_ours = _model(), _model()
    ref = torch.optim.Adam(m_ref.parameters(), lr=0.02, betas=(0.0, 0.99))
    ours = ClippedAdam(m_ours.parameters(), lr=0.02, betas=(0.0, 0.99), clip=float("inf"))
    _train(m_ref, ref, 20, x, y)
    _train(m_ours, ours, 20, x, y)
    _assert_same(m_ref, m_ours, atol=1e-12)


def test_maximize_tensor_lr_and_complex_match_torch_adam():
    x, y = _data()
    m_ref, m_ours = _model(), _model()
    ref = torch.optim.Adam(m_ref.parameters(), lr=0.01, maximize=True)
    ours = ClippedAdam(m_ours.parameters(), lr=torch.tensor(0.01, dtype=D), clip=float("inf"), maximize=True)
    _train(m_ref, ref, 10, x, y)
    _train(m_ours, ours, 10, x, y)
    _assert_same(m_ref, m_ours, atol=1e-12)
    zr = torch.nn.Parameter(torch.tensor([1 + 2j, -0.5j], dtype=torch.complex128))
    zo = torch.nn.Parameter(zr.detach().clone())
    ref, ours = torch.optim.Adam([zr], lr=0.1), ClippedAdam([zo], lr=0.1, clip=0.0, mode="lower")
    for _ in range(5):
        for z, o in ((zr, ref), (zo, ours)):
            o.zero_grad()
            (z.abs() ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(zr, zo, atol=1e-12, rtol=0)


def test_closure_returns_loss_and_matches_plain_step():
    x, y = _data()
    m1, m2 = _model(), _model()
    o1 = ClippedAdam(m1.parameters(), lr=0.01, clip=0.5)
    o2 = ClippedAdam(m2.parameters(), lr=0.01, clip=0.5)
    _train(m1, o1, 5, x, y, closure=True)
    _train(m2, o2, 5, x, y, closure=False)
    _assert_same(m1, m2, atol=0)

    def closure():
        o1.zero_grad()
        loss = torch.nn.functional.mse_loss(m1(x), y)
        loss.backward()
        return loss

    assert isinstance(o1.step(closure), torch.Tensor)


def test_state_dict_round_trip_resumes_identically_including_weights_only():
    x, y = _data()
    full = _model()
    full_opt = ClippedAdam(_groups(full, clip=0.05), lr=0.05, clip=0.5, mode="upper")
    _train(full, full_opt, 20, x, y)

    half = _model()
    half_opt = ClippedAdam(_groups(half, clip=0.05), lr=0.05, clip=0.5, mode="upper")
    _train(half, half_opt, 10, x, y)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": half_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    for loader in ("in_memory", "weights_only"):
        resumed = _model(seed=123)
        opt = ClippedAdam(_groups(resumed), lr=0.05, clip=0.5, mode="upper")
        if loader == "in_memory":
            resumed.load_state_dict(copy.deepcopy(half.state_dict()))
            opt.load_state_dict(copy.deepcopy(half_opt.state_dict()))
        else:
            resumed.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
        assert opt.param_groups[0]["clip"] == 0.05  # per-group options come back too
        _train(resumed, opt, 10, x, y)
        _assert_same(full, resumed, atol=0)


def _quadratic(make, lam=100.0, steps=300, w0=1.0):
    w = torch.nn.Parameter(torch.tensor([w0], dtype=D))
    opt = make([w])
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * w**2).sum().backward()
        opt.step()
        traj.append(float(w.detach()))
        if not math.isfinite(traj[-1]) or abs(traj[-1]) > 1e8:
            break
    return traj


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_quadratic_upper_clip_restores_instability_lower_clip_and_adam_stay_stable(beta1):
    # L = lam w^2 / 2, lam = 100, lr = 0.01; clipping is active while |g| = lam |w| > c, and the
    # upper-clipped update is then momentum GD with lr / c: unstable when
    # lr lam / c > (2 + 2 beta1) / (1 - beta1)  (2 for beta1 = 0, 38 for beta1 = 0.9).
    lam, lr = 100.0, 0.01
    limit = (2 + 2 * beta1) / (1 - beta1)
    c = lr * lam / (1.5 * limit)  # lr lam / c = 1.5 x the limit (> 2 in both cases)
    betas = (beta1, 0.99)
    adam = _quadratic(lambda p: torch.optim.Adam(p, lr=lr, betas=betas), lam)
    upper = _quadratic(lambda p: ClippedAdam(p, lr=lr, betas=betas, clip=c, mode="upper"), lam)
    lower = _quadratic(lambda p: ClippedAdam(p, lr=lr, betas=betas, clip=c, mode="lower"), lam)
    # plain Adam settles near the minimum (bounded oscillation of amplitude ~ lr)
    assert len(adam) == 300 and max(abs(w) for w in adam[-100:]) < 0.05
    # upper clipping: the iterate changes sign and grows geometrically until it blows up
    assert len(upper) < 300 and abs(upper[-1]) > 1e8
    grow = [abs(upper[i + 1]) / abs(upper[i]) for i in range(len(upper) - 6, len(upper) - 1)]
    assert min(grow) > 1.0
    signs = [w > 0 for w in upper[-6:]]
    assert any(signs) and not all(signs)
    # lower clipping: stable, settles like Adam
    assert len(lower) == 300 and max(abs(w) for w in lower[-100:]) < 0.05


@pytest.mark.parametrize("ratio,stable", [(0.9, True), (1.1, False)])
def test_quadratic_upper_clip_threshold_is_the_momentum_gd_one(ratio, stable):
    # beta1 = 0.9: once clipping is active the update is w <- w - (lr / c) m_hat, i.e. momentum GD
    # (dampening beta1), asymptotically stable iff lr lam / c < (2 + 2 beta1) / (1 - beta1) = 38
    # (the Adam threshold with P = c). In the first ~1 / (1 - beta1) steps the bias correction
    # 1 / (1 - beta1^t) of m makes the step larger (t = 1 is a plain GD step with lr / c), so both
    # runs first grow by many orders of magnitude; the threshold decides the late growth rate.
    lam, lr, beta1 = 100.0, 0.01, 0.9
    c = lr * lam / (ratio * (2 + 2 * beta1) / (1 - beta1))
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=D))
    opt = ClippedAdam([w], lr=lr, betas=(beta1, 0.99), clip=c, mode="upper")
    traj = []
    for _ in range(600):
        opt.zero_grad()
        (0.5 * lam * w**2).sum().backward()
        opt.step()
        traj.append(abs(float(w.detach())))
    assert all(math.isfinite(x) for x in traj)
    assert max(traj[:50]) > 1e6  # the bias-correction transient
    assert traj[-1] > c / lam  # clipping stayed active to the end: |g| > c
    if stable:
        assert traj[-1] < 1e-3 * traj[399]
    else:
        assert traj[-1] > 1e3 * traj[399]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas must be a pair"),
        ({"eps": -1e-8}, "eps must be"),
        ({"weight_decay": -0.1}, "weight_decay must be"),
        ({"mode": "both"}, r"mode must be one of \('upper', 'lower'\)"),
        ({"clip": 0.0, "mode": "upper"}, "clip must be > 0"),
        ({"clip": float("inf"), "mode": "lower"}, "clip must be finite"),
        ({"clip": -1.0, "mode": "lower"}, "clip must be finite and >= 0"),
        ({"clip": float("nan")}, "clip must be a float"),
        ({"decoupled_weight_decay": "yes"}, "decoupled_weight_decay"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClippedAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_invalid_param_group_option():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="mode must be"):
        ClippedAdam([{"params": [p]}, {"params": [q], "mode": "middle"}])
