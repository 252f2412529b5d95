"""Symmetric linear operators on flat parameter vectors.

Every curvature object in lightning-rpe is a :class:`CurvatureOperator`: a symmetric matrix ``A``
of size ``dim x dim`` that is only available through products. Blocks of vectors are stored as
**columns**: ``matmat(V)`` takes ``V`` of shape ``(dim, b)`` and returns ``A @ V`` of shape
``(dim, b)``. ``n_hvp`` counts matrix-vector products (a block of ``b`` columns counts ``b``).

Every reduction over the parameter dimension that a solver needs (dot products, norms, Gram
matrices) goes through :meth:`CurvatureOperator.inner`, so that an operator whose vectors are
sharded across processes can sum the local parts (an all-reduce) in that one place; no solver
assumes it holds a whole vector when it reduces.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CurvatureOperator", "DenseOperator", "PreconditionedOperator", "ScaledOperator"]


class CurvatureOperator:
    """Base class: a symmetric ``dim x dim`` operator with counted products.

    Subclasses implement :meth:`_matmat` on a ``(dim, b)`` block in :attr:`dtype` on
    :attr:`device`; the public :meth:`matvec` / :meth:`matmat` validate shapes, cast the input
    and count products.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        if dim <= 0:
            raise ValueError(f"operator dimension must be positive, got dim={dim}")
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_hvp = 0
        # parameter-sized vectors the solver running on this operator holds (set by eigenpairs and
        # trace before their first product); an operator that decides on caches by the free memory
        # should leave room for reserved_vectors * dim * itemsize bytes
        self.reserved_vectors = 0

    def reserve(self, n_vectors: int) -> None:
        """Record that a solver will hold ``n_vectors`` parameter-sized vectors (the largest request wins)."""
        self.reserved_vectors = max(self.reserved_vectors, int(n_vectors))

    @property
    def reserved_bytes(self) -> int:
        """``reserved_vectors * dim * itemsize``: memory to leave free for the solver."""
        return self.reserved_vectors * self.dim * torch.empty((), dtype=self.dtype).element_size()

    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for a block ``V`` of shape ``(dim, b)`` (columns are vectors)."""
        if V.ndim != 2 or V.shape[0] != self.dim:
            raise ValueError(f"matmat expects a block of shape (dim={self.dim}, b), got {tuple(V.shape)}")
        V = V.to(dtype=self.dtype, device=self.device)
        out = self._matmat(V)
        self.n_hvp += V.shape[1]
        return out

    def inner_blocks(self, X: Tensor, Y: Tensor, columnwise: bool) -> tuple[Tensor, Tensor]:
        """``X``, ``Y`` as ``(dim, a)``, ``(dim, b)`` blocks (a flat vector is one column), checked for :meth:`inner`.

        Raises:
            ValueError: not 1-D/2-D, different ``dim``, or ``columnwise`` with different widths.
        """
        name = f"{type(self).__name__}.inner"
        if X.ndim == 1:
            X = X.unsqueeze(1)
        if Y.ndim == 1:
            Y = Y.unsqueeze(1)
        if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"{name} expects blocks (dim, a) and (dim, b) with the same dim, got {tuple(X.shape)} and {tuple(Y.shape)}"
            )
        if columnwise and X.shape[1] != Y.shape[1]:
            raise ValueError(f"{name}(columnwise=True) needs blocks of equal width, got {tuple(X.shape)} and {tuple(Y.shape)}")
        return X, Y

    def inner(self, X: Tensor, Y: Tensor, *, columnwise: bool = False) -> Tensor:
        """Inner products over the parameter dimension: ``X^T Y``.

        ``X``: ``(dim, a)``, ``Y``: ``(dim, b)`` (flat ``(dim,)`` vectors are one column). Returns
        the ``(a, b)`` Gram block, or with ``columnwise=True`` (``a == b``) the ``(b,)`` dots of
        matching columns, ``sum_i X[i, j] Y[i, j]``. Same dtype and device as the inputs. The
        default is a plain local matmul; an operator on sharded vectors overrides it to sum the
        local products across processes. Raises ValueError on mismatched shapes.
        """
        X, Y = self.inner_blocks(X, Y, columnwise)
        if columnwise:
            # one dot per column: no (dim, b) temporary
            return torch.stack([torch.dot(X[:, j], Y[:, j]) for j in range(X.shape[1])]) if X.shape[1] else X.new_zeros(0)
        return X.T @ Y

    def norms(self, X: Tensor) -> Tensor:
        """Euclidean norms of the columns of ``X`` ``(dim, b)`` (or of a flat vector: shape ``(1,)``),
        through :meth:`inner`.

        A column whose sum of squares leaves the normal range of the dtype (below
        ``tiny / eps`` or above ``max * eps``: its squares underflowed, lost precision or
        overflowed, e.g. a loss scaled by 1e-25 in float32, where the norm came out 0 and a solver
        reported a breakdown with zero residuals) is measured again scaled by its largest entry:
        ``m * sqrt(sum (x / m)^2)`` (one column-sized temporary, on that rare path only).
        """
        sq = self.inner(X, X, columnwise=True)
        info = torch.finfo(sq.dtype) if sq.is_floating_point() else None
        if info is None or sq.numel() == 0:
            return sq.clamp_min(0).sqrt()
        low, high = info.tiny / info.eps, info.max * info.eps
        bad = ~((sq >= low) & (sq <= high))  # NaN included
        if not bool(bad.any()):
            return sq.clamp_min(0).sqrt()
        X2 = X.unsqueeze(1) if X.ndim == 1 else X
        out = sq.clamp_min(0).sqrt()
        for j in torch.nonzero(bad).flatten().tolist():
            col = X2[:, j]
            m = col.abs().amax()
            if not bool(torch.isfinite(m)) or float(m) == 0.0:  # a non-finite entry, or a zero column
                out[j] = m
                continue
            scaled = col / m
            out[j] = m * self.inner(scaled, scaled, columnwise=True)[0].clamp_min(0).sqrt()
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for a flat vector ``v`` of shape ``(dim,)``."""
        if v.ndim != 1 or v.shape[0] != self.dim:
            raise ValueError(f"matvec expects a vector of shape ({self.dim},), got {tuple(v.shape)}")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def to_dense(self) -> Tensor:
        """Materialise the operator column by column (``dim`` products; for tests and tiny models)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return self.matmat(eye)


class DenseOperator(CurvatureOperator):
    """A symmetric matrix given explicitly, wrapped as an operator (tests, known spectra)."""

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or not matrix.is_floating_point():
            what = type(matrix).__name__ if not isinstance(matrix, Tensor) else f"a {matrix.dtype} tensor"
            raise ValueError(f"DenseOperator: matrix must be a real floating-point torch.Tensor, got {what}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V


class PreconditionedOperator(CurvatureOperator):
    """``P^-1/2 A P^-1/2`` for a positive diagonal ``P`` given as a flat tensor of length ``dim``.

    Its eigenvalues are those of ``P^-1 A`` (similar matrices). An eigenvector ``u`` of this
    operator maps to the direction ``P^-1/2 u`` in parameter space.
    """

    def __init__(self, operator: CurvatureOperator, diagonal: Tensor) -> None:
        if not isinstance(operator, CurvatureOperator):
            raise ValueError(f"PreconditionedOperator: operator must be a CurvatureOperator, got {type(operator).__name__}")
        if not isinstance(diagonal, Tensor):
            raise ValueError(f"PreconditionedOperator: diagonal must be a flat torch.Tensor of length dim, got {type(diagonal).__name__}")
        if diagonal.ndim != 1 or diagonal.shape[0] != operator.dim:
            raise ValueError(
                f"diagonal must be a flat tensor of length dim={operator.dim}, got shape {tuple(diagonal.shape)}"
            )
        if not bool(torch.isfinite(diagonal).all()) or bool((diagonal <= 0).any()):
            raise ValueError("diagonal must be finite and strictly positive")
        super().__init__(operator.dim, operator.dtype, operator.device)
        self.operator = operator
        self.inv_sqrt = diagonal.to(dtype=operator.dtype, device=operator.device).rsqrt()

    def reserve(self, n_vectors: int) -> None:
        """Reserves on this operator and on the wrapped one (which holds the caches)."""
        super().reserve(n_vectors)
        self.operator.reserve(n_vectors)

    def inner(self, X: Tensor, Y: Tensor, *, columnwise: bool = False) -> Tensor:
        """The wrapped operator's inner product (same vector layout)."""
        return self.operator.inner(X, Y, columnwise=columnwise)

    def _matmat(self, V: Tensor) -> Tensor:
        scale = self.inv_sqrt.unsqueeze(1)
        return scale * self.operator.matmat(scale * V)


class ScaledOperator(CurvatureOperator):
    """``D^1/2 A D^1/2`` for a non-negative diagonal ``D`` given as a flat tensor of length ``dim``.

    Zero entries are allowed: those coordinates drop out (their rows and columns are zero). With
    ``D = lr / K`` per coordinate (K the dimensionless threshold of the update rule) the largest
    eigenvalue is the stability ratio of an optimizer with per-coordinate learning rates; with
    ``D = P^-1`` it is the preconditioned operator of the Adam family (see
    :func:`lightning_rpe.stability.step_scales`).

    Raises:
        ValueError: ``diagonal`` is not a flat tensor of length ``dim``, or has negative or
            non-finite entries.
    """

    def __init__(self, operator: CurvatureOperator, diagonal: Tensor) -> None:
        if not isinstance(operator, CurvatureOperator):
            raise ValueError(f"ScaledOperator: operator must be a CurvatureOperator, got {type(operator).__name__}")
        if not isinstance(diagonal, Tensor):
            raise ValueError(f"ScaledOperator: diagonal must be a flat torch.Tensor of length dim, got {type(diagonal).__name__}")
        if diagonal.ndim != 1 or diagonal.shape[0] != operator.dim:
            raise ValueError(
                f"diagonal must be a flat tensor of length dim={operator.dim}, got shape {tuple(diagonal.shape)}"
            )
        if not bool(torch.isfinite(diagonal).all()) or bool((diagonal < 0).any()):
            raise ValueError("diagonal must be finite and non-negative")
        super().__init__(operator.dim, operator.dtype, operator.device)
        self.operator = operator
        self.sqrt = diagonal.to(dtype=operator.dtype, device=operator.device).sqrt()

    def inner(self, X: Tensor, Y: Tensor, *, columnwise: bool = False) -> Tensor:
        """The wrapped operator's inner product (same vector layout)."""
        return self.operator.inner(X, Y, columnwise=columnwise)

    def _matmat(self, V: Tensor) -> Tensor:
        scale = self.sqrt.unsqueeze(1)
        return scale * self.operator.matmat(scale * V)
