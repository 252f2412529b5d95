"""Geometry of Hessian eigenvectors: rotation, subspace similarity, sign alignment and polarity.

Pure PyTorch, no Lightning. All quantities are computed in float64 whatever the input dtype,
and returned as Python floats (or a float64 tensor for :func:`principal_angles`). Vectors may
have any shape; they are flattened. Exact definitions, formula by formula: ``docs/metrics.md``.

Eigenvectors have no sign (``v`` and ``-v`` are the same eigenvector), so every comparison of
two eigenvectors here is sign-invariant, except :class:`PolarityTracker`, which fixes the sign
against the previous eigenvector on purpose.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EigenvectorTracker",
    "PolarityStep",
    "PolarityTracker",
    "Rotation",
    "abs_cosine",
    "align_sign",
    "gradient_alignment",
    "match_eigenvectors",
    "principal_angles",
    "rotation_angle",
    "subspace_similarity",
]


def _flat64(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be a real tensor, got dtype {x.dtype}")
    flat = x.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        raise ValueError(f"{name} must have at least one element")
    largest = _largest(flat, name)
    if not 1e-100 <= largest <= 1e100:
        # every caller computes directions (cosines, angles, signs, unit vectors): divide by the largest
        # entry so that norms and dot products of float64 input near 1e-300 or 1e300 stay finite and
        # non-zero (a new tensor: the caller's float64 input is never divided in place)
        flat = flat / largest
    return flat


def _pair(u: Tensor, v: Tensor, names: tuple[str, str] = ("u", "v")) -> tuple[Tensor, Tensor]:
    a, b = _flat64(u, names[0]), _flat64(v, names[1])
    if a.numel() != b.numel():
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of elements, "
            f"got {a.numel()} and {b.numel()}"
        )
    if a.device != b.device:
        b = b.to(a.device)
    return a, b


def _nonzero_norm(x: Tensor, name: str) -> float:
    n = float(torch.linalg.vector_norm(x))
    if n == 0.0:
        raise ValueError(f"{name} must be a non-zero vector (its direction is undefined)")
    return n


def abs_cosine(u: Tensor, v: Tensor) -> float:
    """Sign-invariant cosine ``|<u, v>| / (||u|| ||v||)`` in [0, 1] (1: same line, 0: orthogonal).

    Raises ValueError for a zero vector, non-finite entries or different sizes.
    """
    return _abs_cos(*_pair(u, v))


def _abs_cos(a: Tensor, b: Tensor) -> float:
    """:func:`abs_cosine` of two flat float64 vectors already checked by :func:`_pair`."""
    na, nb = _nonzero_norm(a, "u"), _nonzero_norm(b, "v")
    return min(1.0, abs(float(a @ b)) / (na * nb))


def rotation_angle(u: Tensor, v: Tensor) -> float:
    """Angle in degrees, in [0, 90], between the lines spanned by ``u`` and ``v``.

    Equals ``degrees(arccos(abs_cosine(u, v)))``; computed as
    ``degrees(atan2(||v_perp||, |<u_hat, v>|))`` with ``v_perp = v - <u_hat, v> u_hat``, which is
    the same angle but accurate also for tiny rotations, where arccos loses all digits.
    """
    return _angle(*_pair(u, v))


def _angle(a: Tensor, b: Tensor) -> float:
    """:func:`rotation_angle` of two flat float64 vectors already checked by :func:`_pair`."""
    na = _nonzero_norm(a, "u")
    _nonzero_norm(b, "v")
    along = float(a @ b) / na  # <u_hat, v>
    perp = float(torch.linalg.vector_norm(torch.add(b, a, alpha=-along / na)))  # ||v - <u_hat, v> u_hat||
    return math.degrees(math.atan2(perp, abs(along)))


def _block(x: Tensor, name: str) -> Tensor:
    """``x`` as a checked 2-D ``(n, k)`` block of basis columns, in its own dtype and device."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 1-D (one vector) or 2-D (n, k) with basis vectors as columns, got shape {tuple(x.shape)}"
        )
    if x.shape[1] == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")
    if x.shape[1] > x.shape[0]:
        raise ValueError(
            f"{name} has more columns ({x.shape[1]}) than rows ({x.shape[0]}): columns cannot be independent"
        )
    if x.is_complex():
        raise ValueError(f"{name} must be a real tensor, got dtype {x.dtype}")
    return x.detach()  # its entries are checked by _Basis (one pass that also gives the scale)


def _row_chunks(n: int) -> list[slice]:
    """At most 16 row ranges (of at least 65,536 rows) covering ``range(n)``: the float64 work on a tall
    block runs one range at a time, so it needs a sixteenth of a float64 copy of the block, not a whole one.
    """
    rows = max(65_536, -(-n // 16))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _r_factor(rows: Callable[[slice], Tensor], n: int) -> Tensor:
    """The ``(k, k)`` R factor of the tall float64 matrix whose row ranges ``rows(s)`` gives, by TSQR
    (the R factors of the row ranges stacked and factored again; Demmel et al. 2012).
    """
    parts = [torch.linalg.qr(rows(s), mode="r")[1] for s in _row_chunks(n)]
    stacked = parts[0] if len(parts) == 1 else torch.cat(parts)
    return stacked if len(parts) == 1 and stacked.shape[0] == stacked.shape[1] else torch.linalg.qr(stacked, mode="r")[1]


def _triangular_inverse(r: Tensor, name: str, k: int) -> Tensor:
    diag = r.diagonal().abs()
    if r.shape[0] < k or float(diag.max()) == 0.0 or float(diag.min()) <= 1e-12 * float(diag.max()):
        raise ValueError(f"{name} must have linearly independent columns (rank {k})")
    eye = torch.eye(k, dtype=r.dtype, device=r.device)
    return torch.linalg.solve_triangular(r, eye, upper=True)


class _Basis:
    """A checked ``(n, k)`` block ``x`` of basis columns, scaled by its largest ``|entry|`` (angles do
    not depend on the scale, and float64 sums of the scaled rows neither underflow nor overflow for
    float64 inputs near 1e-300 or 1e300), with ``T`` such that ``(x / scale) @ T`` (in float64) has
    orthonormal columns spanning those of ``x``: ``T = R_1^-1 R_2^-1`` from two TSQR passes (the second
    one restores orthogonality to rounding for blocks far from orthonormal, as in CholeskyQR2), without
    a float64 copy of ``x``.

    Raises:
        ValueError: as :func:`_block`, NaN or inf entries, or dependent columns (relative pivot <= 1e-12).
    """

    def __init__(self, x: Tensor, name: str) -> None:
        self.x = _block(x, name)
        self.scale = _largest(self.x, name)
        n, k = self.x.shape
        t1 = _triangular_inverse(_r_factor(self.rows, n), name, k)
        r2 = _r_factor(lambda s: self.rows(s) @ t1.to(self.x.device), n)
        self.t = t1 @ _triangular_inverse(r2, name, k)

    def rows(self, s: slice, device: torch.device | None = None) -> Tensor:
        """Rows ``s`` of ``x / scale`` in float64 (on ``device``, default ``x``'s)."""
        # copy=True: a float64 input on that device would otherwise be divided in place (the caller's tensor)
        return self.x[s].to(device or self.x.device, torch.float64, copy=True).div_(self.scale)


def _largest(x: Tensor, name: str | None = None) -> float:
    """``max |x_ij|`` (1.0 for an all-zero or empty block) in one ``aminmax`` pass, without an ``abs``
    copy of ``x``; with ``name``, a NaN or inf entry (which ``aminmax`` propagates) raises ValueError
    naming it, so the same pass is the finiteness check.
    """
    if x.numel() == 0:
        return 1.0
    lo, hi = (float(t) for t in torch.aminmax(x))
    if name is not None and not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must contain only finite values")
    return max(abs(lo), abs(hi)) or 1.0


def _gram(a: Tensor, b: Tensor, scale_a: float = 1.0, scale_b: float = 1.0) -> Tensor:
    """``(a / scale_a)^T (b / scale_b)`` in float64 on ``a``'s device, one row range at a time."""
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for s in _row_chunks(a.shape[0]):
        rows_a = a[s].to(torch.float64, copy=True).div_(scale_a)
        out.addmm_(rows_a.T, b[s].to(a.device, torch.float64, copy=True).div_(scale_b))
    return out


def principal_angles(U: Tensor, V: Tensor) -> Tensor:
    """Principal angles (radians, ascending, in [0, pi/2]) between span(U) and span(V).

    ``U`` is (n, k), ``V`` is (n, l) with basis vectors as columns (a 1-D tensor is one column);
    they need not be orthonormal (each is orthonormalised implicitly, ``Q = (U / max|U|) T`` with ``T``
    from two TSQR passes). ``min(k, l)`` angles are returned (float64). The cosines are the singular
    values of ``Q_U^T Q_V`` clamped to [0, 1]; angles below pi/4 are taken from the sines instead
    (singular values of the part of the smaller basis orthogonal to the other span, Knyazev & Argentati
    2002), which keeps tiny angles accurate. Working memory: a sixteenth of a float64 copy of a block
    at a time.

    Raises:
        ValueError: non-tensor, complex, non-finite or rank-deficient input, or different row counts.
    """
    u, v = _block(U, "U"), _block(V, "V")
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"U and V must have the same number of rows, got {u.shape[0]} and {v.shape[0]}")
    return _angles(_Basis(u, "U"), _Basis(v, "V"))


def _angles(bu: _Basis, bv: _Basis) -> Tensor:
    """:func:`principal_angles` of two :class:`_Basis`."""
    if bu.x.shape[0] != bv.x.shape[0]:
        raise ValueError(f"U and V must have the same number of rows, got {bu.x.shape[0]} and {bv.x.shape[0]}")
    # small: the basis with fewer columns; big: the other one
    small, big = (bu, bv) if bu.x.shape[1] <= bv.x.shape[1] else (bv, bu)
    dev = big.x.device
    ts, tb = small.t.to(dev), big.t.to(dev)
    n = big.x.shape[0]
    m = tb.T @ _gram(big.x, small.x, big.scale, small.scale) @ ts  # Q_big^T Q_small
    cos = torch.linalg.svdvals(m).clamp(0.0, 1.0)  # descending
    tbm = tb @ m

    def residual(s: slice) -> Tensor:  # rows s of Q_small - Q_big (Q_big^T Q_small)
        return torch.addmm(small.rows(s, dev) @ ts, big.rows(s), tbm, alpha=-1.0)

    # the singular values of the tall residual are those of its k x k R factor; for one column its norm
    if small.x.shape[1] == 1:
        sq = sum(float((residual(s) ** 2).sum()) for s in _row_chunks(n))
        sin = torch.tensor([math.sqrt(sq)], dtype=torch.float64, device=dev).clamp(0.0, 1.0)
    else:
        sin = torch.linalg.svdvals(_r_factor(residual, n)).clamp(0.0, 1.0).flip(0)  # ascending
    from_cos = torch.arccos(cos)  # ascending
    from_sin = torch.arcsin(sin)  # ascending
    return torch.where(cos * cos >= 0.5, from_sin, from_cos)


def subspace_similarity(U: Tensor, V: Tensor) -> float:
    """Top-k subspace similarity in [0, 1]: ``cos((pi/2) sqrt(sum theta_i^2) / sqrt(k (pi/2)^2))``.

    ``theta_i`` are the :func:`principal_angles`, ``k = min(k_U, k_V)``. The argument simplifies to
    the root-mean-square principal angle, so this is ``cos(rms(theta))``: 1 for the same subspace,
    0 for orthogonal subspaces, ``cos(theta)`` for two lines at angle theta.
    """
    return _similarity(principal_angles(U, V))


def _line_similarity(u: Tensor, v: Tensor) -> float:
    """:func:`subspace_similarity` of two lines: ``cos`` of the angle between the vectors (:func:`_angle`)."""
    a, b = _pair(u.contiguous(), v.contiguous())
    return math.cos(math.radians(_angle(b, a)))


def _similarity(theta: Tensor) -> float:
    """:func:`subspace_similarity` from the principal angles."""
    k = theta.numel()
    arg = (math.pi / 2) * math.sqrt(float((theta * theta).sum())) / math.sqrt(k * (math.pi / 2) ** 2)
    return max(0.0, math.cos(arg))


def align_sign(v: Tensor, reference: Tensor) -> Tensor:
    """Return ``v`` or ``-v`` so that ``<v, reference> >= 0`` (same dtype, shape and device as v).

    When ``<v, reference> == 0`` exactly, ``v`` is returned unchanged.
    """
    a, b = _pair(v, reference, ("v", "reference"))
    return -v if float(a @ b) < 0.0 else v


def gradient_alignment(g: Tensor, v: Tensor) -> float:
    """``|cos(g, v)| = |<g, v>| / (||g|| ||v||)`` in [0, 1] between the gradient and an eigenvector.

    1 means the gradient points along the eigenvector's line. Returns ``nan`` when ``g`` is
    exactly zero (the alignment is undefined at a stationary point, which is a legitimate state);
    a zero ``v`` is an error.
    """
    a, b = _pair(g, v, ("g", "v"))
    _nonzero_norm(b, "v")
    if float(torch.linalg.vector_norm(a)) == 0.0:
        return float("nan")
    return abs_cosine(a, b)


@dataclass(frozen=True)
class PolarityStep:
    """One polarity update (see :class:`PolarityTracker`).

    Attributes:
        polarity: signed rotation angle ``s_t * theta_t`` in degrees, in [-90, 90].
        angle: ``theta_t``, unsigned rotation angle in degrees between v_{t-1} and v_t, in [0, 90].
        sign: direction sign ``s_t`` (+1 or -1).
        flips: number of sign changes of ``s`` so far (cumulative since the tracker started).
        cosine: ``|cos(v_{t-1}, v_t)|``.
        aligned: v_t with its sign fixed so that ``<v_t, v_{t-1}> >= 0`` (same dtype/device/shape
            as the input); the tracker keeps it as the next reference.
    """

    polarity: float
    angle: float
    sign: int
    flips: int
    cosine: float
    aligned: Tensor


class PolarityTracker:
    """Signed rotation ("polarity") of the leading eigenvector and its sign flips over time.

    For each new leading eigenvector ``v_t`` (``update(v)``):

    1. align: ``v_t <- sign(<v_t, v_{t-1}>) v_t`` so that ``<v_t, v_{t-1}> >= 0``;
    2. displacement ``d_t = v_t / ||v_t|| - v_{t-1} / ||v_{t-1}||``;
    3. ``theta_t`` = rotation angle in degrees between v_{t-1} and v_t (:func:`rotation_angle`);
    4. direction sign ``s_t = s_{t-1} * sign(<d_t, d_prev>)`` with ``s_1 = +1``, where ``d_prev``
       is the last displacement longer than ``min_displacement``; when
       ``||d_t|| <= min_displacement`` the sign is kept (``s_t = s_{t-1}``) and ``d_prev`` is not
       replaced (an exactly zero inner product also keeps the sign);
    5. ``polarity_t = s_t * theta_t`` (degrees); ``flips`` counts the t with ``s_t != s_{t-1}``.

    In two dimensions this is the rotation measured along a fixed orientation: an eigenvector
    swinging to alternating sides gives alternating signs, a steady rotation keeps one sign.
    The first call only stores the reference and returns None.

    The state (``state_dict``) holds only tensors, floats, ints and None, so it can be saved with
    ``torch.save`` and loaded with ``torch.load(weights_only=True)``.

    Args:
        min_displacement: displacements at most this long keep the sign (see step 4).
        copy: keep a copy of each eigenvector fed (default). ``False`` keeps the tensor itself and a
            sign (no parameter-sized copy; :class:`EigenvectorTracker` uses it, since it keeps the same
            vector): the caller must then not modify it in place, nor the returned
            :attr:`PolarityStep.aligned`, which may be that same tensor.
    """

    def __init__(self, min_displacement: float = 1e-6, copy: bool = True) -> None:
        ok = isinstance(min_displacement, (int, float)) and math.isfinite(min_displacement) and min_displacement >= 0
        if not ok:
            raise ValueError(f"min_displacement must be a finite float >= 0, got {min_displacement!r}")
        if not isinstance(copy, bool):
            raise ValueError(f"copy must be True or False, got {copy!r}")
        self.min_displacement = float(min_displacement)
        self.copy = copy
        self.reset()

    def reset(self) -> None:
        """Forget the reference, the last displacement, the sign and the flip count."""
        self._reference: Tensor | None = None  # the vector as fed (or its copy); the reference is _ref_sign times it
        self._ref_sign = 1.0
        self._displacement: Tensor | None = None
        self._sign = 1
        self._flips = 0
        self._updates = 0

    def _keep(self, v: Tensor, sign: float) -> None:
        self._reference = v.detach().clone() if self.copy else v.detach()
        self._ref_sign = sign

    @property
    def reference(self) -> Tensor | None:
        """The last aligned eigenvector (as given, not normalised), or None before the first update."""
        if self._reference is None or self._ref_sign > 0:
            return self._reference
        return -self._reference

    @property
    def flips(self) -> int:
        return self._flips

    @property
    def sign(self) -> int:
        return self._sign

    @property
    def updates(self) -> int:
        """Number of eigenvectors fed so far (including the first, which returns None)."""
        return self._updates

    def update(self, v: Tensor) -> PolarityStep | None:
        """Feed the newest leading eigenvector; returns None on the first call."""
        flat = _flat64(v, "v")
        norm = _nonzero_norm(flat, "v")
        if self._reference is None:
            self._keep(v, 1.0)
            self._updates = 1
            return None
        ref = _flat64(self._reference, "reference")
        if self._ref_sign < 0:
            ref = -ref
        if ref.numel() != flat.numel():
            raise ValueError(
                f"v has {flat.numel()} elements but the previous eigenvector had {ref.numel()}; "
                "call reset() when the parameter space changes"
            )
        ref = ref.to(flat.device)
        ref_norm = _nonzero_norm(ref, "reference")
        # align_sign(v, reference), rotation_angle and abs_cosine from one dot product and the chord
        # d between the unit vectors: angle = 2 asin(||d|| / 2), exact and accurate for tiny angles
        dot = float(flat @ ref)
        negative = dot < 0.0
        aligned = -v.detach() if negative else v.detach()
        unit = flat * ((-1.0 if negative else 1.0) / norm)
        d = unit.sub_(ref, alpha=1.0 / ref_norm)  # unit - ref_unit, in place of unit
        chord = float(torch.linalg.vector_norm(d))
        angle = math.degrees(2.0 * math.asin(min(1.0, chord / 2.0)))
        cosine = min(1.0, abs(dot) / (norm * ref_norm))
        big = chord > self.min_displacement
        prev = self._displacement
        if big and prev is not None:
            dot = float(d @ prev.to(device=d.device, dtype=d.dtype))
            if dot < 0.0:
                self._sign = -self._sign
                self._flips += 1
        if big:
            # kept in the eigenvector's dtype: only the sign of the next dot product uses it, and a
            # float32 run's checkpoint state stays one vector (the memory budget of the monitor)
            self._displacement = d.to(v.dtype)
        self._keep(v, -1.0 if negative else 1.0)  # the reference is ``aligned``
        self._updates += 1
        return PolarityStep(
            polarity=self._sign * angle,
            angle=angle,
            sign=self._sign,
            flips=self._flips,
            cosine=cosine,
            aligned=aligned,
        )

    def rebase(self, reference: Tensor) -> None:
        """Continue from another eigenvector (after a crossing).

        ``reference`` becomes the reference, its sign aligned to the current one; the last
        displacement (of the other vector) is dropped, the sign and the flip count are kept.
        """
        old = self.reference
        if old is None:
            _nonzero_norm(_flat64(reference, "reference"), "reference")
            self._keep(reference, 1.0)
        else:
            a, b = _pair(reference, old.to(reference.device), ("reference", "previous reference"))
            _nonzero_norm(a, "reference")
            self._keep(reference, -1.0 if float(a @ b) < 0.0 else 1.0)
        self._displacement = None

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors / floats / ints / None (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "reference": None if self._reference is None else self.reference.detach().clone(),  # type: ignore[union-attr]
            "displacement": None if self._displacement is None else self._displacement.detach().clone(),
            "sign": int(self._sign),
            "flips": int(self._flips),
            "updates": int(self._updates),
            "min_displacement": float(self.min_displacement),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        required = {"reference", "displacement", "sign", "flips", "updates"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}; expected keys {sorted(required)}")
        if state["sign"] not in (1, -1):
            raise ValueError(f"state['sign'] must be 1 or -1, got {state['sign']!r}")
        ref, disp = state["reference"], state["displacement"]
        self._reference = None if ref is None else ref.detach().clone()
        self._ref_sign = 1.0
        self._displacement = None if disp is None else disp.detach().clone()
        self._sign = int(state["sign"])
        self._flips = int(state["flips"])
        self._updates = int(state["updates"])
        if "min_displacement" in state:
            self.min_displacement = float(state["min_displacement"])


@dataclass(frozen=True)
class Rotation:
    """How the tracked eigenvectors moved since the previous measurement (see :class:`EigenvectorTracker`).

    Every field is None when it cannot be computed (first measurement, a changed parameter
    space, or a degenerate vector).

    Attributes:
        rotation_cos: ``|cos(v_1, v_1_prev)|`` in [0, 1].
        rotation_angle: the same rotation in degrees, in [0, 90].
        subspace_similarity: :func:`subspace_similarity` of the current and previous top-k subspaces.
        subspace_similarity_to_first: the same against the reference subspace.
        polarity: signed rotation of the leading eigenvector in degrees (:class:`PolarityTracker`).
        polarity_flips: cumulative number of polarity sign changes.
        crossed: True when the eigenvalue order of the tracked vectors changed since the previous
            measurement (matched by overlap, see :func:`match_eigenvectors`); None at the first.
        crossings: cumulative number of measurements with ``crossed``.
    """

    rotation_cos: float | None = None
    rotation_angle: float | None = None
    subspace_similarity: float | None = None
    subspace_similarity_to_first: float | None = None
    polarity: float | None = None
    polarity_flips: int | None = None
    crossed: bool | None = None
    crossings: int | None = None


def match_eigenvectors(previous: Tensor, current: Tensor) -> tuple[int, ...]:
    """Which previous eigenvector each current one continues: ``match[j]`` is the column of ``previous``.

    The assignment maximises the total overlap ``sum_j |<previous[:, match[j]], current[:, j]>|``
    over all one-to-one assignments (exhaustive for up to 7 columns, greedy by largest overlap
    beyond), so that eigenvectors are followed by their direction, not by their eigenvalue order:
    when two eigenvalues swap order between measurements (a crossing), ``match`` is not the identity.

    Args:
        previous: ``(dim, k)`` unit eigenvectors of the previous measurement.
        current: ``(dim, k)`` unit eigenvectors of this measurement.

    Raises:
        ValueError: the blocks differ in shape, or an entry is NaN or inf.
    """
    if previous.shape != current.shape or previous.ndim != 2:
        raise ValueError(f"previous and current must be (dim, k) blocks of one shape, got {tuple(previous.shape)} and {tuple(current.shape)}")
    prev, cur = previous.detach(), current.detach()
    # each block over its largest entry (the same pass checks it is finite): the assignment does not
    # change, float64 sums stay finite
    return _match_overlap(_gram(prev, cur, _largest(prev, "previous"), _largest(cur, "current")).abs())


def _match_overlap(overlap: Tensor) -> tuple[int, ...]:
    """:func:`match_eigenvectors` from the ``(k, k)`` matrix ``|previous^T current|``."""
    k = overlap.shape[0]
    if k <= 7:
        best = max(itertools.permutations(range(k)), key=lambda perm: sum(float(overlap[perm[j], j]) for j in range(k)))
        return tuple(best)
    match = [-1] * k
    used: set[int] = set()
    for flat in torch.argsort(overlap.reshape(-1), descending=True).tolist():
        i, j = divmod(flat, k)
        if match[j] < 0 and i not in used:
            match[j] = i
            used.add(i)
    return tuple(match)


def _or_none(fn: Any) -> Any:
    """``fn()``, or None when it meets degenerate input (ValueError) or a numerical failure of a
    factorisation (LinAlgError): a tracker field left empty, never an exception in the training loop.
    """
    try:
        return fn()
    except (ValueError, torch.linalg.LinAlgError):
        return None


class EigenvectorTracker:
    """The eigenvectors of past measurements and what is computed against them.

    Holds the previous top-k eigenvectors ``(dim, k)``, the previous lambda_min and preconditioned
    eigenvectors ``(dim,)`` (warm starts), the reference top-k subspace (the first one measured at or
    after ``reference_step``; None disables it) and a :class:`PolarityTracker` of ``v_1``.
    :meth:`update` feeds a new measurement and returns its :class:`Rotation`.

    The state (:meth:`state_dict`) holds tensors and plain Python values only; the polarity
    reference, which is always ``+-v_1`` of the previous measurement, is stored as that sign
    instead of a second copy of the vector.
    """

    def __init__(self, reference_step: int | None = 0) -> None:
        self.reference_step = reference_step
        self.polarity = PolarityTracker(copy=False)  # its reference is +-v_1 of previous_top: no second copy
        self.reset()

    def reset(self) -> None:
        """Forget every vector and the polarity history."""
        self.crossings = 0
        self.previous_top: Tensor | None = None
        self.reference_top: Tensor | None = None
        self.previous_min: Tensor | None = None
        self.previous_preconditioned: Tensor | None = None
        self.previous_gaps: tuple[float, ...] | None = None
        self.previous_preconditioned_gap: float | None = None
        self.polarity.reset()

    def warm_start(self, dim: int, with_min: bool) -> Tensor | None:
        """The previous ``(dim, k [+ 1])`` block to start the next solve from, or None."""
        if self.previous_top is None or self.previous_top.shape[0] != dim:
            return None
        cols = [self.previous_top]
        if with_min and self.previous_min is not None:
            cols.append(self.previous_min.reshape(-1, 1))
        return torch.cat(cols, dim=1)

    def preconditioned_warm_start(self, dim: int) -> Tensor | None:
        """The previous ``(dim, 1)`` preconditioned eigenvector, or None."""
        v = self.previous_preconditioned
        return None if v is None or v.shape[0] != dim else v.reshape(-1, 1)

    def update(
        self, step: int, top: Tensor, minimum: Tensor | None = None, preconditioned: Tensor | None = None,
        k: int | None = None, crossed: bool | None = None, gaps: Sequence[float] = (),
        preconditioned_gap: float | None = None,
    ) -> Rotation:
        """Feed the eigenvectors of a new measurement at optimizer step ``step``.

        The previous eigenvectors are matched to the new ones by overlap
        (:func:`match_eigenvectors`): the rotation and the polarity are those of the previous
        vector that the new ``v_1`` continues, and a change of order counts as a crossing.

        Args:
            step: optimizer step of the measurement (decides the reference subspace).
            top: ``(dim, m)`` unit eigenvectors, descending eigenvalues (``m >= k``: extra columns
                are tracked for matching only).
            minimum: ``(dim,)`` eigenvector of lambda_min, or None.
            preconditioned: ``(dim,)`` top eigenvector of the preconditioned operator, or None
                (the previous one is then kept for the next warm start).
            k: the number of leading vectors whose subspace is compared (default: all ``m``).
            crossed: with a single tracked vector, an outside verdict that the previous ``v_1`` is still
                an eigenvector and the new ``v_1`` another one (see
                :func:`lightning_rpe.measure.previous_still_eigenvector`): counted as a crossing, with no
                rotation reported and the polarity continued from the new vector.
            gaps: the solver's gap estimates of the pairs (top, then lambda_min), kept for the
                eigenvalue rule of the next warm solve (:func:`lightning_rpe.measure.stopping_rule`);
                empty: none known.
            preconditioned_gap: the same for the preconditioned pair (None: the previous one is kept
                with the previous preconditioned vector).
        """
        self.previous_gaps = tuple(float(g) for g in gaps) or None
        if preconditioned is not None:
            self.previous_preconditioned_gap = preconditioned_gap
        k = top.shape[1] if k is None else k
        v1 = top[:, 0]
        outside_verdict = crossed
        rot_cos = rot_angle = sub_sim = sub_first = polarity = None
        flips = crossed = crossings = None
        prev = self.previous_top
        matched = None  # the previous vector the new v_1 continues, when it is not the previous v_1
        if outside_verdict and top.shape[1] == 1 and prev is not None and prev.shape == top.shape:
            self.crossings += 1
            _or_none(lambda: self.polarity.rebase(v1))  # the new v_1 is another eigenvector: continue from it
            self.previous_top = top
            self.previous_min = minimum
            if preconditioned is not None:
                self.previous_preconditioned = preconditioned
            flips = self.polarity.flips
            return Rotation(None, None, None, None, None, flips, True, self.crossings)
        # each block checked and orthonormalised once, implicitly (Q = block @ T) and one float64 row
        # range at a time: no float64 copy of a (dim, k) block (46 vectors at k = 5 before, measured)
        top = top.detach()
        top_k = top[:, :k]
        # k = 1: the principal angle between two lines is the angle between the vectors, taken from
        # the rotation's pair where it is the same pair (no TSQR passes over the vectors)
        line = k == 1
        b_top = None if line else _or_none(lambda: _Basis(top_k, "U"))
        if prev is not None and prev.shape == top.shape:
            prev = prev.detach().to(top)
            match = _or_none(lambda: match_eigenvectors(prev, top))
            if match is not None:
                matched = prev[:, match[0]] if match[0] != 0 else None
                crossed = match != tuple(range(len(match)))
                self.crossings += int(crossed)
                crossings = self.crossings
                j = match[0]
                pair = _or_none(lambda: _pair(top[:, 0].contiguous(), prev[:, j].contiguous()))
                if pair is not None:
                    rot_cos = _or_none(lambda: _abs_cos(*pair))
                    rot_angle = _or_none(lambda: _angle(pair[1], pair[0]))
                del pair
                if line and j == 0 and rot_angle is not None:
                    sub_sim = math.cos(math.radians(rot_angle))
            if line and sub_sim is None:
                sub_sim = _or_none(lambda: _line_similarity(top[:, 0], prev[:, 0]))
            elif b_top is not None:
                prev_k = prev[:, :k]
                sub_sim = _or_none(lambda: _similarity(_angles(b_top, _Basis(prev_k, "V"))))
        first = self.reference_top
        if self.reference_step is not None and (first is None or first.shape != top_k.shape) and step >= self.reference_step:
            # a copy when it is part of the block: a view would keep the whole (dim, m) block alive
            self.reference_top = first = top_k.clone() if k < top.shape[1] else top
        if first is not None and first.shape == top_k.shape:
            ref_k = first.to(top)
            if line:
                sub_first = _or_none(lambda: _line_similarity(top[:, 0], ref_k[:, 0]))
            elif b_top is not None:
                basis = b_top
                sub_first = _or_none(lambda: _similarity(_angles(basis, _Basis(ref_k, "V"))))
        ref = self.polarity._reference  # the stored tensor (its sign aside): no negated copy for a size check
        if ref is not None and ref.numel() != v1.numel():
            self.polarity.reset()
        if matched is not None and self.polarity._reference is not None:
            # v_1 now continues another eigenvector: follow that one (its sign fixed by the old reference);
            # a crossing among the others (v_2 and v_3 swapping) leaves v_1's displacement alone
            _or_none(lambda: self.polarity.rebase(matched))
        pstep = _or_none(lambda: self.polarity.update(v1))
        if pstep is not None:
            polarity, flips = float(pstep.polarity), int(pstep.flips)
        self.previous_top = top
        self.previous_min = minimum
        if preconditioned is not None:
            self.previous_preconditioned = preconditioned
        return Rotation(rot_cos, rot_angle, sub_sim, sub_first, polarity, flips, crossed, crossings)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors (on the CPU) and plain Python values; loads with ``torch.load(weights_only=True)``."""

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {
            "prev_top": cpu(self.previous_top),
            "first_top": cpu(self.reference_top),
            "prev_min": cpu(self.previous_min),
            "prev_pre": cpu(self.previous_preconditioned),
            "polarity": self._polarity_state(),
            "crossings": int(self.crossings),
            "gaps": None if self.previous_gaps is None else list(self.previous_gaps),
            "prev_pre_gap": self.previous_preconditioned_gap,
        }

    def _polarity_state(self) -> dict[str, Any]:
        state = {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in self.polarity.state_dict().items()}
        ref, top = state.get("reference"), self.previous_top
        if isinstance(ref, Tensor) and top is not None and ref.shape == top[:, 0].shape and ref.dtype == top.dtype:
            for sign in (1, -1):
                if torch.equal(ref, top[:, 0].cpu() * sign):
                    state["reference"] = None
                    state["reference_is_prev_top"] = sign
                    break
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        self.previous_top = state["prev_top"]
        self.reference_top = state.get("first_top")
        self.previous_min = state["prev_min"]
        self.previous_preconditioned = state["prev_pre"]
        polarity = dict(state["polarity"])
        sign = polarity.pop("reference_is_prev_top", None)
        if sign is not None:
            if self.previous_top is None:
                raise ValueError("state['polarity'] refers to prev_top, but state['prev_top'] is None")
            polarity["reference"] = self.previous_top[:, 0].clone() * sign
        self.polarity.load_state_dict(polarity)
        self.crossings = int(state.get("crossings", 0))
        gaps = state.get("gaps")
        self.previous_gaps = None if gaps is None else tuple(float(g) for g in gaps)
        pre_gap = state.get("prev_pre_gap")
        self.previous_preconditioned_gap = None if pre_gap is None else float(pre_gap)
