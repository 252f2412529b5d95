"""Sharded measurements inside a real Trainer (2 gloo CPU processes): ModelParallelStrategy with FSDP2
in float64 and FSDPStrategy (test-only CPU subclass) in float32, against a dense float64 reference of
the unsharded model, with the trained weights bitwise equal with and without measuring."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml
from _launch import run_worker
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)

from lightning_rpe.callbacks._sharded import check_supported, is_sharded

WORKER = Path(__file__).with_name("_sharded_trainer_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "kind", "rel"), [("model_parallel", "fsdp2", 1e-8), ("fsdp", "fsdp1", 1e-4)])
def test_sharpness_inside_trainer_matches_dense_reference_and_is_invisible(tmp_path: Path, mode: str, kind: str,
                                                                          rel: float) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    run_worker(WORKER, str(tmp_path), mode, timeout=600)
    r0, r1 = (torch.load(tmp_path / f"{mode}_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["is_sharded"] and r0["problem"] is None
    assert r0["invisible"] and r1["invisible"]  # final weights bitwise equal with and without measuring
    assert [rec["step"] for rec in r0["records"]] == [1, 2, 3]
    for a, b in zip(r0["records"], r1["records"]):
        assert a["lambda_max"] == b["lambda_max"] and a["lambda_min"] == b["lambda_min"]
        assert a["kind"] == kind and a["total_dim"] == 26 and a["local_dim"] + b["local_dim"] == 26
        assert a["bitwise"] and b["bitwise"] and a["converged"] == [True, True]
        assert a["lambda_max"] == pytest.approx(a["ref_max"], rel=rel)
        assert a["lambda_min"] == pytest.approx(a["ref_min"], rel=rel) and a["lambda_min"] < 0
        assert a["n_gradients"] == 2 * a["n_hvp"]
    # the SharpnessMonitor itself under the sharded strategy: the same values on both ranks, equal to the
    # dense reference, the exact heavy-ball ratio lr * lambda_max / (2 + 2 beta), and training bitwise unchanged
    assert r0["monitor_invisible"] and r1["monitor_invisible"]
    assert [rec["step"] for rec in r0["monitor_records"]] == [1, 2, 3]
    for a, b in zip(r0["monitor_records"], r1["monitor_records"]):
        assert a == b and a["backend"] == "finite_difference"
        assert a["sharpness"] == pytest.approx(a["ref_max"], rel=rel)
        assert a["lambda_min"] == pytest.approx(a["ref_min"], rel=max(rel, 1e-3))
        assert a["ratio"] == pytest.approx(a["lr"] * a["sharpness"] / 3.8, rel=1e-12)  # heavy ball, beta 0.9


def test_is_sharded_and_check_supported_refusals() -> None:
    assert is_sharded(FSDPStrategy()) and is_sharded(ModelParallelStrategy()) and not is_sharded(DDPStrategy())
    check_supported(DDPStrategy())
    check_supported(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    check_supported(FSDPStrategy())
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        check_supported(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        check_supported(ModelParallelStrategy())  # "auto" puts every device into tensor parallel
    with pytest.raises(ValueError, match="HYBRID_SHARD"):
        check_supported(FSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={torch.nn.Linear}))
    with pytest.raises(ValueError, match="NO_SHARD"):
        check_supported(FSDPStrategy(sharding_strategy="NO_SHARD"))
    with pytest.raises(ValueError, match="use_orig_params=True"):
        check_supported(FSDPStrategy(use_orig_params=False))
    # an instance without __init__ (the deepspeed package is optional): the check looks at the type only
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    assert is_sharded(deepspeed)
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_supported(deepspeed)


def test_example_sharded_config_names_a_supported_strategy() -> None:
    config = yaml.safe_load((WORKER.parent.parent / "examples" / "configs" / "sharded.yaml").read_text())
    spec = config["trainer"]["strategy"]
    module, _, name = spec["class_path"].rpartition(".")
    strategy = getattr(importlib.import_module(module), name)(**spec["init_args"])
    assert is_sharded(strategy)
    check_supported(strategy)
    assert config["trainer"]["precision"] == "32-true"
    monitor = config["monitor"]["class_path"].rpartition(".")
    assert hasattr(importlib.import_module(monitor[0]), monitor[2])
