"""Process-group plumbing of the lightning-rpe callbacks (private).

- :func:`distributed`: True when the Trainer runs several processes in an initialised group;
- :func:`all_reduce_sum`: a detached SUM across processes (the ``reduce`` hook of the engine);
- :class:`RankZeroBuffers`: every process temporarily uses rank 0's buffers (BatchNorm running
  statistics differ per rank under DDP), restored bit-exactly afterwards.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = ["RankZeroBuffers", "all_reduce_sum", "distributed"]


def all_reduce_sum(t: Tensor) -> Tensor:
    """A detached copy of ``t`` summed over all processes."""
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def distributed(trainer: pl.Trainer) -> bool:
    """True when ``trainer`` runs several processes in an initialised process group."""
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


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
