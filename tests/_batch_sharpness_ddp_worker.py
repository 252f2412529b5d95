"""DDP worker for tests/test_batch_sharpness_ddp.py (run as a script; Lightning re-launches it per rank).

Usage: python tests/_batch_sharpness_ddp_worker.py OUT_DIR [PROBE_SIZE]
Writes OUT_DIR/rank{r}.pt with each rank's batch sharpness, probe share and final weights.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import torch
from lit_models import TinyMLP, make_dataset, make_loader

from lightning_rpe import SharpnessMonitor


def main(out_dir: str, probe_size: int = 24) -> None:
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    loader = make_loader(make_dataset(48, seed=4), batch_size=6, shuffle=False)
    monitor = SharpnessMonitor(every_n_steps=2, top_k=1, lambda_min=False, grad_alignment=False, on_fit_start=False,
                               on_fit_end=False, custom_scalars=False, dtype="float64", tol=1e-8, probe_size=probe_size,
                               probe_batch_size=4, batch_sharpness=3)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = TinyMLP(hidden=6, lr=0.1)
    trainer.fit(model, loader)
    m = monitor.latest
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "step": m.step,
            "batch_sharpness": m.batch_sharpness,
            "batch_sharpness_se": m.batch_sharpness_se,
            "batch_sharpness_ratio": m.batch_sharpness_ratio,
            "threshold": m.thresholds[0],
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "probe": [[t.cpu() for t in batch] for batch in monitor.probe_batches],
            "generator_seed": monitor.settings.minibatch_generator(m.step).initial_seed(),
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
