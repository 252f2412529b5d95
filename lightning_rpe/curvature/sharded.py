"""Hessian products of a sharded model (FSDP) by central finite differences of ordinary gradients.

Neither double backward nor ``torch.func`` works through a sharded module (FSDP2 ``fully_shard``:
"appears to not have been used in the graph" / "'Tensor' object has no attribute '_local_tensor'";
FSDP1: "FSDP does not support gradients of gradients"). An ordinary forward/backward does, so
:class:`ShardedHessianOperator` forms every product from two gradients:

    H v  ~=  ||v|| (g(theta + eps u) - g(theta - eps u)) / (2 eps),    u = v / ||v||,

with ``g`` the gradient of the batch-size-weighted mean loss

    L(theta) = sum_r sum_b n_{r,b} L_{r,b}(theta) / sum_r sum_b n_{r,b}

over the probe batches ``b`` of every data-parallel rank ``r`` (FSDP's reduce-scatter sums the
ranks' gradients; this operator undoes FSDP's averaging by the divide factor and divides by the
total weight). The error of the central difference is ``eps^2 ||T[u, u]|| / 6`` (T the third
derivative, Taylor's theorem) plus the rounding of the two gradients, about ``u_mach ||g|| / eps``;
the default steps (:data:`DEFAULT_EPS`) balance the two for unit directions on networks whose
weights are of order one.

Vectors are the **local shards**: on each process a vector is the concatenation, in
``module.parameters()`` order, of this process's shard of every trainable parameter (FSDP2: the
DTensor's ``to_local()``; FSDP1 with ``use_orig_params=True``: the parameter's sharded view). A
shard may be empty. :attr:`dim` is the local length (possibly 0), :attr:`total_dim` the global one.
Inner products are local sums all-reduced in float64 (:meth:`ShardedHessianOperator.inner`),
which is correct because every coordinate lives on exactly one process (Shard placements; a
Replicate placement would be counted once per replica, so it is refused).

Nothing observable changes: the local shards are overwritten in place under ``torch.no_grad()``
for each gradient and restored **bitwise** from a copy taken at construction (also when a product
raises); ``.grad`` of every parameter and the global RNG are as before.
Products are refused (ValueError on every process) while FSDP's gradient sync is off, i.e. in the
middle of gradient accumulation, whose unsharded partial gradients a backward would consume.
Each product runs the same collectives on every process (the number of forward/backward rounds is
the maximum number of probe batches over the ranks; a rank with fewer batches runs its first batch
again with weight 0), so all processes must call every method together.

Until the shared solvers (:mod:`.lanczos`, :mod:`.block`) reduce through ``operator.inner`` and
take their dimension limits from :attr:`total_dim`, use :func:`sharded_eigenpairs` (a Lanczos
solver with the same stopping rule, every reduction through the operator) for this operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_rpe.validation import check_choice

from ._functional import (
    BATCHNORM_POLICIES,
    DROPOUT_POLICIES,
    default_batch_size,
    product_context,
    seed_batch,
)
from .eigen import EigenResult
from .hessian import frozen_padding_rows, padding_mask
from .lanczos import NONFINITE_REASON, budget_reason, n_wanted, select_ritz
from .operator import CurvatureOperator

try:  # DTensor moved out of the private namespace in torch 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor, Replicate, Shard  # type: ignore[no-redef]
    from torch.distributed._tensor._utils import compute_local_shape_and_global_offset  # type: ignore[no-redef]

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch < 2.6
    FSDPModule = ()  # type: ignore[assignment,misc]
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp._flat_param import FlatParameter

__all__ = ["DEFAULT_EPS", "ShardedHessianOperator", "compute_dtypes", "sharded_eigenpairs", "sharding_kind"]

#: Default central-difference step for a unit direction, per parameter dtype. Near the optimum
#: ``(3 u_mach ||g|| / ||T||)^(1/3)`` for weights and curvatures of order one (u_mach = 1.1e-16
#: and 6.0e-8); measured errors on the test models are in docs/sharded.md.
DEFAULT_EPS: dict[torch.dtype, float] = {torch.float64: 1e-5, torch.float32: 1e-2}

_SUPPORTED_FSDP1 = (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP)



def sharding_kind(module: nn.Module) -> str:
    """``"fsdp2"`` (DTensor parameters of ``fully_shard``), ``"fsdp1"`` (a ``FullyShardedDataParallel``
    wrapper inside ``module``) or ``"none"`` (an ordinary module).
    """
    if any(isinstance(p, DTensor) for p in module.parameters()):
        return "fsdp2"
    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        return "fsdp1"
    return "none"


def _fsdp2_groups(module: nn.Module) -> list[Any]:
    """The FSDP2 parameter groups of every ``fully_shard``-ed submodule (private torch state)."""
    groups: list[Any] = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()  # type: ignore[attr-defined]
            groups.extend(getattr(state, "_fsdp_param_groups", []) or [])
    return groups


def compute_dtypes(module: nn.Module) -> set[torch.dtype]:
    """Dtypes in which FSDP mixed precision runs the forward/backward of ``module`` (empty: the
    parameters' own dtypes). FSDP2: ``MixedPrecisionPolicy.param_dtype``; FSDP1: ``MixedPrecision.param_dtype``.
    """
    out: set[torch.dtype] = set()
    for g in _fsdp2_groups(module):
        dtype = getattr(getattr(g, "mp_policy", None), "param_dtype", None)
        if dtype is not None:
            out.add(dtype)
    for m in module.modules():
        if isinstance(m, FullyShardedDataParallel):
            dtype = getattr(getattr(m, "mixed_precision", None), "param_dtype", None)
            if dtype is not None:
                out.add(dtype)
    return out


def _reshard(module: nn.Module) -> None:
    """Drop FSDP2's unsharded parameters (kept with ``reshard_after_backward=False`` or a root's
    ``reshard_after_forward=False``): the sharded DTensors become the registered parameters again,
    the next forward all-gathers the shards just written, and training never runs on a stale or
    perturbed unsharded copy. Not a collective. (FSDP1 reshards after every backward.)
    """
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class ShardedHessianOperator(CurvatureOperator):
    """Hessian of the mean probe loss of a sharded model, on local parameter shards.

    Args:
        module: the root module, sharded by FSDP2 ``fully_shard`` (every trainable parameter a
            DTensor with one ``Shard`` placement on a 1-D mesh) or containing an FSDP1
            ``FullyShardedDataParallel`` (``use_orig_params=True``, FULL_SHARD or SHARD_GRAD_OP).
            An ordinary module is treated as one process's whole model (no communication).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor`` (mean loss of the batch).
        batches: this process's probe batches (non-empty).
        dtype: dtype of the vectors (``torch.float32`` / ``torch.float64``); default float64 when
            every trainable parameter is float64 and computed in float64, else float32. Gradients are always computed in
            the parameters' own dtype.
        eps: central-difference step for a unit direction; default :data:`DEFAULT_EPS` of the
            lowest-precision dtype among the parameters and FSDP's mixed-precision ``param_dtype``.
        batchnorm, dropout: the policies of :class:`~lightning_rpe.curvature.HessianOperator`.
        batch_size_fn: ``n_b = batch_size_fn(batch)``; default size of dim 0 of the first tensor.

    Attributes:
        parameters: the trainable parameters in vector order; ``names``: their names.
        local_numels: elements of each parameter's local shard; ``dim``: their sum;
        ``total_dim``: the global dimension (sum of ``dim`` over the processes).
        kind: ``"fsdp2"``, ``"fsdp1"`` or ``"none"``; ``group``: the process group of the shards
            (None when not distributed); ``world_size``, ``rank``: in that group.
        total_weight: ``sum`` of the batch sizes over all processes; ``n_gradients``: gradient
            evaluations spent (two per product column, one per :meth:`loss_and_gradient`).

    Raises:
        ValueError: (naming the parameter) a bad argument, a parameter that is not sharded on
            every process (a Replicate placement, a multi-dimensional mesh, FSDP1 NO_SHARD/HYBRID or
            flat parameters), a parameter or mixed-precision compute dtype other than float32/float64,
            or a non-positive batch size.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        batches: Sequence[Any],
        *,
        dtype: torch.dtype | None = None,
        eps: float | None = None,
        batchnorm: str = "eval",
        dropout: str = "off",
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"ShardedHessianOperator: module must be a torch.nn.Module, got {type(module).__name__}")  # noqa: TRY004
        if not callable(loss_fn):
            raise ValueError("ShardedHessianOperator: loss_fn must be a callable loss_fn(module, batch) -> scalar tensor")  # noqa: TRY004
        check_choice("ShardedHessianOperator", "batchnorm", batchnorm, BATCHNORM_POLICIES)
        check_choice("ShardedHessianOperator", "dropout", dropout, DROPOUT_POLICIES)
        if batches is None or isinstance(batches, (Tensor, str, bytes)) or not list(batches):
            raise ValueError("ShardedHessianOperator: batches must be a non-empty sequence of batches")
        batches = list(batches)

        self.kind, self.group, self.compute_dtypes = self.check_module(module)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if dtype is None:
            dtype = torch.float64 if self.compute_dtypes == {torch.float64} else torch.float32
        check_choice("ShardedHessianOperator", "dtype", dtype, (torch.float32, torch.float64))
        coarsest = torch.float32 if torch.float32 in self.compute_dtypes else torch.float64
        if eps is None:
            eps = DEFAULT_EPS[coarsest]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"ShardedHessianOperator: eps must be a finite float > 0, got {eps!r}")

        self.parameters: tuple[nn.Parameter, ...] = tuple(p for _, p in named)
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        local = [self._local(p) for p in self.parameters]
        self.local_numels: tuple[int, ...] = tuple(t.numel() for t in local)
        device = local[0].device
        # the base class refuses dim 0, which an empty local shard legitimately has
        self.dim = sum(self.local_numels)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_hvp = 0
        self.n_gradients = 0
        self.eps = float(eps)
        self.module = module
        self.loss_fn = loss_fn
        self.batches = batches
        self.batchnorm = batchnorm
        self.dropout = dropout
        self.world_size = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        with torch.no_grad():
            self._snapshot = tuple(t.detach().clone() for t in local)
        self.frozen_rows = frozen_padding_rows(module, self.parameters, self.names)
        self._mask = self._padding_mask(local) if self.frozen_rows else None

        size_fn = batch_size_fn if batch_size_fn is not None else default_batch_size
        sizes = []
        for i, batch in enumerate(batches):
            n = size_fn(batch)
            n = n.item() if isinstance(n, Tensor) else n
            if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
                raise ValueError(f"ShardedHessianOperator: batch_size_fn must return a positive number; got {n!r} for batch {i}")
            sizes.append(float(n))
        self.batch_sizes: tuple[float, ...] = tuple(sizes)
        stats = self._all_reduce(torch.tensor([sum(sizes), self.dim], dtype=torch.float64, device=self.device))
        self.total_weight = float(stats[0])
        self.total_dim = int(stats[1])
        rounds = torch.tensor([len(batches)], dtype=torch.float64, device=self.device)
        if self.group is not None:
            dist.all_reduce(rounds, op=dist.ReduceOp.MAX, group=self.group)
        self._rounds = int(rounds[0])
        # FSDP averages the reduce-scattered gradients over the shard group: undo it
        self._grad_factor = float(self.world_size) if self.kind != "none" else 1.0
        if self.kind == "fsdp2":
            factors = {g.gradient_divide_factor for g in _fsdp2_groups(module) if getattr(g, "gradient_divide_factor", None)}
            if len(factors) > 1:
                raise ValueError(f"ShardedHessianOperator: FSDP modules use different gradient divide factors {sorted(factors)}")
            if factors:
                self._grad_factor = float(factors.pop())

    def _padding_mask(self, local: Sequence[Tensor]) -> Tensor:
        """0/1 column ``(dim, 1)`` that is 0 on this process's coordinates of the embedding pad rows.

        Finite differences of the gradient give ``M H`` on a padded embedding (its backward masks
        the pad row, its forward reads it: not symmetric); products are taken as ``M H M``, as
        :class:`~lightning_rpe.curvature.HessianOperator` does (:func:`frozen_padding_rows`). A
        DTensor shard (FSDP2) holds the rows from its global offset on; FSDP1's flat shards do not
        map to rows, so a padded embedding is refused there.
        """
        if self.kind == "fsdp1":
            raise ValueError(
                "ShardedHessianOperator: the padded embedding(s) "
                f"{', '.join(name for name, _ in self.frozen_rows)} cannot be measured under FSDP1 (the pad row, which "
                "never trains, must be left out and FSDP1's flat shards do not map to rows): use FSDP2 "
                "(ModelParallelStrategy / fully_shard) or padding_idx=None"
            )
        first_rows = [
            int(compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1][0])
            if isinstance(p, DTensor) else 0
            for p in self.parameters
        ]
        return padding_mask(self.frozen_rows, self.names, [t.shape for t in local], first_rows, self.dtype, self.device)

    # ------------------------------------------------------------------ sharding
    @staticmethod
    def check_module(module: nn.Module) -> tuple[str, Any, set[torch.dtype]]:
        """Validate a module for sharded finite differences (no collective, nothing built; FSDP2
        modules holding unsharded parameters are resharded first).

        Returns ``(kind, group, compute_dtypes)``: :func:`sharding_kind`, the process group of the
        shards (None for an ordinary module) and the dtypes the gradients are computed in.

        Raises:
            ValueError: the reasons listed in the class docstring (naming the parameter).
        """
        _reshard(module)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ShardedHessianOperator: module has no trainable parameters (requires_grad=True)")
        bad = [n for n, p in named if p.dtype not in DEFAULT_EPS]
        if bad:
            raise ValueError(
                f"ShardedHessianOperator: parameters must be float32 or float64 for finite differences; "
                f"{bad[0]!r} is {dict(named)[bad[0]].dtype}"
            )
        mixed = compute_dtypes(module)
        low = sorted(str(d) for d in mixed if d not in DEFAULT_EPS)
        if low:
            raise ValueError(
                f"ShardedHessianOperator: FSDP mixed precision computes in {', '.join(low)}; finite differences of "
                "half-precision gradients are accurate to about 1e-2 at best, so they are refused. Measure with "
                "param_dtype float32 or float64 (e.g. precision='32-true')"
            )
        dtypes = {p.dtype for _, p in named} | mixed
        kind = sharding_kind(module)
        return kind, ShardedHessianOperator._shard_group(kind, module, named), dtypes

    @staticmethod
    def _shard_group(kind: str, module: nn.Module, named: list[tuple[str, nn.Parameter]]) -> Any:
        """Validate the sharding and return the process group of the shards (None: one process)."""
        if kind == "fsdp2":
            meshes = set()
            for name, p in named:
                if not isinstance(p, DTensor):
                    raise ValueError(  # noqa: TRY004
                        f"ShardedHessianOperator: parameter {name!r} is not sharded (a plain tensor next to DTensors); "
                        "apply fully_shard to a module that holds every trainable parameter"
                    )
                if p.device_mesh.ndim != 1 or len(p.placements) != 1 or not isinstance(p.placements[0], Shard):
                    what = "Replicate" if any(isinstance(q, Replicate) for q in p.placements) else str(p.placements)
                    raise ValueError(
                        f"ShardedHessianOperator: parameter {name!r} has placements {what} on a {p.device_mesh.ndim}-D mesh; "
                        "only FSDP with one Shard placement on a 1-D data-parallel mesh is supported (not tensor "
                        "parallel, not HSDP / Replicate)"
                    )
                meshes.add(id(p.device_mesh))
            if len(meshes) > 1:
                raise ValueError("ShardedHessianOperator: the parameters are sharded over different device meshes")
            first = named[0][1]
            assert isinstance(first, DTensor)
            return first.device_mesh.get_group()
        if kind == "fsdp1":
            wrappers = [m for m in module.modules() if isinstance(m, FullyShardedDataParallel)]
            for w in wrappers:
                # one process replicates nothing (FSDP itself switches to NO_SHARD at world size 1)
                if w.sharding_strategy not in _SUPPORTED_FSDP1 and dist.get_world_size(w.process_group) > 1:
                    raise ValueError(
                        f"ShardedHessianOperator: FSDP sharding_strategy {w.sharding_strategy.name} is not supported; "
                        "use FULL_SHARD or SHARD_GRAD_OP (NO_SHARD and HYBRID replicate parameters)"
                    )
            for name, p in named:
                if isinstance(p, FlatParameter):
                    raise ValueError(  # noqa: TRY004
                        f"ShardedHessianOperator: parameter {name!r} is an FSDP flat parameter (with alignment padding); "
                        "wrap with use_orig_params=True (Lightning's FSDPStrategy default)"
                    )
            groups = {id(w.process_group): w.process_group for w in wrappers}
            if len(groups) > 1:
                raise ValueError("ShardedHessianOperator: the FSDP wrappers use different process groups")
            return next(iter(groups.values()))
        return None

    @staticmethod
    def _local(p: Tensor) -> Tensor:
        """This process's shard of ``p``, sharing its storage (in-place writes reach FSDP)."""
        if isinstance(p, DTensor):
            return p._local_tensor
        return p.data

    def _all_reduce(self, t: Tensor) -> Tensor:
        if self.group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    # ------------------------------------------------------------------ vectors
    def inner(self, X: Tensor, Y: Tensor, *, columnwise: bool = False) -> Tensor:
        """``X^T Y`` over the global parameter dimension: local products summed over the shards.

        ``X``: ``(dim, a)``, ``Y``: ``(dim, b)`` local blocks (flat ``(dim,)`` vectors are one
        column). Returns ``(a, b)``, or with ``columnwise=True`` (``a == b``) the ``(b,)`` dots of
        matching columns. Computed and all-reduced in float64 (a collective: every process must
        call it), returned in the inputs' promoted dtype on their device.
        """
        X, Y = self.inner_blocks(X, Y, columnwise)
        out_dtype = torch.promote_types(X.dtype, Y.dtype)
        X64, Y64 = X.to(torch.float64), Y.to(torch.float64)
        if columnwise:
            local = (X64 * Y64).sum(dim=0)
        else:
            local = X64.T @ Y64
        return self._all_reduce(local.contiguous()).to(out_dtype)

    def norms(self, X: Tensor) -> Tensor:
        """Global Euclidean norms of the columns of a local block ``(dim, b)`` (a collective)."""
        return self.inner(X, X, columnwise=True).clamp_min(0).sqrt()

    def random_block(self, b: int, generator: torch.Generator) -> Tensor:
        """Standard normal local block ``(dim, b)``: one draw from ``generator`` (the same on every
        process) seeds a private stream offset by the rank, so the shards are independent.
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        local = torch.Generator(device="cpu").manual_seed(seed + self.rank)
        return torch.randn(self.dim, b, generator=local, dtype=torch.float64).to(dtype=self.dtype, device=self.device)

    def flatten(self, tensors: Mapping[Tensor, Tensor] | Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors -> local flat ``(dim,)`` in :attr:`dtype`.

        ``tensors``: a mapping parameter -> tensor (e.g. an optimizer's per-parameter state such as
        Adam's ``exp_avg_sq``) or a sequence in vector order. Each tensor is a DTensor sharded like
        its parameter (its local shard is used) or a plain tensor holding this process's shard.

        Raises:
            ValueError: a missing parameter, a wrong count, or a local size that differs from the
                parameter's local shard (naming the parameter).
        """
        if isinstance(tensors, Mapping):
            by_id = {id(k): v for k, v in tensors.items()}
            missing = [n for n, p in zip(self.names, self.parameters) if id(p) not in by_id]
            if missing:
                raise ValueError(f"ShardedHessianOperator.flatten: tensors is missing entries for parameters {missing}")
            seq = [by_id[id(p)] for p in self.parameters]
        else:
            seq = list(tensors)
            if len(seq) != len(self.parameters):
                raise ValueError(
                    f"ShardedHessianOperator.flatten: tensors must hold {len(self.parameters)} tensors (one per "
                    f"parameter), got {len(seq)}"
                )
        parts = []
        for name, numel, t in zip(self.names, self.local_numels, seq):
            local = self._local(t)
            if local.numel() != numel:
                raise ValueError(
                    f"ShardedHessianOperator.flatten: tensor for parameter {name!r} has {local.numel()} local elements, "
                    f"the parameter's local shard has {numel}"
                )
            parts.append(local.detach().reshape(-1).to(dtype=self.dtype, device=self.device))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Local flat ``(dim,)`` -> per-parameter local shards (views of ``v``)."""
        if v.ndim != 1 or v.shape[0] != self.dim:
            raise ValueError(f"ShardedHessianOperator.unflatten: v must have shape ({self.dim},), got {tuple(v.shape)}")
        return [part.view_as(s) for part, s in zip(torch.split(v, list(self.local_numels)), self._snapshot)]

    def to_dense(self) -> Tensor:
        raise ValueError("ShardedHessianOperator.to_dense: the vectors are sharded; a dense matrix is not available")

    # ------------------------------------------------------------------ gradients
    def _reshard(self) -> None:
        _reshard(self.module)

    def _accumulating(self) -> bool:
        """True when FSDP's gradient sync is off somewhere (``no_sync`` / ``set_requires_gradient_sync(False)``)."""
        if self.kind == "fsdp2":
            return any(not getattr(g, "reduce_grads", True) for g in _fsdp2_groups(self.module))
        if self.kind == "fsdp1":
            return any(not getattr(m, "_sync_gradients", True) for m in self.module.modules()
                       if isinstance(m, FullyShardedDataParallel))
        return False

    def _gradient(self, devices: list[int]) -> tuple[Tensor, Tensor]:
        """Local shard of ``sum_r sum_b n_{r,b} grad L_{r,b}`` at the current weights, and the local
        weighted loss sum (float64). Every process runs ``self._rounds`` forward/backward rounds.
        """
        for p in self.parameters:
            p.grad = None
        self._reshard()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(self._rounds):
            index = i if i < len(self.batches) else 0
            weight = self.batch_sizes[index] if i < len(self.batches) else 0.0
            seed_batch(index, devices)
            loss = self.loss_fn(self.module, self.batches[index])
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"ShardedHessianOperator: loss_fn must return a scalar tensor; got "
                    f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)} for batch {index}"
                )
            loss = loss.reshape(())
            loss_sum += weight * loss.detach().to(torch.float64)
            (loss * weight).backward()
        self.n_gradients += 1
        parts = []
        for p, numel in zip(self.parameters, self.local_numels):
            g = p.grad
            if g is None:
                parts.append(torch.zeros(numel, dtype=torch.float64, device=self.device))
            else:
                g = g._local_tensor if isinstance(g, DTensor) else g
                parts.append(g.detach().reshape(-1).to(torch.float64))
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self.device)
        return flat * (self._grad_factor / self.total_weight), loss_sum

    def _write(self, direction: Tensor | None, scale: float) -> None:
        """Local shards <- snapshot + scale * direction (each in its own dtype); None restores them."""
        with torch.no_grad():
            if direction is None:
                for p, s in zip(self.parameters, self._snapshot):
                    self._local(p).copy_(s)
                return
            for p, s, d in zip(self.parameters, self._snapshot, torch.split(direction, list(self.local_numels))):
                target = self._local(p)
                target.copy_((s.to(torch.float64) + scale * d.view_as(s).to(torch.float64)).to(s.dtype))

    def _evaluate(self, fn: Callable[[list[int], Tensor], Tensor], local: Tensor | None = None) -> Tensor:
        """Run ``fn(devices, reduced)`` in the product context with ``.grad`` saved and
        the weights restored; ``reduced`` is ``local`` (float64) summed over the processes, in the same
        all-reduce that checks that no process's weights changed since construction.
        """
        unchanged = all(torch.equal(self._local(p), s) for p, s in zip(self.parameters, self._snapshot))
        head = torch.tensor([0.0 if unchanged else 1.0, float(self._accumulating())], dtype=torch.float64,
                            device=self.device)
        reduced = self._all_reduce(torch.cat([head, local.reshape(-1)]) if local is not None else head)
        if float(reduced[0]) > 0:
            raise ValueError(
                "ShardedHessianOperator: the parameters changed since the operator was built; build a new operator "
                "after each optimizer step"
            )
        if float(reduced[1]) > 0:
            raise ValueError(
                "ShardedHessianOperator: FSDP gradient sync is off (gradient accumulation without sync is in "
                "progress); the products' backward passes would consume the accumulated gradients. Measure after "
                "the optimizer step"
            )
        grads = [p.grad for p in self.parameters]
        try:
            with product_context(self.module, self.batchnorm, self.dropout) as devices:
                return fn(devices, reduced[2:])
        finally:
            self._write(None, 0.0)
            self._reshard()
            for p, g in zip(self.parameters, grads):
                p.grad = g

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Mean loss over all processes' probe batches and the local shard of its gradient ``(dim,)``.

        One gradient evaluation; a collective. The gradient is in :attr:`dtype`.
        """

        def run(devices: list[int], _: Tensor) -> Tensor:
            grad, loss = self._gradient(devices)
            total = self._all_reduce(loss.reshape(1).clone())
            return torch.cat([total / self.total_weight, grad])

        out = self._evaluate(run)
        return float(out[0]), out[1:].to(self.dtype)

    def _matmat(self, V: Tensor) -> Tensor:
        if self._mask is not None:  # coordinates that never train: products over the others (M H M)
            return self._products(V * self._mask) * self._mask
        return self._products(V)

    def _products(self, V: Tensor) -> Tensor:
        V64 = V.to(torch.float64)
        squares = (V64 * V64).sum(dim=0)  # the global norms come back from _evaluate's one all-reduce

        def run(devices: list[int], reduced: Tensor) -> Tensor:
            norms = reduced.clamp_min(0).sqrt()  # identical on every process: all take the same branches
            cols = []
            for j in range(V.shape[1]):
                nrm = float(norms[j])
                if nrm == 0.0 or not math.isfinite(nrm):
                    fill = 0.0 if nrm == 0.0 else math.nan
                    cols.append(torch.full((self.dim,), fill, dtype=torch.float64, device=self.device))
                    continue
                u = V64[:, j] / nrm
                self._write(u, self.eps)
                g_plus, _ = self._gradient(devices)
                self._write(u, -self.eps)
                g_minus, _ = self._gradient(devices)
                cols.append((g_plus - g_minus) * (nrm / (2.0 * self.eps)))
            return torch.stack(cols, dim=1) if cols else torch.zeros(self.dim, 0, dtype=torch.float64, device=self.device)

        out = self._evaluate(run, squares)
        # a non-finite entry on any process makes the product non-finite on all of them
        bad = self._all_reduce(torch.tensor([float(not bool(torch.isfinite(out).all()))], dtype=torch.float64,
                                            device=self.device))
        if float(bad[0]) > 0:
            out = torch.full_like(out, math.nan)
        return out.to(self.dtype)


# ---------------------------------------------------------------------------------------------
# STANDALONE SOLVER (temporary). The shared Lanczos / LOBPCG in lanczos.py / block.py reduce over
# the vector dimension with local matmuls and take their limits (Krylov dimension, k <= dim,
# breakdown scale) from ``operator.dim``; on sharded vectors both are wrong (partial sums, and a
# local ``dim`` that differs per process, which deadlocks the collectives). Once they reduce
# through ``operator.inner`` / ``operator.norms``, draw start vectors through the operator, and use
# ``getattr(operator, "total_dim", operator.dim)`` for every limit, this function should go and
# ``eigenpairs`` be used instead.
# ---------------------------------------------------------------------------------------------
def sharded_eigenpairs(
    operator: ShardedHessianOperator,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-3,
    max_hvp: int | None = None,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
) -> EigenResult:
    """Extreme eigenpairs of a :class:`ShardedHessianOperator` by Lanczos with full re-orthogonalisation.

    The algorithm and stopping rule of :func:`lightning_rpe.curvature.eigenpairs` (Lanczos branch):
    a Ritz pair has converged when ``|beta_m s_m| <= tol * max|theta|``. Every reduction over the
    parameter dimension goes through ``operator.inner`` (a collective), so all processes take the
    same decisions; eigenvectors are returned as **local shards** ``(dim, m)``.

    Args:
        operator: the sharded operator.
        k: number of largest (or smallest) pairs, ``1 <= k <= total_dim`` (``k + 1`` for "both").
        which: ``"largest"`` | ``"smallest"`` | ``"both"`` (k largest, then the smallest).
        tol: relative residual tolerance (finite, ``>= 0``; 0 runs to the budget).
        max_hvp: product budget; default ``min(total_dim, 50 + 30 n)`` with n pairs wanted.
        generator: source of the start vector (a draw from it seeds per-rank streams); default
            seeded with 0.
        init: optional ``(dim, j)`` local shards of previous eigenvectors; their sum (plus a 10%
            random part) starts the iteration.

    Returns:
        :class:`~lightning_rpe.curvature.EigenResult` (``eigenvectors`` local shards). A non-finite
        product gives NaN values and ``reason`` set instead of raising.

    Raises:
        ValueError: bad ``k``, ``which``, ``tol`` or ``max_hvp``.
    """
    if not isinstance(operator, ShardedHessianOperator):
        raise ValueError(f"sharded_eigenpairs: operator must be a ShardedHessianOperator, got {type(operator).__name__}")  # noqa: TRY004
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"sharded_eigenpairs: which must be one of ('largest', 'smallest', 'both'), got {which!r}")
    n = operator.total_dim
    nw = n_wanted(k, which) if isinstance(k, int) and not isinstance(k, bool) else -1
    if nw < 1 or nw > n:
        raise ValueError(f"sharded_eigenpairs: k must be an int with 1 <= k and {which!r} needing <= total_dim={n} pairs, got {k!r}")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"sharded_eigenpairs: tol must be a finite float >= 0, got {tol!r}")
    if max_hvp is None:
        max_hvp = min(n, 50 + 30 * nw)
    if isinstance(max_hvp, bool) or not isinstance(max_hvp, int) or max_hvp < nw:
        raise ValueError(f"sharded_eigenpairs: max_hvp must be an int >= {nw}, got {max_hvp!r}")
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    dim, dtype, device = operator.dim, operator.dtype, operator.device
    start_count = operator.n_hvp
    m_max = min(max_hvp, n)
    eps = torch.finfo(dtype).eps
    breakdown_tol = 100.0 * eps * math.sqrt(n)

    def unit(v: Tensor) -> tuple[Tensor, float]:
        nv = float(operator.norms(v)[0])
        return (v / nv if nv > 0 else v), nv

    with torch.no_grad():
        q = operator.random_block(1, generator)[:, 0]
        if init is not None:
            X = init.reshape(dim, -1).to(dtype=dtype, device=device)
            s = X.sum(dim=1)
            s, ns = unit(s)
            if ns > 0 and math.isfinite(ns):
                q = s + 0.1 * unit(q)[0]
        Q = torch.empty(m_max + 1, dim, dtype=dtype, device=device)
        Q[0] = unit(q)[0]
        alpha: list[float] = []
        beta: list[float] = []
        scale = 0.0
        exhausted = False
        theta = S = res = None
        for j in range(m_max):
            w = operator.matvec(Q[j])
            if not bool(torch.isfinite(w).all()):  # the operator makes this flag the same on every process
                nan = torch.full((nw,), math.nan, dtype=torch.float64)
                return EigenResult(nan, torch.full((dim, nw), math.nan, dtype=dtype, device=device), nan.clone(),
                                   torch.zeros(nw, dtype=torch.bool), operator.n_hvp - start_count, which, NONFINITE_REASON)
            basis = Q[: j + 1]
            h = operator.inner(basis.T, w)[:, 0]
            w = w - basis.T @ h
            h2 = operator.inner(basis.T, w)[:, 0]
            w = w - basis.T @ h2
            alpha.append(float(h[j]) + float(h2[j]))
            b = float(operator.norms(w)[0])
            T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
            if j > 0:
                off = torch.tensor(beta, dtype=torch.float64)
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
            theta, S = torch.linalg.eigh(T)
            scale = max(scale, float(theta.abs().max()))
            exhausted = j + 1 == n
            res = ((0.0 if exhausted else b) * S[-1, :]).abs()
            if theta.shape[0] >= nw:
                idx = select_ritz(theta, k, which)
                if tol > 0 and bool((res[idx] <= tol * float(theta.abs().max())).all()):
                    break
            if exhausted or j + 1 == m_max:
                break
            if b <= breakdown_tol * max(scale, torch.finfo(dtype).tiny):
                beta.append(0.0)  # invariant subspace: continue with a random orthogonal vector
                r = operator.random_block(1, generator)[:, 0]
                for _ in range(2):
                    r = r - basis.T @ operator.inner(basis.T, r)[:, 0]
                Q[j + 1] = unit(r)[0]
            else:
                beta.append(b)
                Q[j + 1] = w / b
        assert theta is not None and S is not None and res is not None
        if theta.shape[0] < nw:
            raise ValueError(f"sharded_eigenpairs: max_hvp={max_hvp} is too small to return {nw} eigenpairs")
        idx = select_ritz(theta, k, which)
        m = theta.shape[0]
        vectors = Q[:m].T @ S[:, idx].to(dtype=dtype, device=device)
        vectors = vectors / operator.norms(vectors).clamp_min(torch.finfo(dtype).tiny)
        residuals = res[idx].clone()
        threshold = torch.full((nw,), tol * float(theta.abs().max()), dtype=torch.float64)
        converged = torch.ones(nw, dtype=torch.bool) if exhausted else residuals <= threshold
        reason = None if bool(converged.all()) else budget_reason(max_hvp, residuals, threshold)
    return EigenResult(theta[idx].clone(), vectors, residuals, converged, operator.n_hvp - start_count, which, reason)
