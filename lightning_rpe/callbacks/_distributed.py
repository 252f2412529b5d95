"""Process-group plumbing of the lightning-rpe callbacks (private).

- :func:`distributed`: True when the Trainer runs several processes in an initialised group;
- :func:`all_reduce_sum`: a detached SUM across processes (the ``reduce`` hook of the engine);
- :class:`RankZeroBuffers`: every process temporarily uses rank 0's buffers (BatchNorm running
  statistics differ per rank under DDP), restored bit-exactly afterwards;
- :func:`broadcast_solve`: rank 0's measurement on every process, its eigenvectors sent as tensors.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_rpe.measure import Solve

__all__ = ["RankZeroBuffers", "all_reduce_sum", "broadcast_solve", "distributed"]

_VECTORS = ("top_vectors", "min_vector", "preconditioned_vector")


def collective_device(t: Tensor, backend: str, cuda_available: bool, cuda_index: int) -> torch.device:
    """Where ``t`` must be for a collective of ``backend``: NCCL (the default of Lightning's DDP on
    GPUs) reduces CUDA tensors only, so a host tensor (a flag, a count) goes to the current CUDA
    device; gloo and mixed backends (``"cpu:gloo,cuda:nccl"``) take it where it is.
    """
    if t.device.type == "cpu" and backend == "nccl" and cuda_available:
        return torch.device("cuda", cuda_index)
    return t.device


def all_reduce_sum(t: Tensor) -> Tensor:
    """A detached copy of ``t`` summed over all processes, on ``t``'s device.

    A host tensor is reduced on the current CUDA device under NCCL (:func:`collective_device`).
    """
    cuda = torch.cuda.is_available()
    device = collective_device(t, str(torch.distributed.get_backend()), cuda, torch.cuda.current_device() if cuda else 0)
    out = t.detach().to(device, copy=True)
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.to(t.device)


def distributed(trainer: pl.Trainer) -> bool:
    """True when ``trainer`` runs several processes in an initialised process group."""
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast_solve(strategy: Any, result: Solve, device: torch.device) -> Solve:
    """Rank 0's ``result`` on every process, its eigenvectors on ``device``.

    The scalars travel pickled (``strategy.broadcast``) with the vectors as ``meta`` tensors (shape and
    dtype, no data); the vectors then travel with ``torch.distributed.broadcast`` into each process's
    own tensor of that shape (its own solve's, or a new one): no pickling of parameter-sized data, and
    on NCCL no trip through the host. Every process keeps the same tracker state, hence the same warm
    starts and the same sequence of all-reduced products in the next solve.
    """
    header = strategy.broadcast(result.vectors_to("meta"), src=0)
    moved: dict[str, Tensor | None] = {}
    for name in _VECTORS:
        shape = getattr(header, name)
        if shape is None:
            moved[name] = None
            continue
        own = getattr(result, name)
        fits = own is not None and own.shape == shape.shape and own.dtype == shape.dtype and own.device == device
        if torch.distributed.get_rank() == 0:
            own = own.to(device).contiguous()  # the source: its values, wherever they were
        elif not (fits and own.is_contiguous()):
            own = torch.empty(shape.shape, dtype=shape.dtype, device=device)
        torch.distributed.broadcast(own, src=0)
        moved[name] = own
    return replace(header, **moved)


class RankZeroBuffers:
    """Temporarily give every rank the buffers of rank 0 (restored bit-exactly on exit)."""

    def __init__(self, module: nn.Module, enabled: bool) -> None:
        self.module = module
        self.enabled = enabled
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        if not self.enabled:
            return
        for buf in self.module.buffers():
            self.saved.append((buf, buf.detach().clone()))
            with torch.no_grad():
                torch.distributed.broadcast(buf.data, src=0)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.data.copy_(value)
        self.saved = []
