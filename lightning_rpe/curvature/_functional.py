"""Private helpers for :mod:`lightning_rpe.curvature.hessian`: batch traversal and the product context.

Everything here is pure PyTorch. The product context (:func:`product_context`) is where the
"nothing observable changes" guarantees and the "kernels known to be correct" choices live:

* the dropout policy is applied through the ``training`` flag itself, not by module type:
  ``dropout="off"`` evaluates **every** module as in ``model.eval()`` (so ``nn.Dropout``,
  ``F.dropout(x, p, self.training)``, ``F.scaled_dot_product_attention(dropout_p=p if
  self.training else 0)``, DropPath / stochastic depth, attention dropout of Hugging Face models,
  activation checkpointing guarded by ``self.training`` and anything else that reads the flag are
  all off); ``dropout="on"`` keeps every module's own flag (the loss the training step
  differentiates; masks are fixed per probe batch by the forked RNG below);
* normalization layers (``_NormBase``: BatchNorm*, SyncBatchNorm, InstanceNorm*) are then set by
  the ``batchnorm`` policy: ``"eval"`` runs them in eval mode (running statistics), ``"batch"``
  runs them in training mode with ``track_running_stats`` temporarily off, so they normalise with
  batch statistics and update nothing; every module's flag is restored exactly in ``finally``;
* ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``sparse=True`` run with ``sparse=False`` (the
  function does not depend on the layout of its gradient; dense gradients flatten and have a
  double backward), restored afterwards;
* the global CPU (and initialised CUDA) RNG is forked, and every probe batch gets its own fixed
  seed, so dropout masks (and any other randomness in the loss) are the same in every product;
* autocast is disabled (CPU and CUDA), so products run in the operator's dtype;
* scaled-dot-product attention is forced onto the math backend (the fused CPU/CUDA kernels
  implement neither forward-mode AD nor double backward), and the ``nn.MultiheadAttention`` /
  ``nn.TransformerEncoderLayer`` fast paths (fused kernels, nested tensors) are disabled;
* TF32 is disabled for CUDA matmuls and cuDNN convolutions (float32 means IEEE float32; TF32
  would limit products to about 1e-3 relative accuracy), and restored afterwards;
* gradient mode is enabled, and inference mode is switched off, so products work from inside
  ``torch.no_grad()`` / ``torch.inference_mode()`` (e.g. a validation hook).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.stateless import _reparametrize_module

__all__ = [
    "BATCHNORM_POLICIES",
    "DROPOUT_POLICIES",
    "default_batch_size",
    "graph_nodes",
    "is_reentrant_checkpoint",
    "map_tensors",
    "product_context",
    "reparametrized",
    "rng_devices",
]

BATCHNORM_POLICIES = ("eval", "batch")
DROPOUT_POLICIES = ("off", "on")

# Seeds for the per-batch RNG inside products: fixed so that the operator is deterministic.
_SEED_BASE = 0x5EED_0000


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping):
        items: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        return None
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def default_batch_size(batch: Any) -> int:
    """Size of dim 0 of the first tensor found in ``batch`` (tensor, tuple/list, dict; nested).

    A 0-dim tensor counts as one example.
    """
    tensor = _first_tensor(batch)
    if tensor is None:
        raise ValueError(
            "cannot infer the batch size: no tensor found in the batch; pass batch_size_fn=callable(batch) -> int"
        )
    return 1 if tensor.ndim == 0 else int(tensor.shape[0])


def map_tensors(obj: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict (namedtuples keep their type)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        try:
            return type(obj)({k: map_tensors(v, fn) for k, v in obj.items()})  # type: ignore[call-arg]
        except TypeError:
            return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def graph_nodes(loss: Tensor, limit: int = 1_000_000) -> Iterator[Any]:
    """The autograd nodes reachable from ``loss.grad_fn`` (each once, depth first, at most ``limit``)."""
    stack: list[Any] = [loss.grad_fn]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(next_node for next_node, _ in getattr(node, "next_functions", ()))


def is_reentrant_checkpoint(node: Any) -> bool:
    """Whether an autograd node is the backward of ``torch.utils.checkpoint(..., use_reentrant=True)``."""
    return isinstance(node, torch.autograd.function.BackwardCFunction) and type(node).__name__ == "CheckpointFunctionBackward"


def rng_devices() -> list[int]:
    """CUDA devices whose RNG state must be forked (only when CUDA is already initialised)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def seed_batch(index: int, cuda_devices: list[int]) -> None:
    """Seed the (forked) CPU and CUDA generators for probe batch ``index``."""
    seed = _SEED_BASE + int(index)
    torch.random.default_generator.manual_seed(seed)
    for device in cuda_devices:
        torch.cuda.default_generators[device].manual_seed(seed)


def _is_norm(module: nn.Module) -> bool:
    # _NormBase covers BatchNorm*, SyncBatchNorm, LazyBatchNorm*, InstanceNorm*.
    return isinstance(module, nn.modules.batchnorm._NormBase)


@contextlib.contextmanager
def product_context(model: nn.Module, batchnorm: str, dropout: str) -> Iterator[list[int]]:
    """Context for evaluating losses and products; yields the CUDA devices whose RNG is forked."""
    modules = list(model.modules())
    flags = [(module, module.training) for module in modules]
    norms = [(module, module.track_running_stats) for module in modules if _is_norm(module)]
    sparse = [(module, module.sparse) for module in modules if _is_sparse_embedding(module)]
    fastpath_get = getattr(torch.backends.mha, "get_fastpath_enabled", None)
    fastpath_set = getattr(torch.backends.mha, "set_fastpath_enabled", None)
    fastpath = fastpath_get() if fastpath_get is not None else None
    devices = rng_devices()
    tf32 = _get_tf32()
    try:
        if dropout == "off":
            for module in modules:  # as in model.eval(): every reader of `training` sees False
                module.training = False
        for module, _ in norms:
            if batchnorm == "eval":
                module.training = False
            else:
                module.training = True
                module.track_running_stats = False  # type: ignore[assignment]
        for module, _ in sparse:
            module.sparse = False  # type: ignore[assignment]
        if fastpath_set is not None:
            fastpath_set(False)
        if tf32 is not None:
            _set_tf32((False, False))
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            stack.enter_context(_math_sdpa())
            stack.enter_context(torch.random.fork_rng(devices=devices))
            yield devices
    finally:
        if tf32 is not None:
            _set_tf32(tf32)
        if fastpath_set is not None and fastpath is not None:
            fastpath_set(fastpath)
        for module, was_sparse in sparse:
            module.sparse = was_sparse
        for module, track in norms:
            module.track_running_stats = track
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def reparametrized(module: nn.Module, state: Mapping[str, Tensor]) -> Iterator[None]:
    """``module`` reads the tensors of ``state`` (names as in ``named_parameters``) until exit.

    ``torch.nn.utils.stateless._reparametrize_module`` with ``tie_weights=True`` (what
    ``torch.func.functional_call`` does), so a parameter registered under several names takes the
    one value given. On exit every module's own parameter and buffer **objects** are put back, by
    identity, whatever the stateless utility restored: with a submodule registered twice
    (``nn.ModuleList([block] * 3)``, ``self.alias = self.body``) it swaps the same attribute once
    per name and restores them in the same order, which leaves the snapshot tensor in place of the
    ``nn.Parameter`` (torch 2.4-2.13): the optimizer would keep stepping the old objects, which
    then get no gradients, and training would silently change.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        with _reparametrize_module(module, dict(state), tie_weights=True):
            yield
    finally:
        for m, parameters, buffers in saved:
            for name, parameter in parameters.items():
                if m._parameters.get(name) is not parameter:
                    m._parameters[name] = parameter
            for name, buffer in buffers.items():
                if m._buffers.get(name) is not buffer:
                    m._buffers[name] = buffer


def _is_sparse_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and bool(getattr(module, "sparse", False))


def _get_tf32() -> tuple[bool, bool] | None:
    if not torch.cuda.is_available():
        return None
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    except (AttributeError, RuntimeError):  # pragma: no cover - flag API changed
        return None


def _set_tf32(flags: tuple[bool, bool]) -> None:
    try:
        torch.backends.cuda.matmul.allow_tf32 = flags[0]
        torch.backends.cudnn.allow_tf32 = flags[1]
    except (AttributeError, RuntimeError):  # pragma: no cover - flag API changed
        pass


def _math_sdpa() -> contextlib.AbstractContextManager[Any]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def module_causes(model: nn.Module) -> list[str]:
    """Modules of ``model`` whose second derivatives PyTorch gets wrong or lacks, one sentence each.

    Compiled modules and ``nn.EmbeddingBag`` (no double backward), parametrized tensors
    (``weight_norm``'s double backward is wrong; other parametrizations are listed because they run
    user code in the forward) and the old ``weight_norm`` / ``spectral_norm`` forward pre-hooks.
    A sentence that contains ``"double backward"`` names a cause known to give wrong or no
    second derivatives.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        where = name or "<model>"
        if type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None:
            found.append(f"{where}: compiled with torch.compile (no double backward)")
        if isinstance(module, nn.EmbeddingBag):
            found.append(f"{where}: nn.EmbeddingBag (no double backward in torch)")
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                kinds = ", ".join(type(p).__name__ for p in plist)
                torch_weight_norm = any(
                    type(p).__name__ == "_WeightNorm" and type(p).__module__ == "torch.nn.utils.parametrizations"
                    for p in plist
                )
                note = " (weight_norm: wrong double backward)" if torch_weight_norm else ""
                found.append(f"{where}: parametrization {kinds} of {tensor_name!r}{note}")
        for hook in module._forward_pre_hooks.values():
            kind = type(hook).__name__
            if kind == "WeightNorm":
                found.append(f"{where}: torch.nn.utils.weight_norm hook on {hook.name!r} (wrong double backward)")
            elif kind == "SpectralNorm":
                found.append(f"{where}: torch.nn.utils.spectral_norm hook on {hook.name!r}")
    return found
