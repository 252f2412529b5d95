"""ClippedAdam's relative clip (clip_quantile), clip_statistics() and the preconditioner it reports."""

import copy
import io
import math

import pytest
import torch
from test_clipped_adam import D, _data, _model

from lightning_rpe.optim import ClippedAdam, ClipStatistics
from lightning_rpe.optim import clipped_adam as ca
from lightning_rpe.stability import adam_preconditioner


def _train(model, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _max_diff(m1, m2) -> float:
    return max(float((a - b).detach().abs().max()) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("mode,q", [("upper", 1.0), ("lower", 1e-9)])
def test_quantile_at_the_extreme_is_exactly_adam(decoupled, mode, q):
    # upper with the maximum as level, lower with the minimum: the clip never changes a value
    x, y = _data()
    m_ref, m_ours = _model(), _model()
    ref = (torch.optim.AdamW if decoupled else torch.optim.Adam)(m_ref.parameters(), lr=0.05, weight_decay=0.1)
    ours = ClippedAdam(m_ours.parameters(), lr=0.05, weight_decay=0.1, decoupled_weight_decay=decoupled,
                       clip_quantile=q, mode=mode)
    _train(m_ref, ref, 40, x, y)
    _train(m_ours, ours, 40, x, y)
    assert _max_diff(m_ours, _model()) > 0.1
    assert _max_diff(m_ref, m_ours) < 1e-12
    st = ours.clip_statistics()[0]
    assert st.relative and st.active and st.step == 40 and st.fraction == 0.0


@pytest.mark.parametrize("mode", ["upper", "lower"])
def test_hand_computed_relative_update_with_warmup(mode):
    # one parameter of 6 coordinates, q = 0.5 (k = 3: the third smallest sqrt(v_hat)), scale 2,
    # warm-up 1 step: step 1 is plain Adam, steps 2 and 3 clip at 2 * x_(3)
    lr, b1, b2, eps, q, s = 0.1, 0.5, 0.75, 1e-8, 0.5, 2.0
    grads = [[0.5, -4.0, 0.1, 2.0, -0.3, 1.0], [-0.2, 1.0, 0.3, 3.0, 0.2, -0.7], [0.1, 0.4, -2.0, 0.5, 0.6, 0.2]]
    p = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=D))
    opt = ClippedAdam([p], lr=lr, betas=(b1, b2), eps=eps, clip_quantile=q, clip_scale=s, clip_warmup=1, mode=mode)
    theta = p.detach().tolist()
    m, v = [0.0] * 6, [0.0] * 6
    clip = min if mode == "upper" else max
    for t, g in enumerate(grads, start=1):
        p.grad = torch.tensor(g, dtype=D)
        opt.step()
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        roots = [math.sqrt(vi / (1 - b2**t)) for vi in v]
        level = math.inf if t == 1 else s * sorted(roots)[2]
        if t == 1 and mode == "lower":
            level = 0.0
        d = [clip(r, level) for r in roots]
        theta = [th - lr * (mi / (1 - b1**t)) / (di + eps) for th, mi, di in zip(theta, m, d)]
        assert p.detach().tolist() == pytest.approx(theta, abs=1e-14)
        st = opt.clip_statistics()[0]
        assert st.level == pytest.approx(level, rel=1e-14) if math.isfinite(level) else st.level == level
        hits = sum((r > level) if mode == "upper" else (r < level) for r in roots)
        assert st.fraction == pytest.approx(hits / 6) and st.numel == 6 and st.step == t
        assert st.active == (t > 1)
    assert 0 < st.fraction < 1  # the clip acted on some coordinates, not all


def test_quantile_is_per_group_and_statistics_per_group():
    a = torch.nn.Parameter(torch.zeros(4, dtype=D))
    b = torch.nn.Parameter(torch.zeros(3, dtype=D))
    c = torch.nn.Parameter(torch.zeros(2, dtype=D))
    opt = ClippedAdam([{"params": [a, b]}, {"params": [c], "clip": 0.5}], lr=0.1, betas=(0.0, 0.0), eps=0.0,
                      clip_quantile=0.5)
    # betas (0, 0): sqrt(v_hat) = |g| exactly
    a.grad = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    b.grad = torch.tensor([5.0, 6.0, 7.0], dtype=D)
    c.grad = torch.tensor([0.25, 1.0], dtype=D)
    opt.step()
    g0, g1 = opt.clip_statistics()
    assert isinstance(g0, ClipStatistics) and (g0.index, g1.index) == (0, 1)
    # group 0: 7 values, k = ceil(3.5) = 4 -> level 4; 3 coordinates above it
    assert (g0.relative, g0.level, g0.fraction, g0.numel) == (True, 4.0, 3 / 7, 7)
    # group 1 overrides the default relative clip with an absolute one
    assert (g1.relative, g1.level, g1.fraction, g1.numel) == (False, 0.5, 0.5, 2)
    assert opt.param_groups[1]["clip_quantile"] is None and opt.param_groups[0]["clip"] is None
    # the steps: -lr * g / min(|g|, level)
    torch.testing.assert_close(a.detach(), -0.1 * torch.ones(4, dtype=D), atol=1e-9, rtol=0)
    torch.testing.assert_close(b.detach(), -0.1 * torch.tensor([5 / 4, 6 / 4, 7 / 4], dtype=D), atol=1e-9, rtol=0)
    torch.testing.assert_close(c.detach(), -0.1 * torch.tensor([1.0, 2.0], dtype=D), atol=1e-9, rtol=0)


def test_group_can_switch_an_absolute_default_to_relative():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = ClippedAdam([{"params": [p]}, {"params": [q], "clip_quantile": 0.9}], clip=3.0)
    assert (opt.param_groups[0]["clip"], opt.param_groups[0]["clip_quantile"]) == (3.0, None)
    assert (opt.param_groups[1]["clip"], opt.param_groups[1]["clip_quantile"]) == (None, 0.9)
    assert ClippedAdam([p]).param_groups[0]["clip"] == 1.0  # the historical default


def test_statistics_before_the_first_step():
    (st,) = ClippedAdam([torch.nn.Parameter(torch.zeros(3))], clip_quantile=0.9).clip_statistics()
    assert st.step == 0 and st.numel == 0 and not st.active
    assert math.isnan(st.level) and math.isnan(st.fraction)


def test_absolute_statistics_count_the_coordinates_beyond_c():
    p = torch.nn.Parameter(torch.zeros(5, dtype=D))
    opt = ClippedAdam([p], betas=(0.0, 0.0), clip=2.5, mode="lower")
    p.grad = torch.tensor([1.0, -2.0, 3.0, 4.0, 0.5], dtype=D)
    opt.step()
    (st,) = opt.clip_statistics()
    assert (st.relative, st.level, st.fraction, st.active) == (False, 2.5, 3 / 5, True)


@pytest.mark.parametrize(
    "clip,mode,kwargs",
    [
        (0.3, "upper", {}),
        (0.05, "lower", {}),
        (None, "upper", {"clip_quantile": 0.3, "clip_warmup": 3}),
        (None, "lower", {"clip_quantile": 0.7, "clip_scale": 1.5}),
        (None, "upper", {"clip_quantile": 0.5, "clip_scale": 0.5}),
    ],
)
def test_preconditioner_is_the_denominator_used_on_a_quadratic(clip, mode, kwargs):
    # L = theta^T H theta / 2 with a dense SPD H: the step just taken must be theta - lr P^-1 m
    # for the P that adam_preconditioner reports, at every step (warm-up included)
    g = torch.Generator().manual_seed(3)
    n = 12
    q_mat, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    h = q_mat @ torch.diag(torch.logspace(-2, 2, n, dtype=D)) @ q_mat.T
    theta = torch.nn.Parameter(torch.randn(n, generator=g, dtype=D))
    bias = torch.nn.Parameter(torch.randn(3, generator=g, dtype=D))
    lr = 0.02
    opt = ClippedAdam([theta, bias], lr=lr, betas=(0.9, 0.99), eps=1e-6, clip=clip, mode=mode, **kwargs)
    clipped_steps = 0
    for _ in range(8):
        opt.zero_grad()
        (0.5 * theta @ h @ theta + (bias**4).sum()).backward()
        before = [theta.detach().clone(), bias.detach().clone()]
        opt.step()
        pre = adam_preconditioner(opt)
        for p, b in zip((theta, bias), before):
            expected = b - lr * opt.state[p]["exp_avg"] / pre[p]
            torch.testing.assert_close(p.detach(), expected, atol=1e-13, rtol=1e-13)
        clipped_steps += opt.clip_statistics()[0].fraction > 0
    assert clipped_steps >= 4  # the clip acted: the test compares against the clipped P


@pytest.mark.parametrize("q", [0.1, 0.9])
def test_subsampled_quantile_is_fixed_and_matches_its_sample(monkeypatch, q):
    monkeypatch.setattr(ca, "EXACT_QUANTILE_MAX", 50)
    monkeypatch.setattr(ca, "QUANTILE_SAMPLE", 40)
    x, y = _data()
    m1, m2 = (torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).to(D)
              for _ in range(2))
    m2.load_state_dict(m1.state_dict())
    o1 = ClippedAdam(m1.parameters(), lr=0.01, clip_quantile=q)
    o2 = ClippedAdam(m2.parameters(), lr=0.01, clip_quantile=q)
    _train(m1, o1, 5, x, y)
    _train(m2, o2, 5, x, y)
    assert _max_diff(m1, m2) == 0.0  # deterministic: the same fixed sample in both optimizers
    params = list(m1.parameters())
    (idx,) = o1._samples.values()
    assert sum(len(i) for i in idx) == 40
    beta2 = 0.999
    roots = [(o1.state[p]["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**5)).reshape(-1) for p in params]
    sample = torch.cat([r[i] for r, i in zip(roots, idx)])
    expected = sample.sort().values[math.ceil(q * 40) - 1]
    assert o1.clip_statistics()[0].level == float(expected)
    everything = torch.cat(roots)
    assert 0.0 < (everything > expected).double().mean() < 1.0


def test_relative_state_dict_round_trip_resumes_bit_identically():
    x, y = _data()

    def make(model, q=0.8):
        return ClippedAdam([{"params": list(model[0].parameters())},
                            {"params": list(model[2].parameters()), "clip_quantile": 0.3, "mode": "lower"}],
                           lr=0.05, clip_quantile=q, clip_scale=1.2, clip_warmup=4)

    full = _model()
    full_opt = make(full)
    _train(full, full_opt, 20, x, y)
    half = _model()
    half_opt = make(half)
    _train(half, half_opt, 10, x, y)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": half_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    for loaded in (copy.deepcopy(half_opt.state_dict()), ckpt["opt"]):
        resumed = _model(seed=7)
        resumed.load_state_dict(copy.deepcopy(half.state_dict()))
        opt = make(resumed, q=0.5)  # the options come back from the checkpoint
        opt.load_state_dict(loaded)
        assert [g["clip_quantile"] for g in opt.param_groups] == [0.8, 0.3]
        assert opt.clip_statistics() == half_opt.clip_statistics()
        _train(resumed, opt, 10, x, y)
        assert _max_diff(full, resumed) == 0.0
        assert opt.clip_statistics() == full_opt.clip_statistics()


def test_checkpoint_without_the_relative_options_loads_as_absolute():
    x, y = _data()
    model = _model()
    opt = ClippedAdam(model.parameters(), lr=0.05, clip=0.5)
    _train(model, opt, 3, x, y)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for key in ("clip_quantile", "clip_scale", "clip_warmup"):
            del g[key]
    fresh = ClippedAdam(model.parameters(), lr=0.05, clip=0.5)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["clip_quantile"] is None
    _train(model, fresh, 2, x, y)
    assert fresh.clip_statistics()[0].step == 5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"clip": 0.5, "clip_quantile": 0.9}, "either clip .* or clip_quantile"),
        ({"clip_quantile": 0.0}, r"clip_quantile must be a float in \(0, 1\]"),
        ({"clip_quantile": 1.5}, r"clip_quantile must be a float in \(0, 1\]"),
        ({"clip_quantile": float("nan")}, "clip_quantile must be"),
        ({"clip_quantile": "0.9"}, "clip_quantile must be"),
        ({"clip_quantile": 0.9, "clip_scale": 0.0}, "clip_scale must be a finite float > 0"),
        ({"clip": 0.5, "clip_scale": -1.0}, "clip_scale must be"),
        ({"clip_quantile": 0.9, "clip_scale": float("inf")}, "clip_scale must be"),
        ({"clip_quantile": 0.9, "clip_warmup": -1}, r"clip_warmup must be an integer >= 0"),
        ({"clip_quantile": 0.9, "clip_warmup": 2.5}, "clip_warmup must be"),
        ({"clip_quantile": 0.9, "clip_warmup": True}, "clip_warmup must be"),
        ({"maximize": 1}, "maximize must be True or False"),
    ],
)
def test_invalid_relative_arguments_name_the_class_and_the_option(kwargs, match):
    with pytest.raises(ValueError, match="^ClippedAdam: .*" + match):
        ClippedAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_group_with_both_kinds_of_clip_is_rejected():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="ClippedAdam: give either clip"):
        ClippedAdam([{"params": [p]}, {"params": [q], "clip": 1.0, "clip_quantile": 0.5}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_relative_clip_on_cuda_matches_cpu():
    x, y = _data()
    m_cpu, m_gpu = _model(), _model().cuda()
    o_cpu = ClippedAdam(m_cpu.parameters(), lr=0.05, clip_quantile=0.7, clip_warmup=2)
    o_gpu = ClippedAdam(m_gpu.parameters(), lr=0.05, clip_quantile=0.7, clip_warmup=2)
    _train(m_cpu, o_cpu, 10, x, y)
    _train(m_gpu, o_gpu, 10, x.cuda(), y.cuda())
    for a, b in zip(m_cpu.parameters(), m_gpu.parameters()):
        torch.testing.assert_close(a, b.cpu(), atol=1e-10, rtol=0)
    assert o_gpu.clip_statistics()[0].level == pytest.approx(o_cpu.clip_statistics()[0].level, rel=1e-10)
