"""Sharded measurements on one process: FSDPStrategy and ModelParallelStrategy on one CUDA device
(skipped without one; the prepared GPU check of docs/sharded.md), and FSDPStrategy at world size 1
on the CPU, where FSDP itself switches FULL_SHARD to NO_SHARD (nothing is replicated, so the
operator accepts it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _launch import run_worker

WORKER = Path(__file__).with_name("_sharded_trainer_worker.py")


def _fit(tmp_path: Path, mode: str, accelerator: str) -> dict:
    run_worker(WORKER, str(tmp_path), mode, accelerator, "1", timeout=600)
    return torch.load(tmp_path / f"{mode}_rank0.pt", weights_only=False)


def _check(result: dict, kind: str, rel: float, device: str) -> None:
    assert result["world_size"] == 1 and result["is_sharded"] and result["problem"] is None
    assert result["device"].startswith(device) and result["invisible"]
    assert [rec["step"] for rec in result["records"]] == [1, 2, 3]
    for rec in result["records"]:
        assert rec["kind"] == kind and rec["local_dim"] == rec["total_dim"] == 26 and rec["bitwise"]
        assert rec["lambda_max"] == pytest.approx(rec["ref_max"], rel=rel)
        assert rec["lambda_min"] == pytest.approx(rec["ref_min"], rel=rel)


@pytest.mark.slow
def test_fsdp_world_size_one_on_cpu(tmp_path: Path) -> None:
    _check(_fit(tmp_path, "fsdp", "cpu"), "fsdp1", 1e-4, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("mode", "kind", "rel"), [("model_parallel", "fsdp2", 1e-8), ("fsdp", "fsdp1", 1e-4)])
def test_one_cuda_device(tmp_path: Path, mode: str, kind: str, rel: float) -> None:
    _check(_fit(tmp_path, mode, "cuda"), kind, rel, "cuda")
