"""Probe-set capture for the SharpnessMonitor (private).

The fixed probe set is the first ``size`` samples of the training data set, read through a
*separate* view of it: ``dataset[i]`` for ``i`` in order, collated with the training loader's
``collate_fn`` into physical batches. The training DataLoader, its sampler and its iterator are
never touched, and everything runs inside ``isolate_rng`` so that random transforms of the data
set (or anything else) cannot consume the global RNG of the run.

Under data parallelism the first ``size`` indices are split across ranks with a stride
(``indices[rank::world_size]``), so the union over ranks is exactly the first ``size`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import default_collate

from lightning_rpe.curvature._functional import default_batch_size

__all__ = ["ProbeSet", "capture_dataset_probe", "capture_loader_probe", "capture_probe", "capture_probe_everywhere", "fingerprint", "physical_batch_size"]


@dataclass
class ProbeSet:
    """Probe batches of this rank plus what is needed to rebuild them after a restart.

    ``indices`` are the *global* sample indices (all ranks), in order; ``kind`` is ``"map"`` (data
    set indices) or ``"iterable"`` (positions in the data set's iteration order) or ``"loader"``
    (positions in a user DataLoader's iteration, not rebuildable by index: the loader is re-read).
    ``dropped`` samples of this rank were left out of an incomplete last batch, for
    ``drop_reason`` ``"drop_last"`` (training drops it too) or ``"one_sample"`` (a batch the model
    cannot evaluate: BatchNorm with batch statistics).
    """

    batches: list[Any]
    indices: list[int]
    kind: str
    fingerprint: float
    n_samples: int
    dropped: int = 0
    drop_reason: str | None = None


def _sum_floats(obj: Any) -> float:
    if isinstance(obj, Tensor):
        t = obj.detach()
        if t.is_complex():
            t = t.abs()
        return float(t.to(torch.float64).abs().sum()) if t.numel() else 0.0
    if isinstance(obj, dict):
        return sum(_sum_floats(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_sum_floats(v) for v in obj)
    return 0.0


def fingerprint(batches: Sequence[Any]) -> float:
    """Sum of absolute values of every tensor entry (float64): a cheap identity check on rebuild."""
    return float(sum(_sum_floats(b) for b in batches))


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def capture_dataset_probe(
    loader: DataLoader,
    size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    indices: Sequence[int] | None = None,
    transfer: Callable[[Any], Any] | None = None,
    drop_last: bool = False,
    min_batch: int = 1,
) -> ProbeSet:
    """Read the first ``size`` samples of ``loader.dataset`` (or the given global ``indices``).

    The loader itself is not iterated; only its ``dataset`` and ``collate_fn`` are used. With
    ``drop_last`` (a training loader that drops its incomplete last batch), when the probe is the
    whole data set, this rank's samples that do not fill a last batch of ``batch_size`` are left
    out if at least one full batch remains: training never evaluates the loss on that shorter
    batch, and a model with batch statistics (BatchNorm) is a different function there, or none
    at all on one sample. A probe smaller than the data set keeps all its ``size`` samples,
    except a last batch of fewer than ``min_batch`` samples (2 for a model with BatchNorm under
    batch statistics), left out when another batch remains.
    """
    dataset = loader.dataset
    if loader.batch_size is None and loader.batch_sampler is None:
        return _capture_prebatched(loader, size, rank, world_size, indices, transfer)
    collate = loader.collate_fn if loader.collate_fn is not None else default_collate
    with isolate_rng():
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            kind = "iterable"
            wanted = list(indices) if indices is not None else list(range(size))
            last = max(wanted) if wanted else -1
            taken: dict[int, Any] = {}
            wanted_set = set(wanted)
            sample: Any
            ended = True  # the data set ran out before a sample past the wanted ones was read
            for pos, sample in enumerate(cast(Iterable[Any], dataset)):
                if pos > last:
                    ended = False
                    break
                if pos in wanted_set:
                    taken[pos] = sample
            wanted = [i for i in wanted if i in taken]
            samples_of = taken.__getitem__
            whole = ended  # the probe is every sample of the data set
        else:
            kind = "map"
            n = len(dataset)  # type: ignore[arg-type]
            wanted = list(indices) if indices is not None else list(range(min(size, n)))
            bad = [i for i in wanted if not 0 <= i < n]
            if bad:
                raise ValueError(f"probe indices {bad[:5]} are out of range for a data set of {n} samples")
            samples_of = dataset.__getitem__
            whole = len(wanted) == n
        if not wanted:
            raise ValueError("the training data set is empty: no probe samples")
        mine = wanted[rank::world_size]
        rest = len(mine) % batch_size
        dropped, reason = 0, None
        if rest and len(mine) > batch_size:  # at least one full batch remains
            if drop_last and whole:
                dropped, reason = rest, "drop_last"
            elif rest < min_batch:
                dropped, reason = rest, "one_sample"
        mine = mine[: len(mine) - dropped]
        batches = []
        for chunk in _chunks(mine, batch_size):
            batch = collate([samples_of(i) for i in chunk])
            batches.append(transfer(batch) if transfer is not None else batch)
    if not batches:
        raise ValueError(
            f"rank {rank} got no probe samples ({len(wanted)} samples over {world_size} ranks); "
            "increase probe_size to at least the number of processes"
        )
    return ProbeSet(batches=batches, indices=wanted, kind=kind, fingerprint=fingerprint(batches), n_samples=len(mine),
                    dropped=dropped, drop_reason=reason)


def _capture_prebatched(
    loader: DataLoader,
    size: int,
    rank: int,
    world_size: int,
    indices: Sequence[int] | None,
    transfer: Callable[[Any], Any] | None,
) -> ProbeSet:
    """A loader with automatic batching off (``batch_size=None``): every data-set item is a batch.

    The probe set is the first items holding ``size`` samples in all (indices are item indices),
    split across ranks by stride; the items are passed through the loader's ``collate_fn``
    (``default_convert``), exactly as training sees them.
    """
    dataset = loader.dataset
    convert = loader.collate_fn if loader.collate_fn is not None else (lambda item: item)
    with isolate_rng():
        if indices is None:
            wanted, counted = [], 0
            position = iter(dataset) if isinstance(dataset, IterableDataset) else None
            n = None if position is not None else len(dataset)  # type: ignore[arg-type]
            items: dict[int, Any] = {}
            i = 0
            while counted < size and (n is None or i < n):
                item = next(position, None) if position is not None else dataset[i]
                if item is None:
                    break
                items[i] = item
                wanted.append(i)
                counted += default_batch_size(item)
                i += 1
        else:
            wanted = list(indices)
            items = {i: dataset[i] for i in wanted}
        if not wanted:
            raise ValueError("the training data set is empty: no probe samples")
        mine = wanted[rank::world_size]
        batches = [convert(items[i]) for i in mine]
        if transfer is not None:
            batches = [transfer(b) for b in batches]
    if not batches:
        raise ValueError(
            f"rank {rank} got no probe batches ({len(wanted)} pre-batched items over {world_size} ranks); "
            "increase probe_size so that every process gets at least one batch"
        )
    n_samples = sum(default_batch_size(b) for b in batches)
    return ProbeSet(batches=batches, indices=wanted, kind="map", fingerprint=fingerprint(batches), n_samples=n_samples)


def capture_loader_probe(
    loader: Iterable[Any], size: int | None, transfer: Callable[[Any], Any] | None = None, count: Callable[[Any], int] | None = None
) -> ProbeSet:
    """Iterate a user loader once (inside ``isolate_rng``) and keep its batches until ``size`` samples."""
    batches: list[Any] = []
    n = 0
    with isolate_rng():
        for batch in loader:
            batches.append(transfer(batch) if transfer is not None else batch)
            n += count(batch) if count is not None else 1
            if size is not None and n >= size:
                break
    if not batches:
        raise ValueError("the probe dataloader yielded no batches")
    return ProbeSet(batches=batches, indices=[], kind="loader", fingerprint=fingerprint(batches), n_samples=n)


def physical_batch_size(loader: Any, requested: int | None) -> int:
    """``requested``, else the training loader's batch size, else 256."""
    if requested is not None:
        return requested
    size = getattr(loader, "batch_size", None)
    if size is None:
        sampler = getattr(loader, "batch_sampler", None)
        size = getattr(sampler, "batch_size", None)
    return int(size) if isinstance(size, int) and size > 0 else 256


def capture_probe(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    probe: Any,
    size: int,
    batch_size: int | None,
    indices: Sequence[int] | None,
    rank: int,
    world_size: int,
    min_batch: int = 1,
) -> ProbeSet:
    """This rank's probe batches on the module's device, through the module's batch-transfer hooks.

    ``probe`` is ``"fixed"`` (the first ``size`` samples of the training DataLoader's data set, or
    the saved global ``indices`` after a restart) or a user iterable of batches. ``min_batch``: see
    :func:`capture_dataset_probe`.
    """
    device = pl_module.device

    def transfer(batch: Any) -> Any:
        batch = pl_module.on_before_batch_transfer(batch, 0)
        batch = pl_module.transfer_batch_to_device(batch, device, 0)
        return pl_module.on_after_batch_transfer(batch, 0)

    if probe == "fixed":
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "SharpnessMonitor: probe='fixed' reads the data set of the training DataLoader, but the "
                f"train dataloader is a {type(loader).__name__}; pass probe=<a DataLoader of probe batches> "
                "or probe='batch'"
            )
        # the training batch size, and the training loader's drop_last with it (a requested probe batch
        # size keeps every probe sample)
        drop_last = batch_size is None and bool(getattr(loader, "drop_last", False))
        return capture_dataset_probe(
            loader, size, physical_batch_size(loader, batch_size), rank, world_size, indices=indices,
            transfer=transfer, drop_last=drop_last, min_batch=min_batch,
        )
    return capture_loader_probe(probe, size, transfer=transfer, count=default_batch_size)


def capture_probe_everywhere(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    probe: Any,
    size: int,
    batch_size: int | None,
    indices: Sequence[int] | None,
    rank: int,
    world_size: int,
    reduce: Callable[[Tensor], Tensor] | None,
    min_batch: int = 1,
) -> tuple[ProbeSet, float, int, dict[str, int]]:
    """:func:`capture_probe` on every process, failing on all of them together.

    Returns this rank's probe set, the fingerprint summed over the ranks, the number of samples
    over the ranks and the samples left out over the ranks by reason (``"drop_last"``,
    ``"one_sample"``: :class:`ProbeSet`). ``reduce`` is a SUM across processes (None: one process).

    Raises:
        ValueError: on every process, when the probe set could not be built on any of them (no rank
            is left waiting in a collective).
    """
    problem: Exception | None = None
    try:
        captured = capture_probe(trainer, pl_module, probe, size, batch_size, indices, rank, world_size, min_batch)
    except Exception as exc:  # raised on every rank below, never on one rank alone
        problem = exc
    failed = torch.tensor([float(problem is not None)], dtype=torch.float64)
    if reduce is not None:
        failed = reduce(failed)
    if failed[0] > 0:
        reason = f"{type(problem).__name__}: {problem}" if problem is not None else "it failed on another process"
        raise ValueError(f"SharpnessMonitor: the probe set could not be built ({reason})") from problem
    reasons = ("drop_last", "one_sample")
    totals = torch.tensor([captured.fingerprint, captured.n_samples,
                           *(captured.dropped if captured.drop_reason == r else 0 for r in reasons)], dtype=torch.float64)
    if reduce is not None:
        totals = reduce(totals)
    return captured, float(totals[0]), int(totals[1]), {r: int(t) for r, t in zip(reasons, totals[2:])}
