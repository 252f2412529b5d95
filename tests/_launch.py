"""Run a multi-process worker script (DDP, FSDP) in a subprocess, so that pytest's own process stays clean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# launcher variables of an enclosing distributed run: a worker must start its own process group
_DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_worker(script: Path, *args: str, cwd: Path | None = None, timeout: float = 300) -> None:
    """Run ``python script *args`` with one torch thread and a clean distributed environment.

    ``cwd`` defaults to the repository root (the parent of ``tests/``). Fails the calling test,
    with the tails of the worker's output, when the worker exits with a non-zero status.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in _DISTRIBUTED_ENV:
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd or Path(__file__).resolve().parent.parent), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
