"""Hessian-vector products of a batch-size-weighted mean loss over probe batches.

:class:`HessianOperator` is the matrix

    H = d^2 L / d theta^2,    L(theta) = sum_b n_b L_b(theta) / sum_b n_b,

where ``L_b = loss_fn(model, batch_b)`` (a scalar, the mean loss of batch ``b``), ``n_b`` its batch
size and ``theta`` the flat vector of the trainable parameters (``requires_grad=True``, tied weights
counted once, in ``model.named_parameters()`` order). Products are computed as

    H V = reduce(sum_b n_b H_b V) / reduce(sum_b n_b)

with a user ``reduce`` hook (a SUM across processes, identity by default). Blocks are **columns**:
``matmat(V)`` takes ``V`` of shape ``(dim, b)``.

The operator is evaluated at a detached snapshot of the parameters taken at construction, in
``dtype`` (float32 or float64) whatever the model's dtype or an enclosing autocast; the model is
never modified (see :mod:`lightning_rpe.curvature._functional` for the product context). With
``copy_parameters=False`` the snapshot shares the parameters' storage where the dtype already
matches (one parameter vector less; a cast is always a copy), for a caller that measures while the
parameters stand still (the monitor, between optimizer steps): a product or gradient after a
shared parameter was changed in place (its autograd version counter moved, as an optimizer step
moves it) raises RuntimeError instead of being taken at the new values. Writes through ``.data``
bypass that counter and are not detected. On the ``"autograd"`` and ``"finite_difference"`` paths
the model is reparametrized with the snapshot (``torch.nn.utils.stateless._reparametrize_module``,
what ``torch.func.functional_call`` uses) for the whole forward **and** backward of an
evaluation, so that a recomputation inside backward (non-reentrant activation checkpointing) reads
the snapshot in the operator's dtype, not the live parameters. Every module's own parameter and
buffer objects are put back by identity afterwards (``_functional.reparametrized``): PyTorch's
utility leaves the snapshot in place of the parameters of a submodule registered twice.

The pad rows of ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``padding_idx`` (whose backward masks
the row) are left out: with ``M`` the 0/1 mask of
the other coordinates, every path computes ``M H M`` (:func:`frozen_padding_rows`). Double
backward gives that by itself; forward-mode AD and differences of the gradient would give the
non-symmetric ``M H``. When the weight is tied to an output layer (by module or in code) that row
trains, and PyTorch's gradient is then not the gradient of any loss: the operator still leaves
the row out, and warns (found from the autograd graph of one forward pass of probe batch 0, only
for models with such embeddings). Embeddings with ``sparse=True`` run with dense gradients during products.

Paths (``backend``)
-------------------
``"autograd"``: double backward. Per probe batch the loss and its gradient are built once with
``create_graph=True``; a product is then one backward pass through that gradient graph,
``H_b V = grad(g_b, theta, V)``, batched over the columns of a block with ``is_grads_batched=True``
(vmap over the backward; a loop over columns when that fails). The per-batch graphs are cached for
the operator's lifetime when they fit (``cache_graphs``), otherwise rebuilt for every product.

``"func"``: forward-over-reverse, ``torch.func.jvp(torch.func.grad(f), theta, v)``, batched over a
block with ``torch.func.vmap`` (``randomness="same"``). Note that ``vmap`` sits *outside* ``jvp``:
the composition ``jvp`` over ``vmap(vjp)`` (which ``torch.func.hessian = jacfwd(jacrev)`` uses) gives
silently wrong mixed second derivatives through LayerNorm and batch-statistics BatchNorm on the CPU
build of torch 2.13 (measured relative error 5e-2 and 1e-1 against a float64 dense Hessian), while
``vmap(jvp(grad))`` and double backward agree with finite differences to 1e-15. When ``torch.func``
cannot trace a loss (e.g. ``F.mse_loss`` raises "ZeroTensors are immutable" under ``jvp(grad)`` in
torch 2.13), an explicit ``backend="func"`` warns once and switches to ``"autograd"``.

``"finite_difference"``: central differences of first-order gradients at the snapshot,

    H v = (g(theta + eps v) - g(theta - eps v)) / (2 eps),   eps = s (1 + ||theta||) / ||v||,

2 gradients per probe batch and column (no double backward, no forward-mode AD: it measures
models whose second derivatives PyTorch gets wrong, see :mod:`lightning_rpe.curvature.verify`,
and models without any, e.g. ``torch.compile``). The relative step ``s`` (``fd_step``) defaults to
``FD_STEP[dtype]``: 3e-3 in float32, 1e-6 in float64, about the cube root of the unit roundoff
(balancing the O(eps^2) truncation error with the O(u / eps) rounding error); measured relative
error on the smooth benchmark workloads 2.3e-5 (float32) and 1e-10 (float64), see docs/models.md.
It assumes a smooth loss: where the gradient jumps (ReLU / max-pooling kinks within ``eps v``) a
difference is off by ``jump / (2 eps)``. Floating-point inputs are made to require grad (kept
when the loss accepts it) and, when the graph holds a reentrant checkpoint, the gradient is taken
with ``loss.backward()`` into the snapshot leaves: torch gives no gradient to the parameters
inside a reentrant checkpoint through ``autograd.grad`` or when no input requires grad.
:meth:`HessianOperator.with_backend` builds it from an existing operator (same snapshot).

``"auto"`` (default) never picks finite differences. It picks, per model and device (a fixed
rule, so runs are reproducible): ``"func"`` when the parameters are on CUDA and the model contains
a convolution, ``"autograd"`` otherwise; where ``torch.func`` cannot trace the loss it switches to
``"autograd"`` silently (the reason is kept in :attr:`HessianOperator.fallback_reason`). Both AD
paths (``func`` where it traces) agree with float64 finite differences at relative error <= 1e-6
on every architecture in the test suite (MLPs, CNN, BatchNorm in both policies, LayerNorm,
RMSNorm, MultiheadAttention, TransformerEncoderLayer, causal SDPA, tied, sparse and padded
embeddings, LSTM, non-reentrant checkpointing, spectral norm), so the rule is chosen for speed.
Neither can be right where PyTorch's own second derivatives are wrong (``weight_norm``, reentrant
checkpointing, custom Functions whose backward is not differentiable):
:func:`lightning_rpe.curvature.verify.verify_operator` detects those (docs/models.md).

The rule: double backward with cached graphs everywhere except convolutional models on CUDA, where
``vmap(jvp(grad))`` over a block is cheaper per column. The measured cost of one product per path
and device, in gradients, is in docs/benchmarks.md ("Cost of one product per AD path";
``python benchmarks/hvp_timing.py``).

``cache_graphs=None`` (auto): the bytes saved for backward while building the first batch's
gradient graph are counted (identity ``saved_tensors_hooks``, storages counted once, the parameter
leaves excluded), scaled to all probe batches by their sizes, and the graphs are cached when that
estimate is at most a quarter of the memory currently available on the parameters' device
after the solver's declared working vectors (:meth:`CurvatureOperator.reserve`): on CUDA the free
device memory plus what PyTorch's caching allocator holds unused, on CPU ``MemAvailable`` (free
plus reclaimable page cache), 1 GiB when unknown.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rpe.validation import check_choice

from ._functional import (
    BATCHNORM_POLICIES,
    DROPOUT_POLICIES,
    default_batch_size,
    graph_nodes,
    is_reentrant_checkpoint,
    map_tensors,
    module_causes,
    product_context,
    reparametrized,
    seed_batch,
)
from .operator import CurvatureOperator

__all__ = ["HessianOperator"]

BACKENDS = ("auto", "func", "autograd", "finite_difference")
DTYPES = (torch.float32, torch.float64)
# Relative step of the finite-difference backend: eps = FD_STEP[dtype] * (1 + ||theta||) / ||v||,
# about the cube root of the unit roundoff (the step that balances the O(eps^2) truncation error of
# a central difference with its O(u / eps) rounding error). Accuracy measured in docs/models.md.
FD_STEP = {torch.float32: 3e-3, torch.float64: 1e-6}
_CACHE_FRACTION = 0.25


def coarser(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether floating-point ``dtype`` has a larger unit roundoff than ``than`` (bfloat16 < float32 < float64)."""
    return torch.finfo(dtype).eps > torch.finfo(than).eps

_CACHE_FALLBACK_BYTES = 1 << 30
# Blocks on the double-backward path: the batched backward (``is_grads_batched``, a vmap over the
# backward) is faster per column than a loop of backward passes on CUDA and for small CPU models,
# slower for larger CPU models (measurements: docs/benchmarks.md, "Cost of one product per AD path").
_BATCHED_BACKWARD_MAX_DIM_CPU = 20_000


# (snapshot leaves, detached loss, gradients (with their graph when built for double backward),
#  the state dict the model read: held again around every backward through that graph)
_Graph = tuple[tuple[Tensor, ...], Tensor, tuple[Tensor | None, ...], dict[str, Tensor]]


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: lets ``functional_call`` reparametrize the whole model."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_loss_fn", loss_fn)  # never registered as a submodule

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.model, batch)  # type: ignore[operator]


def _auto_backend(model: nn.Module, device: torch.device) -> str:
    """The ``backend="auto"`` rule.

    ``"finite_difference"`` when the model holds a module whose second derivatives PyTorch gets
    wrong or lacks (``weight_norm``, ``nn.EmbeddingBag``, compiled modules; see
    :func:`~lightning_rpe.curvature._functional.module_causes`), else ``"func"`` for convolutional
    models on CUDA, else ``"autograd"``.
    """
    if any("double backward" in cause for cause in module_causes(model)):
        return "finite_difference"
    if device.type == "cuda" and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return "func"
    return "autograd"



def _available_bytes(device: torch.device) -> int:
    """Memory a cache may still take on ``device``, in bytes.

    CUDA: the device's free memory plus what PyTorch's caching allocator holds without using
    (``memory_reserved - memory_allocated``: reused before the device is asked for more). CPU:
    ``MemAvailable`` of ``/proc/meminfo`` (free pages plus reclaimable page cache), else the free
    physical pages (``os.sysconf``). 1 GiB when neither is known.
    """
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(free) + max(0, int(idle))
        except Exception:  # pragma: no cover - device query failed
            return _CACHE_FALLBACK_BYTES
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return _CACHE_FALLBACK_BYTES


class HessianOperator(CurvatureOperator):
    """Hessian of the batch-size-weighted mean of ``loss_fn(model, batch)`` over ``batches``.

    Args:
        model: the network; never modified (parameters, ``.grad``, buffers, train/eval flags and
            the global RNG are the same after every call).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` (mean loss of the batch). It may call
            ``model(x)`` or any method of the model (a LightningModule's own loss works).
        batches: the probe batches (non-empty sequence).
        dtype: computation dtype of products and of the flat vectors, ``torch.float32`` or
            ``torch.float64``.
        backend: ``"auto"``, ``"func"`` (forward-over-reverse), ``"autograd"`` (double backward) or
            ``"finite_difference"`` (central differences of first-order gradients, 2 gradients
            per product; see the module docstring). ``"auto"`` never picks finite differences.
        batchnorm: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics; running
            statistics untouched).
        dropout: ``"off"`` (every module evaluated as in ``model.eval()``: anything that reads
            ``self.training`` is off; normalization layers then follow ``batchnorm``) or ``"on"``
            (every module keeps its own flag; masks fixed per batch: the same in every product).
        reduce: SUM across processes applied to every product, to the total weight and to the
            loss/gradient sums; identity by default.
        batch_size_fn: ``n_b = batch_size_fn(batch)``; default: size of dim 0 of the first tensor
            in the batch.
        cache_graphs: keep the per-batch double-backward graphs for the operator's lifetime
            (``True``/``False``; ``None`` = when they fit, see the module docstring). Only used by
            the autograd path.
        fd_step: relative step ``s`` of the finite-difference backend,
            ``eps = s * (1 + ||theta||) / ||v||``; default ``FD_STEP[dtype]`` (3e-3 in float32,
            1e-6 in float64).
        copy_parameters: ``True`` (default): the snapshot is a copy, so the operator stays valid
            while the model trains on. ``False``: where the parameters (and frozen parameters)
            are already in ``dtype`` the snapshot is their storage, not a copy; products raise
            RuntimeError once a shared parameter was modified in place.

    Raises:
        ValueError: a bad argument (naming it and the accepted values), an empty ``batches``, a
            model without trainable parameters, a non-positive batch size.

    Attributes:
        parameters: live trainable parameters in vector order.
        names: their names in ``model.named_parameters()``.
        backend: the path actually in use (``"autograd"``, ``"func"`` or ``"finite_difference"``);
            ``fallback_reason``: why ``torch.func`` was abandoned (None if it was not).
        loss_dtype: the dtype of a loss that came back in lower precision than ``dtype`` (a
            model that computes its loss in float32 whatever its parameters' dtype, as Hugging Face
            models do), None otherwise: products then carry that precision, not ``dtype``'s.
        frozen_rows: ``(name, row)`` of the embedding pad rows (``padding_idx`` of an
            ``nn.Embedding`` / ``nn.EmbeddingBag``); products are taken over the other coordinates
            (these rows and columns of ``H`` are zero). ``padding_rows_read_elsewhere``: those of
            them whose weight the loss also reads elsewhere (tied to an output layer), warned about.
        batch_sizes: ``n_b`` per probe batch; ``total_weight``: ``reduce(sum_b n_b)``.
        cache_graphs: whether the autograd path keeps its graphs (decided at the first call when
            constructed with None); ``graph_bytes_estimate``: the estimate it was decided on.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        batches: Sequence[Any],
        *,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        batchnorm: str = "eval",
        dropout: str = "off",
        reduce: Callable[[Tensor], Tensor] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        cache_graphs: bool | None = None,
        fd_step: float | None = None,
        copy_parameters: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be a callable loss_fn(model, batch) -> scalar tensor")
        check_choice("HessianOperator", "dtype", dtype, DTYPES)
        check_choice("HessianOperator", "backend", backend, BACKENDS)
        check_choice("HessianOperator", "batchnorm", batchnorm, BATCHNORM_POLICIES)
        check_choice("HessianOperator", "dropout", dropout, DROPOUT_POLICIES)
        check_choice("HessianOperator", "cache_graphs", cache_graphs, (None, True, False))
        check_choice("HessianOperator", "copy_parameters", copy_parameters, (True, False))
        if fd_step is not None and (isinstance(fd_step, bool) or not (
                isinstance(fd_step, (int, float)) and math.isfinite(fd_step) and fd_step > 0)):
            raise ValueError(f"HessianOperator: fd_step must be a positive finite number or None; got {fd_step!r}")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ValueError(f"batch_size_fn must be a callable batch -> number of examples or None, got {batch_size_fn!r}")
        if reduce is not None and not callable(reduce):
            raise ValueError("reduce must be a callable Tensor -> Tensor (a SUM across processes) or None")
        if batches is None or isinstance(batches, (Tensor, str, bytes)):
            raise ValueError("batches must be a non-empty sequence of batches")
        batches = list(batches)
        if not batches:
            raise ValueError("batches must be a non-empty sequence of batches (got an empty list)")

        wrapper = _LossModule(model, loss_fn)
        trainable: list[tuple[str, nn.Parameter]] = []
        frozen: dict[str, Tensor] = {}
        for name, param in wrapper.named_parameters():  # deduplicated: tied weights once
            if param.requires_grad:
                trainable.append((name, param))
            else:
                frozen[name] = param
        if not trainable:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        device = trainable[0][1].device
        super().__init__(sum(p.numel() for _, p in trainable), dtype, device)

        self.parameters: tuple[nn.Parameter, ...] = tuple(p for _, p in trainable)
        self.names: tuple[str, ...] = tuple(n[len("model.") :] for n, _ in trainable)
        self._keys = tuple(n for n, _ in trainable)
        self._shapes = tuple(p.shape for p in self.parameters)
        self._numels = tuple(p.numel() for p in self.parameters)
        self._index = {id(p): i for i, p in enumerate(self.parameters)}
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.batchnorm = batchnorm
        self.dropout = dropout
        self.requested_backend = backend
        self.backend = _auto_backend(model, device) if backend == "auto" else backend
        if backend == "auto" and self.backend == "finite_difference":
            causes = [c for c in module_causes(model) if "double backward" in c]
            warnings.warn(
                "HessianOperator(backend='auto') uses finite differences of gradients: PyTorch's second "
                f"derivatives are wrong or missing for {'; '.join(causes)} (docs/models.md)",
                RuntimeWarning, stacklevel=2,
            )
        self.fd_step = float(fd_step) if fd_step is not None else FD_STEP[dtype]
        self._batch_size_fn = batch_size_fn
        self._track_inputs: bool | None = None  # finite-difference path: inputs require grad (decided once)
        self._plain_backward = False  # finite-difference path: loss.backward() (reentrant checkpointing)
        self.fallback_reason: str | None = None
        self.loss_dtype: torch.dtype | None = None
        self._reduce = reduce if reduce is not None else (lambda t: t)
        self._wrapper = wrapper
        self._cache_request = cache_graphs
        self.cache_graphs: bool | None = cache_graphs
        self.graph_bytes_estimate: int | None = None  # set when cache_graphs=None decides
        self._graphs: list[_Graph] | None = None
        # a fixed rule rather than a timing, so runs are reproducible bit for bit
        self._batched_backward_ok = device.type != "cpu" or self.dim <= _BATCHED_BACKWARD_MAX_DIM_CPU
        self._warned: set[str] = set()

        self.copy_parameters = bool(copy_parameters)
        with torch.no_grad(), torch.inference_mode(False):
            # Detached snapshot in the computation dtype: a copy, or (copy_parameters=False) the live
            # storage itself where the dtype already matches (a cast is always a copy)
            # (inference tensors keep no version counter: always copied)
            self._snapshot = tuple(
                p.detach().to(dtype=dtype, copy=self.copy_parameters or p.is_inference()) for p in self.parameters
            )
            self._frozen = {
                k: t.detach().to(dtype=dtype, copy=self.copy_parameters or t.is_inference())
                if t.is_floating_point() else t.detach().clone()
                for k, t in frozen.items()
            }
            self._buffers = {
                k: b.detach().to(dtype=dtype, copy=True) if b.is_floating_point() else b.detach().clone()
                for k, b in wrapper.named_buffers()
            }
            # ||theta||: only the finite-difference step uses it, computed there (fd_epsilon)
            self._theta_norm_value: float | None = None
        # version counters of the shared storages: a product after an in-place change raises
        self._versions = tuple(
            (p, p._version) for p, s in zip(self.parameters, self._snapshot) if s.data_ptr() == p.data_ptr()
        )
        size_fn = batch_size_fn if batch_size_fn is not None else default_batch_size
        sizes = []
        for i, batch in enumerate(batches):
            n = size_fn(batch)
            if isinstance(n, Tensor):
                n = n.item()
            if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
                raise ValueError(f"batch_size_fn must return a positive number; got {n!r} for batch {i}")
            sizes.append(float(n))
        self.batch_sizes: tuple[float, ...] = tuple(sizes)
        total = self._reduce(torch.tensor(sum(sizes), dtype=dtype, device=device))
        self.total_weight = float(total)
        if not math.isfinite(self.total_weight) or self.total_weight <= 0:
            raise ValueError(f"the reduced total batch weight must be positive, got {self.total_weight}")
        self.frozen_rows = frozen_padding_rows(model, self.parameters, self.names)
        self.padding_rows_read_elsewhere: tuple[tuple[str, int], ...] = ()
        if self.frozen_rows:
            self.padding_rows_read_elsewhere = self._read_elsewhere(self.frozen_rows)
        for name, row in self.padding_rows_read_elsewhere:
            warnings.warn(
                f"HessianOperator: padding row {row} of {name} is also read outside its padded embedding (a weight "
                "tied to an output layer, by module or in code): the embedding's backward masks that row's gradient "
                "while the other read trains it, so the optimizer's update is not the gradient of any loss and its "
                "Jacobian is not symmetric in that row. The Hessian is taken over the other coordinates (the row left "
                "out, the same on every path), so stability numbers are approximate for this model; build the "
                "embedding with padding_idx=None (the row trains through the tie anyway) to measure it exactly.",
                RuntimeWarning, stacklevel=2)
        self._mask: Tensor | None = None
        if self.frozen_rows:
            self._mask = padding_mask(self.frozen_rows, self.names, self._shapes, (0,) * len(self._shapes), dtype, device)

    # ------------------------------------------------------------------ flat vectors
    def flatten(self, tensors: Mapping[nn.Parameter, Tensor] | Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors (mapping param -> tensor, or a sequence in vector order) -> flat ``(dim,)``."""
        if isinstance(tensors, Mapping):
            by_id = {id(k): v for k, v in tensors.items()}
            missing = [self.names[i] for i, p in enumerate(self.parameters) if id(p) not in by_id]
            if missing:
                raise ValueError(f"tensors is missing entries for parameters {missing}")
            seq = [by_id[id(p)] for p in self.parameters]
        else:
            seq = list(tensors)
            if len(seq) != len(self.parameters):
                raise ValueError(f"tensors must hold {len(self.parameters)} tensors (one per parameter), got {len(seq)}")
        parts = []
        for name, shape, t in zip(self.names, self._shapes, seq):
            t = torch.as_tensor(t)
            if t.numel() != math.prod(shape):
                raise ValueError(f"tensor for parameter {name!r} has {t.numel()} elements, expected shape {tuple(shape)}")
            parts.append(t.detach().reshape(-1).to(dtype=self.dtype, device=self.device))
        return torch.cat(parts)

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Flat ``(dim,)`` -> list of tensors shaped like :attr:`parameters` (views of ``v``)."""
        if v.ndim != 1 or v.shape[0] != self.dim:
            raise ValueError(f"v must have shape ({self.dim},), got {tuple(v.shape)}")
        return [part.view(shape) for part, shape in zip(torch.split(v, list(self._numels)), self._shapes)]

    def _split_block(self, V: Tensor) -> tuple[Tensor, ...]:
        """``(dim, b)`` -> per-parameter ``(b, *shape)``."""
        b = V.shape[1]
        return tuple(
            part.T.reshape(b, *shape) for part, shape in zip(torch.split(V, list(self._numels), dim=0), self._shapes)
        )

    def _accumulate(self, out: Tensor, parts: Sequence[Tensor | None], scale: float, first: bool) -> None:
        """``out += scale * join(parts)`` (``out = ...`` when ``first``), written per parameter into the
        rows of ``out`` ``(dim, b)``: no joined copy and no scaled temporary of the whole block.
        """
        b = out.shape[1]
        offset = 0
        for part, numel in zip(parts, self._numels):
            dest = out[offset : offset + numel]
            offset += numel
            if part is None:
                if first:
                    dest.zero_()
                continue
            src = part.reshape(b, numel).T
            if first:
                torch.mul(src, scale, out=dest)
            else:
                dest.add_(src, alpha=scale)

    def _join_block(self, parts: Sequence[Tensor | None], b: int) -> Tensor:
        """Per-parameter ``(b, *shape)`` (None = zero) -> ``(dim, b)``."""
        cols = []
        for part, numel in zip(parts, self._numels):
            if part is None:
                cols.append(torch.zeros(numel, b, dtype=self.dtype, device=self.device))
            else:
                cols.append(part.reshape(b, numel).T.to(self.dtype))
        return torch.cat(cols, dim=0)

    # ------------------------------------------------------------------ evaluation
    def _prepare_batch(self, batch: Any, track: bool = False) -> Any:
        """Cast floating-point tensors to the operator's dtype; with ``track`` they also require grad.

        Tracked inputs are non-leaf copies (``detach().requires_grad_().clone()``), so a loss that
        writes into its inputs in place still works.
        """

        def cast(t: Tensor) -> Tensor:
            if t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)
            elif t.is_inference():
                t = t.clone()
            if track and t.is_floating_point():
                return t.detach().requires_grad_(True).clone()
            return t

        return map_tensors(batch, cast)

    def _state(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """Everything the wrapper reads: frozen parameters, fresh buffer copies and ``params``."""
        state: dict[str, Tensor] = dict(self._frozen)
        state.update({k: b.clone() for k, b in self._buffers.items()})
        state.update(zip(self._keys, params))
        return state

    @contextlib.contextmanager
    def _reparametrized(self, state: dict[str, Tensor]) -> Iterator[None]:
        """The model reads ``state`` (not its live tensors) until the context exits.

        Held for the whole forward **and** backward of an evaluation, so that a recomputation
        inside backward (activation checkpointing) sees the snapshot in the operator's dtype.
        """
        with reparametrized(self._wrapper, state):
            yield

    def _checked(self, loss: Any, index: int) -> Tensor:
        if not isinstance(loss, Tensor):
            raise ValueError(f"loss_fn must return a tensor; got {type(loss).__name__} for batch {index}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar; got shape {tuple(loss.shape)} for batch {index}")
        if loss.is_floating_point() and coarser(loss.dtype, self.dtype):
            self.loss_dtype = loss.dtype  # e.g. a Hugging Face loss, float32 whatever the parameters' dtype
        return loss.reshape(()).to(self.dtype)

    def _loss(self, params: Sequence[Tensor], batch: Any, index: int) -> Tensor:
        """Loss of one batch through ``functional_call`` (the ``torch.func`` path)."""
        with self._reparametrized(self._state(params)):
            loss = self._wrapper(batch)
        return self._checked(loss, index)

    def loss_graph(self, index: int = 0) -> Tensor:
        """Loss of probe batch ``index`` at the snapshot with its autograd graph (one forward, no backward).

        Evaluated in the product context with floating-point inputs requiring grad, so that
        every ``autograd.Function`` of the forward (reentrant checkpointing included) appears in
        the graph. For inspection (:func:`lightning_rpe.curvature.verify.known_causes`).
        """
        if not 0 <= index < len(self.batches):
            raise ValueError(f"HessianOperator.loss_graph: index must be in [0, {len(self.batches)}); got {index}")
        return self._loss_graph(index)[0]

    def _loss_graph(self, index: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        """:meth:`loss_graph` and the leaves (one per trainable parameter) its graph starts from."""
        self._check_unchanged()
        with product_context(self.model, self.batchnorm, self.dropout) as devices:
            seed_batch(index, devices)
            leaves = self._leaves()
            with self._reparametrized(self._state(leaves)):
                loss = self._checked(self._wrapper(self._prepare_batch(self.batches[index], track=True)), index)
        return loss, leaves

    def _read_elsewhere(self, rows: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
        """The pad rows whose weight the loss also reads outside that padded embedding.

        Such a row trains (an output projection tied by module or in code, ``F.linear(h,
        self.emb.weight)``, or an embedding call without ``padding_idx`` gives it a gradient) while
        the embedding's backward keeps masking its embedding-path gradient. Decided from the
        autograd graph of one forward pass of probe batch 0: a weight read elsewhere has a consumer
        other than an embedding backward with that ``padding_idx``.
        """
        loss, leaves = self._loss_graph(0)
        pad = dict(rows)
        leaf_name = {id(leaves[self.names.index(name)]): name for name in pad}
        elsewhere: set[str] = set()
        for node in graph_nodes(loss):
            for next_node, _ in node.next_functions:
                name = leaf_name.get(id(getattr(next_node, "variable", None)))
                if name is None:
                    continue
                padded = type(node).__name__ in ("EmbeddingBackward0", "EmbeddingBagBackward0")
                if not padded or getattr(node, "_saved_padding_idx", None) != pad[name]:
                    elsewhere.add(name)
        del loss
        return tuple((name, row) for name, row in rows if name in elsewhere)

    def _leaves(self, shift: Sequence[Tensor] | None = None, negative: bool = False) -> tuple[Tensor, ...]:
        """Fresh leaves requiring grad at the snapshot (``+ shift``, or ``- shift`` when ``negative``) in
        :attr:`dtype`; the snapshot is cast here, parameter by parameter, when its dtype differs (an
        operator made by :meth:`with_backend` with another dtype).
        """
        dtype = self.dtype
        if shift is None:
            return tuple(s.detach().to(dtype).requires_grad_(True) for s in self._snapshot)
        if negative:
            return tuple((s.detach().to(dtype) - d).detach().requires_grad_(True) for s, d in zip(self._snapshot, shift))
        return tuple((s.detach().to(dtype) + d).detach().requires_grad_(True) for s, d in zip(self._snapshot, shift))

    def _build_graph(
        self, index: int, create_graph: bool, count: list[int] | None = None, shift: Sequence[Tensor] | None = None,
        track: bool = False, negative: bool = False,
    ) -> _Graph:
        """Loss and gradient of batch ``index`` at the snapshot (+ ``shift``, or - ``shift`` when
        ``negative``), with its graph when ``create_graph``.
        """
        leaves = self._leaves(shift, negative)
        batch = self._prepare_batch(self.batches[index], track=track)
        state = self._state(leaves)
        hooks: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if count is not None:
            leaf_ptrs = {s.untyped_storage().data_ptr() for s in leaves}
            seen: set[int] = set()

            def pack(t: Tensor) -> Tensor:
                try:
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in leaf_ptrs and ptr not in seen:
                        seen.add(ptr)
                        count[0] += t.untyped_storage().nbytes()
                except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrappers)
                    count[0] += t.numel() * t.element_size()
                return t

            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with self._reparametrized(state), hooks:
            loss = self._checked(self._wrapper(batch), index)
            if not loss.requires_grad:
                self._warn_once("constant-loss", (
                    f"HessianOperator: the loss of batch {index} does not depend on the trainable parameters "
                    "(detached, computed under torch.no_grad, or from integer tensors): its gradient and Hessian "
                    "are zero; return the loss with its autograd graph"))
            if track and self._track_inputs is None and loss.grad_fn is not None:
                # decided at the first evaluation of the finite-difference path
                self._plain_backward = any(is_reentrant_checkpoint(n) for n in graph_nodes(loss))
            if track and self._plain_backward and not create_graph and loss.requires_grad:
                # torch.autograd.grad gives None to the parameters inside a reentrant checkpoint
                # (its backward accumulates into .grad): the fresh leaves collect them instead
                loss.backward()
                grads = tuple(None if x.grad is None else (x.grad.to_dense() if x.grad.is_sparse else x.grad) for x in leaves)
            else:
                grads = self._grad(loss, leaves, create_graph)
        return leaves, loss.detach(), grads, state

    @staticmethod
    def _grad(loss: Tensor, leaves: tuple[Tensor, ...], create_graph: bool) -> tuple[Tensor | None, ...]:
        if not loss.requires_grad:
            return tuple(None for _ in leaves)
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)
        # a gradient with a sparse layout (F.embedding(sparse=True) called directly) is made dense
        return tuple(None if g is None else (g.to_dense() if g.is_sparse else g) for g in grads)

    def _ensure_graphs(self, devices: list[int]) -> None:
        """Build and cache the per-batch gradient graphs when caching is on (or auto and they fit)."""
        if self._graphs is not None or self.cache_graphs is False:
            return
        graphs = []
        for i in range(len(self.batches)):
            seed_batch(i, devices)
            if i == 0 and self.cache_graphs is None:
                count = [0]
                graphs.append(self._build_graph(i, True, count))
                estimate = count[0] * sum(self.batch_sizes) / self.batch_sizes[0]
                # decided against the memory left after what the solver declared it will hold (reserve)
                free = max(0, _available_bytes(self.device) - self.reserved_bytes)
                self.cache_graphs = estimate <= _CACHE_FRACTION * free
                self.graph_bytes_estimate = int(estimate)
                if not self.cache_graphs:
                    return
            else:
                graphs.append(self._build_graph(i, True))
        self._graphs = graphs

    def _first_order(
        self, index: int, devices: list[int], shift: Sequence[Tensor] | None = None, negative: bool = False
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Loss and per-parameter gradients (None: zero) of batch ``index`` (first order only) at the
        snapshot ``+ shift`` (``- shift`` when ``negative``), for the finite-difference path.

        Floating-point inputs require grad (decided at the first call: kept when the loss accepts
        it), so that parameters inside a reentrant ``checkpoint`` whose inputs do not require grad
        still get their gradient (torch gives them None there). When the graph holds a reentrant
        checkpoint, the gradient is taken with ``loss.backward()`` into the fresh snapshot leaves:
        ``torch.autograd.grad`` returns None for the parameters inside it.
        """
        seed_batch(index, devices)
        if self._track_inputs is None:
            try:
                _, loss, grads, _ = self._build_graph(index, False, shift=shift, track=True, negative=negative)
                self._track_inputs = True
            except ValueError:
                raise
            except Exception:  # noqa: BLE001 - the loss rejects inputs that require grad (e.g. calls .numpy())
                self._track_inputs = False
                seed_batch(index, devices)
                _, loss, grads, _ = self._build_graph(index, False, shift=shift, negative=negative)
        else:
            _, loss, grads, _ = self._build_graph(index, False, shift=shift, track=self._track_inputs, negative=negative)
        return loss, [None if g is None else g.detach() for g in grads]

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Mean loss ``L`` and flat mean gradient ``dL/dtheta`` at the snapshot (both reduced).

        Counts no HVP. Raises ValueError naming the batch when a loss is non-scalar or non-finite
        (a non-finite loss is reported after the reduction, so that under DDP every process joins it
        and every process raises).
        """
        self._check_unchanged()
        with product_context(self.model, self.batchnorm, self.dropout) as devices:
            if self.backend == "autograd":
                self._ensure_graphs(devices)
            total = torch.empty(self.dim + 1, dtype=self.dtype, device=self.device)
            gradient = total[1:].unsqueeze(1)  # written per parameter, without a joined copy
            bad: tuple[int, float] | None = None
            for i, n in enumerate(self.batch_sizes):
                if self.backend == "finite_difference":
                    loss, parts = self._first_order(i, devices)
                else:
                    if self._graphs is not None:
                        _, loss, grads, _ = self._graphs[i]
                    else:
                        seed_batch(i, devices)
                        _, loss, grads, _ = self._build_graph(i, False)
                    parts = [None if g is None else g.detach() for g in grads]
                    del grads
                if bad is None and not bool(torch.isfinite(loss)):
                    bad = (i, float(loss))
                if i == 0:
                    total[0] = n * loss.to(self.dtype)
                else:
                    total[0] += n * loss.to(self.dtype)
                self._accumulate(gradient, parts, n, i == 0)
                del parts
            # reduce first, raise after: under DDP every process must take part in the collective
            total = self._reduce(total).div_(self.total_weight)
        if bad is not None:
            raise ValueError(f"loss_fn returned a non-finite loss ({bad[1]}) for batch {bad[0]}")
        if not math.isfinite(float(total[0])):
            raise ValueError(f"the reduced mean loss is non-finite ({float(total[0])}): a non-finite loss on another process")
        return float(total[0]), total[1:]

    # ------------------------------------------------------------------ other backends
    def with_backend(self, backend: str, *, dtype: torch.dtype | None = None, fd_step: float | None = None) -> HessianOperator:
        """The same operator (same snapshot, batches and settings) on another path, with ``n_hvp = 0``.

        Args:
            backend: one of ``BACKENDS`` (e.g. ``"finite_difference"`` after a failed
                verification).
            dtype: computation dtype of the new operator (default: this one's); the snapshot is
                cast from this operator's (exact when going from float32 to float64).
            fd_step: relative finite-difference step (default: ``FD_STEP`` of the new dtype, or
                this operator's own ``fd_step`` when the dtype is unchanged).

        Raises:
            ValueError: an unknown backend or dtype.
        """
        check_choice("HessianOperator.with_backend", "backend", backend, BACKENDS)
        dtype = self.dtype if dtype is None else dtype
        check_choice("HessianOperator.with_backend", "dtype", dtype, DTYPES)
        if fd_step is not None and (isinstance(fd_step, bool) or not (
                isinstance(fd_step, (int, float)) and math.isfinite(fd_step) and fd_step > 0)):
            raise ValueError(f"HessianOperator.with_backend: fd_step must be a positive finite number or None; got {fd_step!r}")
        other = copy.copy(self)
        other.n_hvp = 0
        other.requested_backend = backend
        other.backend = _auto_backend(self.model, self.device) if backend == "auto" else backend
        other.fallback_reason = None
        other.loss_dtype = None
        other._warned = set()
        other._graphs = None
        other.cache_graphs = self._cache_request
        other.graph_bytes_estimate = None
        other._track_inputs = None
        other._plain_backward = False
        other._batched_backward_ok = self.device.type != "cpu" or self.dim <= _BATCHED_BACKWARD_MAX_DIM_CPU
        if fd_step is not None:
            other.fd_step = float(fd_step)
        elif dtype != self.dtype:
            other.fd_step = FD_STEP[dtype]
        if dtype != self.dtype:
            other.dtype = dtype

            def cast(t: Tensor) -> Tensor:
                return t.to(dtype) if t.is_floating_point() else t

            # the snapshot stays in its own dtype and is cast per evaluation (_leaves): no second
            # parameter-sized copy beside this operator's (float32 -> float64 is exact either way)
            other._frozen = {k: cast(t) for k, t in self._frozen.items()}
            other._buffers = {k: cast(t) for k, t in self._buffers.items()}
            other._mask = None if self._mask is None else self._mask.to(dtype)
        return other

    # ------------------------------------------------------------------ products
    def _matmat(self, V: Tensor) -> Tensor:
        self._check_unchanged()
        if self._mask is not None:  # coordinates that never train: products over the others
            V = V * self._mask
        with product_context(self.model, self.batchnorm, self.dropout) as devices:
            if self.backend == "finite_difference":
                local = self._fd_products(V, devices)
            elif self.backend == "func":
                try:
                    local = self._func_products(V, devices)
                except ValueError:
                    raise
                except Exception as exc:  # torch.func cannot trace this loss: fall back for good
                    self.fallback_reason = f"{type(exc).__name__}: {str(exc)[:200]}"
                    if self.requested_backend == "func":
                        self._warn_once(
                            "func",
                            f"torch.func could not trace the loss ({self.fallback_reason}); "
                            "HessianOperator falls back to the double-backward (autograd) path",
                        )
                    self.backend = "autograd"
                    local = self._autograd_products(V, devices)
            else:
                local = self._autograd_products(V, devices)
            # in place: a product holds its output and the autograd results of one batch, no more
            out = self._reduce(local).div_(self.total_weight)
        return out if self._mask is None else out.mul_(self._mask)

    def _check_unchanged(self) -> None:
        """RuntimeError when a parameter whose storage the operator shares was changed in place since construction."""
        moved = [self.names[self._index[id(p)]] for p, version in self._versions if p._version != version]
        if moved:
            raise RuntimeError(
                f"HessianOperator(copy_parameters=False): parameters {moved[:3]} were modified in place after the "
                "operator was built, so its products would be taken at the new values; build a new operator "
                "(or pass copy_parameters=True to keep a snapshot)"
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def fd_epsilon(self, v_norm: float) -> float:
        """Finite-difference step for a direction of norm ``v_norm``: ``fd_step * (1 + ||theta||) / v_norm``.

        The perturbation ``eps * v`` then has norm ``fd_step * (1 + ||theta||)`` (a relative step
        of ``fd_step`` for models with ``||theta|| >> 1``).
        """
        return self.fd_step * (1.0 + self._theta_norm) / v_norm

    @property
    def _theta_norm(self) -> float:
        """``||theta||`` of the snapshot in float64, one parameter at a time (no flat copy), computed once."""
        if self._theta_norm_value is None:
            with torch.no_grad():
                total = sum(float(torch.linalg.vector_norm(s.detach(), dtype=torch.float64)) ** 2 for s in self._snapshot)
            self._theta_norm_value = math.sqrt(total)
        return self._theta_norm_value

    def _fd_products(self, V: Tensor, devices: list[int]) -> Tensor:
        """``H v = (g(theta + eps v) - g(theta - eps v)) / (2 eps)`` per column; 2 gradients per batch and column.

        Each gradient is written per parameter into the output column (with several batches into one
        scratch column first), so a column holds the step ``eps v`` and one gradient besides its output.
        """
        b = V.shape[1]
        out = torch.empty(self.dim, b, dtype=self.dtype, device=self.device)
        diff = None if len(self.batch_sizes) == 1 else torch.empty(self.dim, 1, dtype=self.dtype, device=self.device)
        for j in range(b):
            v = V[:, j]
            col = out[:, j : j + 1]
            v_norm = float(v.norm())
            if v_norm == 0.0 or not math.isfinite(v_norm):
                col[:, 0] = v * 0.0 if v_norm == 0.0 else float("nan")
                continue
            eps = self.fd_epsilon(v_norm)
            step = self.unflatten(eps * v)
            for i, n in enumerate(self.batch_sizes):
                target = col if diff is None else diff
                _, g_plus = self._first_order(i, devices, step)
                self._accumulate(target, g_plus, 1.0, True)
                del g_plus
                _, g_minus = self._first_order(i, devices, step, negative=True)
                self._accumulate(target, g_minus, -1.0, False)  # g(theta + eps v) - g(theta - eps v)
                del g_minus
                if diff is None:
                    col.mul_(n / (2.0 * eps))
                elif i == 0:
                    torch.mul(diff, n / (2.0 * eps), out=col)
                else:
                    col.add_(diff, alpha=n / (2.0 * eps))
            del step
        return out

    def _autograd_products(self, V: Tensor, devices: list[int]) -> Tensor:
        self._ensure_graphs(devices)
        b = V.shape[1]
        Vb = self._split_block(V)
        out = torch.empty(self.dim, b, dtype=self.dtype, device=self.device)
        cached = self._graphs is not None
        for i, n in enumerate(self.batch_sizes):
            if self._graphs is not None:
                leaves, _, grads, state = self._graphs[i]
            else:
                seed_batch(i, devices)
                leaves, _, grads, state = self._build_graph(i, True)
            with self._reparametrized(state):  # a recomputation inside backward sees the snapshot
                self._double_backward(out, leaves, grads, Vb, n, i == 0, retain=cached)
            del leaves, grads, state  # an uncached graph goes before the next batch's is built
        return out

    def _double_backward(
        self, out: Tensor, leaves: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], Vb: tuple[Tensor, ...],
        n: float, first: bool, retain: bool,
    ) -> None:
        """``out (+)= n * H_b V`` by one backward through the gradient graph (per column when not batched)."""
        b = out.shape[1]
        pairs = [(g, v) for g, v in zip(grads, Vb) if g is not None and g.requires_grad]
        if not pairs:
            if first:
                out.zero_()
            return
        outputs = [g for g, _ in pairs]
        if b > 1 and self._batched_backward_ok:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
                    hv = torch.autograd.grad(
                        outputs, leaves, [v for _, v in pairs], retain_graph=True, allow_unused=True,
                        is_grads_batched=True,
                    )
                self._accumulate(out, hv, n, first)
                return
            except Exception as exc:  # no batching rule for some backward: loop over the columns
                self._batched_backward_ok = False
                self._warn_once(
                    "batched",
                    f"batched double backward (is_grads_batched) failed ({str(exc)[:200]}); "
                    "HessianOperator multiplies the columns of a block one by one",
                )
        for j in range(b):
            hv = torch.autograd.grad(
                outputs, leaves, [v[j] for _, v in pairs], retain_graph=retain or j < b - 1, allow_unused=True
            )
            self._accumulate(out[:, j : j + 1], hv, n, first)
            del hv

    def _func_products(self, V: Tensor, devices: list[int]) -> Tensor:
        from torch.func import grad, jvp, vmap

        with warnings.catch_warnings():
            # torch.func's first use triggers torch's own torch.jit.script deprecation notice
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
            return self._func_products_impl(V, devices, grad, jvp, vmap)

    def _func_products_impl(self, V: Tensor, devices: list[int], grad: Callable, jvp: Callable, vmap: Callable) -> Tensor:
        b = V.shape[1]
        Vb = self._split_block(V)
        primals = tuple(s.detach().to(self.dtype) for s in self._snapshot)
        out = torch.empty(self.dim, b, dtype=self.dtype, device=self.device)
        for i, n in enumerate(self.batch_sizes):
            batch = self._prepare_batch(self.batches[i])

            def f(params: tuple[Tensor, ...], _batch: Any = batch, _i: int = i) -> Tensor:
                return self._loss(params, _batch, _i)

            def hvp(v: tuple[Tensor, ...], _f: Callable = f) -> tuple[Tensor, ...]:
                return jvp(grad(_f), (primals,), (v,))[1]

            seed_batch(i, devices)
            if b == 1:
                hv = tuple(h.unsqueeze(0) for h in hvp(tuple(v[0] for v in Vb)))
            else:
                hv = vmap(hvp, randomness="same")(Vb)
            self._accumulate(out, hv, n, i == 0)
            del hv
        return out


def padding_mask(
    rows: Sequence[tuple[str, int]], names: Sequence[str], shapes: Sequence[torch.Size], first_rows: Sequence[int],
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    """The 0/1 column ``M`` ``(dim, 1)`` of the flat vector: 0 on the coordinates of the pad ``rows``.

    ``shapes`` are the parameters' shapes as held here (a shard along dim 0 on a sharded model) and
    ``first_rows`` the global index of each one's first row held (0 unsharded); a pad row held by
    another process is not in this vector. Products are then taken as ``M H M``
    (:func:`frozen_padding_rows`).
    """
    parts = [torch.ones(math.prod(shape), dtype=dtype, device=device) for shape in shapes]
    for name, row in rows:
        i = names.index(name)
        local, width = row - first_rows[i], math.prod(shapes[i][1:])
        if 0 <= local < shapes[i][0]:
            parts[i][local * width:(local + 1) * width] = 0
    return torch.cat(parts).unsqueeze(1)


def frozen_padding_rows(
    model: nn.Module, parameters: Sequence[nn.Parameter], names: Sequence[str]
) -> tuple[tuple[str, int], ...]:
    """``(parameter name, row)`` of the embedding rows whose gradient is always zero.

    ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``padding_idx`` give the pad row a zero gradient
    (the backward masks it), so that row never trains. The forward still reads it, so the
    second derivatives of the loss in that row are not zero: double backward masks them again
    (it returns ``M H M``, ``M`` the 0/1 mask of the rows that train) while forward-mode AD and
    finite differences of the gradient give ``M H`` (not symmetric). The operator is therefore
    taken over the coordinates that train: ``M H M`` on every path. A weight tied to an output
    layer (by module or in code) is listed too: its pad row trains through the other read while the
    embedding's backward still masks that row's embedding gradient, so the gradient PyTorch returns
    is not the gradient of any loss and its Jacobian is not symmetric in that row (double backward
    gives one symmetric matrix, forward-mode AD and finite differences another, non-symmetric one);
    ``M H M`` is the one operator all paths agree on, and :class:`HessianOperator` warns
    (``padding_rows_read_elsewhere``).
    """
    index = {id(p): i for i, p in enumerate(parameters)}
    rows = []
    for module in model.modules():
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        pad = getattr(module, "padding_idx", None)
        weight = getattr(module, "weight", None)
        if pad is None or not isinstance(weight, nn.Parameter) or id(weight) not in index:
            continue
        rows.append((names[index[id(weight)]], int(pad) % weight.shape[0]))
    return tuple(rows)
