"""DDP worker for tests/test_monitor_ddp.py: a probe set too small for two processes.

Usage: python tests/_ddp_probe_worker.py OUT_DIR
Each rank writes OUT_DIR/rank{r}.txt with the error it raised at setup (or "no error").
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lit_models import TinyMLP, make_dataset, make_loader  # noqa: E402

from lightning_rpe import SharpnessMonitor  # noqa: E402


def main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SharpnessMonitor(every_n_steps=1, probe_size=1)])
    message = "no error"
    try:
        trainer.fit(TinyMLP(), make_loader(make_dataset(8, seed=1), batch_size=4, shuffle=False))
    except ValueError as exc:
        message = str(exc)
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.txt"), "w") as fh:
        fh.write(message)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
