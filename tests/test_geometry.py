import io
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from lightning_rpe.geometry import (
    EigenvectorTracker,
    PolarityTracker,
    abs_cosine,
    align_sign,
    gradient_alignment,
    match_eigenvectors,
    principal_angles,
    rotation_angle,
    subspace_similarity,
)


def unit2(deg: float) -> torch.Tensor:
    r = math.radians(deg)
    return torch.tensor([math.cos(r), math.sin(r)], dtype=torch.float64)


# ---------------------------------------------------------------- cosines and angles


def test_abs_cosine_known_values_sign_and_scale_invariant():
    u = torch.tensor([1.0, 0.0, 0.0])
    assert abs_cosine(u, torch.tensor([3.0, 4.0, 0.0])) == pytest.approx(0.6, abs=1e-15)
    assert abs_cosine(u, torch.tensor([-3.0, 4.0, 0.0])) == pytest.approx(0.6, abs=1e-15)
    assert abs_cosine(-7 * u, torch.tensor([3.0, 4.0, 0.0])) == pytest.approx(0.6, abs=1e-15)
    assert abs_cosine(u, torch.tensor([0.0, 0.0, 2.0])) == 0.0
    assert abs_cosine(u, -u) == 1.0
    # any shape, flattened
    assert abs_cosine(torch.eye(2), torch.eye(2)) == pytest.approx(1.0)


def test_abs_cosine_bad_input():
    with pytest.raises(ValueError, match="u must be a non-zero"):
        abs_cosine(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="same number of elements"):
        abs_cosine(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="finite"):
        abs_cosine(torch.tensor([1.0, float("nan")]), torch.ones(2))
    with pytest.raises(ValueError, match="torch.Tensor"):
        abs_cosine([1.0, 2.0], torch.ones(2))


@pytest.mark.parametrize("deg", [0.0, 1e-7, 0.5, 30.0, 45.0, 89.0, 90.0, 120.0, 179.0, 180.0])
def test_rotation_angle_known_angles_folded_to_0_90(deg):
    expected = deg if deg <= 90 else 180 - deg
    got = rotation_angle(unit2(0.0), unit2(deg))
    assert 0.0 <= got <= 90.0
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_rotation_angle_equals_arccos_of_abs_cosine_and_is_accurate_when_tiny():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u, v = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
        assert rotation_angle(u, v) == pytest.approx(math.degrees(math.acos(abs_cosine(u, v))), abs=1e-9)
    # arccos(cos(1e-9 rad)) rounds to 0 in float64; the atan2 form keeps the digits
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([1.0, 1e-9], dtype=torch.float64)
    assert math.degrees(math.acos(abs_cosine(u, v))) == 0.0
    assert rotation_angle(u, v) == pytest.approx(math.degrees(1e-9), rel=1e-9)


# ---------------------------------------------------------------- subspaces


def test_principal_angles_known_construction_and_basis_invariance():
    n = 7
    e = torch.eye(n, dtype=torch.float64)
    a, b = 0.3, 1.1
    U = torch.stack([e[0], e[1]], 1)
    V = torch.stack([math.cos(b) * e[0] + math.sin(b) * e[2], math.cos(a) * e[1] + math.sin(a) * e[3]], 1)
    th = principal_angles(U, V)
    assert th.dtype == torch.float64
    assert torch.allclose(th, torch.tensor([a, b], dtype=torch.float64), atol=1e-14)
    # any basis of the same spans gives the same angles (non-orthogonal, scaled columns)
    M = torch.tensor([[2.0, 1.0], [0.5, -3.0]], dtype=torch.float64)
    assert torch.allclose(principal_angles(U @ M, V @ M.T), th, atol=1e-13)
    assert torch.allclose(principal_angles(V, U), th, atol=1e-13)


def test_principal_angles_match_scipy_on_random_subspaces():
    rng = np.random.default_rng(1)
    for k, l in [(1, 1), (3, 3), (2, 5), (5, 2)]:
        A, B = rng.standard_normal((20, k)), rng.standard_normal((20, l))
        ours = principal_angles(torch.from_numpy(A), torch.from_numpy(B)).numpy()
        ref = np.sort(scipy.linalg.subspace_angles(A, B))
        assert ours.shape == (min(k, l),)
        assert np.all(np.diff(ours) >= 0)
        np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_principal_angles_tiny_angle_accurate_and_bounds():
    e = torch.eye(4, dtype=torch.float64)
    U = torch.stack([e[0], e[1]], 1)
    V = torch.stack([e[0] + 1e-10 * e[2], e[1]], 1)
    th = principal_angles(U, V)
    assert th[0] == 0.0
    assert float(th[1]) == pytest.approx(1e-10, rel=1e-6)
    W = torch.stack([e[2], e[3]], 1)
    assert torch.allclose(principal_angles(U, W), torch.full((2,), math.pi / 2, dtype=torch.float64))
    # 1-D inputs are single columns
    assert float(principal_angles(unit2(0), unit2(30))[0]) == pytest.approx(math.radians(30))


def test_principal_angles_bad_input():
    with pytest.raises(ValueError, match="linearly independent"):
        principal_angles(torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0]]), torch.eye(3)[:, :2])
    with pytest.raises(ValueError, match="same number of rows"):
        principal_angles(torch.eye(3)[:, :1], torch.eye(4)[:, :1])
    with pytest.raises(ValueError, match="more columns"):
        principal_angles(torch.ones(2, 3), torch.eye(2))
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        principal_angles(torch.ones(2, 2, 2), torch.eye(2))


def test_subspace_similarity_values():
    e = torch.eye(6, dtype=torch.float64)
    U = e[:, :3]
    M = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert subspace_similarity(U, U @ M) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(U, e[:, 3:]) == pytest.approx(0.0, abs=1e-15)
    assert subspace_similarity(unit2(0), unit2(40)) == pytest.approx(math.cos(math.radians(40)))
    # two angles: cos of the RMS angle, i.e. the docs/science.md formula with k = 2
    a, b = 0.2, 0.9
    V = torch.stack([math.cos(a) * e[0] + math.sin(a) * e[3], math.cos(b) * e[1] + math.sin(b) * e[4], e[2]], 1)
    th2 = a * a + b * b
    expected = math.cos((math.pi / 2) * math.sqrt(th2) / math.sqrt(3 * (math.pi / 2) ** 2))
    assert subspace_similarity(U, V) == pytest.approx(expected, abs=1e-13)
    assert expected == pytest.approx(math.cos(math.sqrt(th2 / 3)))


# ---------------------------------------------------------------- sign and gradient


def test_align_sign():
    ref = torch.tensor([1.0, 1.0])
    v = torch.tensor([-1.0, 0.2])
    out = align_sign(v, ref)
    assert torch.equal(out, -v) and float(out @ ref) >= 0
    assert align_sign(-v, ref) is not None and torch.equal(align_sign(-v, ref), -v)
    w = torch.tensor([1.0, -1.0])  # orthogonal: unchanged
    assert torch.equal(align_sign(w, ref), w)
    v32 = torch.tensor([[-1.0, 0.0]], dtype=torch.float32)
    assert align_sign(v32, torch.tensor([1.0, 0.0])).dtype == torch.float32


def test_gradient_alignment():
    v = torch.tensor([0.0, 1.0])
    assert gradient_alignment(torch.tensor([3.0, -4.0]), v) == pytest.approx(0.8)
    assert gradient_alignment(torch.tensor([3.0, 4.0]), -v) == pytest.approx(0.8)
    assert math.isnan(gradient_alignment(torch.zeros(2), v))
    with pytest.raises(ValueError, match="v must be a non-zero"):
        gradient_alignment(torch.ones(2), torch.zeros(2))


# ---------------------------------------------------------------- polarity


def test_polarity_steady_rotation_keeps_sign():
    tr = PolarityTracker()
    assert tr.update(unit2(0)) is None
    for t in range(1, 8):
        v = unit2(5.0 * t)
        step = tr.update(-v if t % 2 else v)  # input signs are arbitrary
        assert step.angle == pytest.approx(5.0)
        assert step.polarity == pytest.approx(5.0)
        assert step.sign == 1 and step.flips == 0
        assert float(step.aligned.reshape(-1) @ unit2(5.0 * t)) > 0  # aligned to the previous one


def test_polarity_alternating_swings_alternate_sign():
    tr = PolarityTracker()
    tr.update(unit2(0))
    angles = [3.0, -4.0, 5.0, -6.0, 7.0]
    prev = 0.0
    for i, a in enumerate(angles):
        step = tr.update(unit2(a))
        assert step.angle == pytest.approx(abs(a - prev))
        assert step.sign == (1 if i % 2 == 0 else -1)
        assert step.flips == i
        assert step.polarity == pytest.approx(step.sign * abs(a - prev))
        prev = a


def test_polarity_ignores_negligible_displacement():
    tr = PolarityTracker(min_displacement=1e-6)
    tr.update(unit2(0))
    tr.update(unit2(2))
    same = tr.update(unit2(2))  # no rotation: sign kept, no flip, polarity 0
    assert same.angle == pytest.approx(0.0, abs=1e-12) and same.sign == 1 and same.flips == 0
    back = tr.update(unit2(0))  # now reversing relative to the last real displacement
    assert back.sign == -1 and back.flips == 1 and back.polarity == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="min_displacement"):
        PolarityTracker(min_displacement=-1.0)
    with pytest.raises(ValueError, match="reset"):
        tr.update(torch.ones(3))


def _ab_model_eigs(steps: int, eta: float = 0.011):
    a, b = -0.1, 10.0
    out = []
    for _ in range(steps):
        H = torch.tensor([[2 * b * b, 4 * a * b], [4 * a * b, 2 * a * a]], dtype=torch.float64)
        ev, V = torch.linalg.eigh(H)
        out.append((float(ev[1]), float(ev[0]), V[:, 1].clone(), a))
        ga, gb = 2 * a * b * b, 2 * a * a * b
        a, b = a - eta * ga, b - eta * gb
    return out


def test_polarity_on_two_parameter_model_ab_squared():
    """L(a, b) = (a b)^2, GD at eta = 0.011 from (-0.1, 10): 2 / eta = 181.8 < lambda_max = 200.08."""
    eigs = _ab_model_eigs(8)
    assert eigs[0][0] > 2 / 0.011
    tr = PolarityTracker()
    minor, pol, flips = [], [], []
    for lmax, lmin, v, a in eigs:
        step = tr.update(v)
        ref = v if step is None else step.aligned
        minor.append(float(ref[1]) * (1 if float(ref[0]) > 0 else -1))  # major component > 0
        if step is not None:
            pol.append(step.polarity)
            flips.append(step.flips)
    # the small weight flips sign every step
    assert all(eigs[i][3] * eigs[i + 1][3] < 0 for i in range(7))
    # lambda_max falls, |lambda_min| grows
    assert all(eigs[i + 1][0] < eigs[i][0] for i in range(7))
    assert all(abs(eigs[i + 1][1]) > abs(eigs[i][1]) for i in range(7))
    # minor component of the aligned eigenvector: magnitudes 0.020, 0.024, 0.029, 0.034 (docs/science.md)
    assert [round(abs(m), 3) for m in minor[:4]] == [0.020, 0.024, 0.029, 0.034]
    assert all(minor[i] * minor[i + 1] < 0 for i in range(7))
    # polarity alternates in sign with growing magnitude, flips +1 per step
    assert all(pol[i] * pol[i + 1] < 0 for i in range(len(pol) - 1))
    assert all(abs(pol[i + 1]) > abs(pol[i]) for i in range(len(pol) - 1))
    assert flips == list(range(len(pol)))
    # the first swing goes from one side of the axis to the other: asin(0.0200) + asin(0.0240)
    expected_first = math.degrees(math.asin(0.0239880) + math.asin(0.0199900))
    assert pol[0] > 0 and pol[0] == pytest.approx(expected_first, rel=1e-4)


def test_polarity_state_dict_round_trip_weights_only():
    eigs = _ab_model_eigs(10)
    full = PolarityTracker()
    expected = [full.update(v) for _, _, v, _ in eigs]
    first = PolarityTracker()
    for _, _, v, _ in eigs[:4]:
        first.update(v)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = PolarityTracker()
    resumed.load_state_dict(state)
    assert resumed.updates == 4
    for (_, _, v, _), exp in zip(eigs[4:], expected[4:]):
        got = resumed.update(v)
        assert got.polarity == exp.polarity and got.flips == exp.flips and got.sign == exp.sign
        assert torch.equal(got.aligned, exp.aligned)
    with pytest.raises(ValueError, match="missing keys"):
        PolarityTracker().load_state_dict({"sign": 1})


def test_match_eigenvectors_follows_directions_not_order() -> None:
    from lightning_rpe.geometry import match_eigenvectors

    e = torch.eye(4, dtype=torch.float64)
    assert match_eigenvectors(e[:, :3], e[:, :3]) == (0, 1, 2)
    assert match_eigenvectors(e[:, :3], -e[:, [1, 0, 2]]) == (1, 0, 2)  # signs do not matter
    with pytest.raises(ValueError, match="one shape"):
        match_eigenvectors(e[:, :2], e[:, :3])


def test_tracker_reports_a_crossing_as_a_crossing_not_a_rotation() -> None:
    from lightning_rpe.geometry import EigenvectorTracker

    e = torch.eye(5, dtype=torch.float64)
    tracker = EigenvectorTracker(reference_step=0)
    assert tracker.update(0, e[:, :2], k=1).crossed is None
    # lambda_1 and lambda_2 swap order and v_1 (now the old v_2) turns by 5 degrees
    c, s = math.cos(math.radians(5)), math.sin(math.radians(5))
    new_v1 = c * e[:, 1] + s * e[:, 2]
    rot = tracker.update(10, torch.stack([new_v1, e[:, 0]], dim=1), k=1)
    assert rot.crossed is True and rot.crossings == 1
    assert rot.rotation_angle == pytest.approx(5.0, abs=1e-9)  # not 90
    assert rot.rotation_cos == pytest.approx(c)
    assert rot.subspace_similarity < 1.0  # the top-1 subspace did change
    # no crossing the next time: the count stays
    rot = tracker.update(20, torch.stack([new_v1, e[:, 0]], dim=1), k=1)
    assert rot.crossed is False and rot.crossings == 1 and rot.rotation_angle == pytest.approx(0.0, abs=1e-6)
    state = tracker.state_dict()
    other = EigenvectorTracker()
    other.load_state_dict(state)
    assert other.crossings == 1


def test_previous_still_eigenvector_tells_a_crossing_from_a_rotation() -> None:
    from lightning_rpe.curvature import DenseOperator
    from lightning_rpe.measure import previous_still_eigenvector

    H = torch.diag(torch.tensor([3.0, 2.9, 1.0], dtype=torch.float64))
    e = torch.eye(3, dtype=torch.float64)
    op = DenseOperator(H)
    # the old v_1 = e2 is still an eigenvector (eigenvalue 2.9), the new v_1 = e1: a crossing
    assert previous_still_eigenvector(op, e[:, 1], e[:, 0], 3.0, 1e-3) is True
    assert op.n_hvp == 1
    # the old v_1 is a 70-degree mix: no longer an eigenvector (one product tells), so a rotation
    mix = math.cos(math.radians(70)) * e[:, 0] + math.sin(math.radians(70)) * e[:, 2]
    assert previous_still_eigenvector(op, mix, e[:, 0], 3.0, 1e-3) is False
    # nearly the same vector: no product spent, no crossing
    assert previous_still_eigenvector(op, e[:, 0] + 1e-3 * e[:, 1], e[:, 0], 3.0, 1e-3) is False and op.n_hvp == 2


def test_tracker_counts_an_outside_crossing_verdict_with_one_vector() -> None:
    from lightning_rpe.geometry import EigenvectorTracker

    e = torch.eye(4, dtype=torch.float64)
    tracker = EigenvectorTracker()
    tracker.update(0, e[:, :1])
    rot = tracker.update(5, e[:, 1:2], crossed=True)
    assert rot.crossed is True and rot.crossings == 1 and rot.rotation_angle is None and rot.polarity is None
    rot = tracker.update(10, e[:, 1:2], crossed=False)
    assert rot.crossed is False and rot.crossings == 1 and rot.rotation_angle == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("deg", [1e-6, 0.01, 1.0, 45.0, 89.9, 120.0])
def test_polarity_angle_and_cosine_match_the_rotation_exactly(deg):
    """The tracker's angle (from the chord between unit vectors) and cosine agree with the exact
    rotation, tiny angles included, with either sign; float32 vectors against rotation_angle of
    the same vectors."""
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(1000, 2, generator=g, dtype=torch.float64))
    t = math.radians(deg)
    a, b = 3.0 * basis[:, 0], -(math.cos(t) * basis[:, 0] + math.sin(t) * basis[:, 1])
    folded = min(deg, 180.0 - deg)  # the angle between the lines
    tracker = PolarityTracker()
    tracker.update(a)
    step = tracker.update(b)
    assert step.angle == pytest.approx(folded, rel=1e-9)
    assert step.cosine == pytest.approx(math.cos(math.radians(folded)), rel=1e-12)
    if deg >= 0.01:  # a float32 vector cannot hold a 1e-6 degree rotation
        a32, b32 = a.float(), b.float()
        tracker = PolarityTracker()
        tracker.update(a32)
        step = tracker.update(b32)
        assert step.angle == pytest.approx(rotation_angle(a32, b32), rel=1e-9)
        assert step.cosine == pytest.approx(abs_cosine(a32, b32), rel=1e-12)


def test_tracker_reference_subspace_does_not_keep_the_whole_block_alive() -> None:
    """Extra columns (m > k, tracked for matching only): the reference subspace is k vectors of memory,
    not a view that keeps the first (dim, m) block's storage alive for the whole run."""
    g = torch.Generator().manual_seed(0)
    tracker = EigenvectorTracker()
    first = torch.linalg.qr(torch.randn(50, 2, generator=g, dtype=torch.float64))[0]
    tracker.update(0, first, k=1)
    assert tracker.reference_top is not None and tracker.reference_top.shape == (50, 1)
    assert tracker.reference_top.untyped_storage().nbytes() == 50 * 8
    assert torch.equal(tracker.reference_top[:, 0], first[:, 0])
    second = torch.linalg.qr(torch.randn(50, 2, generator=g, dtype=torch.float64))[0]
    rot = tracker.update(1, second, k=1)
    assert rot.subspace_similarity_to_first is not None


@pytest.mark.parametrize("case", ["orthonormal", "ill_conditioned", "tiny_angles"])
def test_principal_angles_by_row_ranges_match_scipy(case: str) -> None:
    """More than 65,536 rows: the angles come from several float64 row ranges (TSQR); the same as
    scipy's subspace_angles on the whole float64 blocks, non-orthonormal and nearly equal blocks too."""
    n = 200_003
    g = torch.Generator().manual_seed(1)
    U = torch.randn(n, 3, generator=g, dtype=torch.float64)
    V = torch.randn(n, 2, generator=g, dtype=torch.float64)
    if case == "ill_conditioned":
        U[:, 2] = U[:, 0] + 1e-6 * U[:, 2]  # condition number ~1e6
    if case == "tiny_angles":
        V = U[:, :2] + 1e-9 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    got = principal_angles(U, V)
    ref = np.sort(scipy.linalg.subspace_angles(U.numpy(), V.numpy()))
    if case == "tiny_angles":
        assert got.tolist() == pytest.approx(ref.tolist(), rel=1e-5)
    else:
        assert got.tolist() == pytest.approx(ref.tolist(), abs=1e-10)


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1.0, 1e153, 1e200])
def test_principal_angles_do_not_depend_on_the_scale(scale: float) -> None:
    """Each block is scaled by its largest entry before any float64 sum: float64 inputs near 1e-300 or
    1e300 give the same angles (they gave pi/2 without a word, or a LinAlgError, when the row-range
    products ran on the raw entries)."""
    g = torch.Generator().manual_seed(3)
    U = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    V = U + 0.1 * torch.randn(1000, 3, generator=g, dtype=torch.float64)
    ref = np.sort(scipy.linalg.subspace_angles(U.numpy(), V.numpy()))
    assert principal_angles(U * scale, V * scale).tolist() == pytest.approx(ref.tolist(), abs=1e-12)
    assert principal_angles(U[:, 0] * scale, V[:, 0]).tolist() == pytest.approx(
        principal_angles(U[:, 0], V[:, 0]).tolist(), abs=1e-12)


def test_principal_angles_leave_their_inputs_untouched() -> None:
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float64, torch.float32):
        U = 7.0 * torch.randn(300, 2, generator=g, dtype=dtype)
        V = 3.0 * torch.randn(300, 2, generator=g, dtype=dtype)
        U0, V0 = U.clone(), V.clone()
        principal_angles(U, V)
        subspace_similarity(U[:, 0], V)
        assert torch.equal(U, U0) and torch.equal(V, V0)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_match_eigenvectors_at_extreme_float64_scales(scale: float) -> None:
    q = torch.linalg.qr(torch.randn(500, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    swapped = q[:, [1, 0, 2]]
    assert match_eigenvectors(q * scale, swapped * scale) == (1, 0, 2)


def test_tracker_leaves_a_field_empty_when_a_factorisation_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LinAlgError inside the subspace geometry empties those fields; the update itself goes on."""
    import lightning_rpe.geometry as geometry

    g = torch.Generator().manual_seed(6)
    tracker = EigenvectorTracker()
    blocks = [torch.linalg.qr(torch.randn(40, 2, generator=g, dtype=torch.float64))[0] for _ in range(2)]
    tracker.update(0, blocks[0])

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(geometry, "_angles", broken)
    rot = tracker.update(1, blocks[1])
    assert rot.subspace_similarity is None and rot.subspace_similarity_to_first is None
    assert rot.rotation_angle is not None and torch.equal(tracker.previous_top, blocks[1])


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160, 1e200])
def test_line_geometry_and_tracker_do_not_depend_on_the_scale(scale: float) -> None:
    """Two vectors 30 degrees apart, scaled together: cosines, angles, the one-vector tracker's subspace
    similarities and the polarity are those of the unit vectors (NaN or 3e-4 off at 1e+-160 before)."""
    u = torch.zeros(50, dtype=torch.float64)
    v = torch.zeros(50, dtype=torch.float64)
    u[0], v[0], v[1] = 1.0, math.cos(math.radians(30)), math.sin(math.radians(30))
    assert abs_cosine(u * scale, v * scale) == pytest.approx(math.cos(math.radians(30)), rel=1e-14)
    assert rotation_angle(u * scale, v * scale) == pytest.approx(30.0, rel=1e-12)
    tracker = EigenvectorTracker()
    tracker.update(0, (u * scale)[:, None])
    rot = tracker.update(1, (v * scale)[:, None])
    assert rot.subspace_similarity == pytest.approx(math.cos(math.radians(30)), rel=1e-14)
    assert rot.subspace_similarity_to_first == pytest.approx(math.cos(math.radians(30)), rel=1e-14)
    assert rot.rotation_angle == pytest.approx(30.0, rel=1e-12) and abs(rot.polarity) == pytest.approx(30.0, rel=1e-12)
    w = u * scale
    w0 = w.clone()
    abs_cosine(w, v)
    assert torch.equal(w, w0)


def test_tracker_polarity_shares_the_previous_vector_and_gives_the_same_values() -> None:
    """EigenvectorTracker's polarity keeps +-v_1 as the previous top block's own storage and a sign (one
    parameter vector of state less); values equal a copying PolarityTracker's on a sequence with sign
    flips and swings, and the default PolarityTracker still copies (mutating the input changes nothing)."""
    g = torch.Generator().manual_seed(7)
    base = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=torch.float64))[0]
    seq = []
    for t in range(10):
        a = 0.3 * math.sin(1.7 * t)
        v = math.cos(a) * base[:, 0] + math.sin(a) * base[:, 1] + 0.05 * t * base[:, 2]
        seq.append((-1.0) ** t * v / v.norm())
    tracker, plain = EigenvectorTracker(), PolarityTracker()
    for t, v in enumerate(seq):
        rot = tracker.update(t, v[:, None].clone())
        step = plain.update(v.clone())
        if step is not None:
            assert rot.polarity == step.polarity and rot.polarity_flips == step.flips
        ref = tracker.polarity._reference
        assert ref is not None and ref.untyped_storage().data_ptr() == tracker.previous_top.untyped_storage().data_ptr()
        assert torch.equal(tracker.polarity.reference, plain.reference)
    assert plain.flips >= 1
    fed = seq[0].clone()
    copying = PolarityTracker()
    copying.update(fed)
    fed.mul_(-1.0)
    assert torch.equal(copying.reference, seq[0])
    with pytest.raises(ValueError, match="copy must be True or False"):
        PolarityTracker(copy=1)


def test_a_zero_vector_never_reaches_the_training_loop_through_the_polarity() -> None:
    """A zero v_1 handed over as a crossing used to become the polarity reference and the next update
    raised ZeroDivisionError; now rebase refuses it (ValueError) and the tracker goes on."""
    with pytest.raises(ValueError, match="reference must be a non-zero vector"):
        PolarityTracker().rebase(torch.zeros(5))
    tracker = EigenvectorTracker()
    a, b = torch.zeros(30, 1, dtype=torch.float64), torch.zeros(30, 1, dtype=torch.float64)
    a[0], b[1] = 1.0, 1.0
    tracker.update(0, a)
    assert tracker.update(1, torch.zeros(30, 1, dtype=torch.float64), crossed=True).crossed is True
    rot = tracker.update(2, b)
    assert rot.polarity is not None and abs(rot.polarity) == pytest.approx(90.0)


def test_a_crossing_of_v2_and_v3_leaves_v1_polarity_alone() -> None:
    # v_1 swings to alternating sides every measurement (polarity alternates, one flip each), while
    # v_2 and v_3 swap order once (a crossing that v_1 takes no part in). Any non-identity match used
    # to rebase the polarity, dropping v_1's displacement: every later sign inverted and one flip
    # lost for the rest of the run (a review).
    def frame(t: int, swapped: bool) -> torch.Tensor:
        a = 0.05 * (t + 1) * (-1) ** t
        v1 = torch.tensor([math.cos(a), math.sin(a), 0, 0, 0, 0], dtype=torch.float64)
        v2 = torch.tensor([0, 0, 1.0, 0, 0, 0], dtype=torch.float64)
        v3 = torch.tensor([0, 0, 0, 1.0, 0, 0], dtype=torch.float64)
        return torch.stack([v1, v3, v2] if swapped else [v1, v2, v3], 1)

    def run(swap_at: int | None) -> list[tuple[float | None, int | None, int | None]]:
        tracker = EigenvectorTracker()
        out = []
        for t in range(8):
            r = tracker.update(t, frame(t, swap_at is not None and t >= swap_at))
            out.append((None if r.polarity is None else round(r.polarity, 9), r.polarity_flips, r.crossings))
        return out

    plain, swapped = run(None), run(4)
    assert [p for p, _, _ in swapped] == [p for p, _, _ in plain]
    assert [f for _, f, _ in swapped] == [f for _, f, _ in plain] == [None, 0, 1, 2, 3, 4, 5, 6]
    assert [p for p, _, _ in plain][1:3] == pytest.approx([8.594366927, -14.323944878], rel=1e-8)
    assert [c for _, _, c in swapped][4:] == [1, 1, 1, 1]  # the swap is still counted as a crossing
