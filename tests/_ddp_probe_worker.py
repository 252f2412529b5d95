"""DDP worker for tests/test_monitor_ddp.py: a probe set too small for two processes.

Usage: python tests/_ddp_probe_worker.py OUT_DIR [one_sample]
Each rank writes OUT_DIR/rank{r}.txt with the error it raised at setup (or "no error"). With
``one_sample``: a BatchNorm model, probe_size=11 in batches of 4 (rank 1's share would end in a
one-sample batch); each rank writes its probe sizes, skipped count and the monitor's warnings.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lit_models import TinyMLP, make_dataset, make_loader  # noqa: E402

from lightning_rpe import SharpnessMonitor  # noqa: E402


def one_sample(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=11, custom_scalars=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyMLP(batchnorm=True), make_loader(make_dataset(32, seed=1), batch_size=4, shuffle=False))
    said = [str(w.message) for w in caught if "SharpnessMonitor" in str(w.message)]
    sizes = [int(b[0].shape[0]) for b in monitor.probe_batches]
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.txt"), "w") as fh:
        fh.write(repr({"sizes": sizes, "skipped": monitor.n_skipped, "measured": monitor.n_measurements, "said": said}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    (one_sample if sys.argv[2:3] == ["one_sample"] else main)(sys.argv[1])
