"""Smoke test of benchmarks/fd_accuracy.py on a tiny workload (no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_fd_accuracy_script_runs_on_a_tiny_workload(capsys):
    pytest.importorskip("sklearn")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("_bench_fd_accuracy", BENCH / "fd_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--workloads", "mlp_small", "--n-samples", "24", "--width", "4", "--n-dirs", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "mlp_small  float64  s=  1e-06" in out
    assert out.count("passed") == 2  # verification of the float32 and float64 operators
