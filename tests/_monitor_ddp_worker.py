"""DDP worker for tests/test_monitor_ddp.py (run as a script; Lightning re-launches it per rank).

Usage: python tests/_monitor_ddp_worker.py OUT_DIR
Writes OUT_DIR/rank{r}.pt with what each rank holds after fit.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from lit_models import TinyMLP, make_dataset, make_loader  # noqa: E402

from lightning_rpe import SharpnessMonitor  # noqa: E402


class RecordingLogger(Logger):
    """Records every log_metrics call on every rank (deliberately *not* rank-zero-only)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


def main(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    loader = make_loader(make_dataset(24, seed=2), batch_size=6, shuffle=False)
    monitor = SharpnessMonitor(every_n_steps=1, top_k=2, dtype="float64", tol=1e-8, probe_size=10, probe_batch_size=3)
    logger = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[monitor],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    model = TinyMLP(batchnorm=True, optimizer="momentum", hidden=6)
    trainer.fit(model, loader)
    rank = trainer.global_rank
    m = monitor.latest
    torch.save(
        {
            "rank": rank,
            "world_size": trainer.world_size,
            "step": m.step,
            "eigenvalues": list(m.eigenvalues),
            "lambda_min": m.lambda_min,
            "probe_loss": m.probe_loss,
            "n_measurements": monitor.n_measurements,
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "probe": [[t.cpu() for t in batch] for batch in monitor.probe_batches],
            "probe_indices": list(monitor.state_dict()["probe_indices"]),
            "rpe_log_calls": sum(1 for _, metrics in logger.calls if any(k.startswith("rpe/") for k in metrics)),
            "train_loss_log_calls": sum(1 for _, metrics in logger.calls if "train_loss" in metrics),
            "callback_metric": float(trainer.callback_metrics["rpe/sharpness"]),
            "tracker_top": monitor._tracker.previous_top.detach().cpu().clone(),
            "tracker_min": monitor._tracker.previous_min.detach().cpu().clone(),
            "rotation": (m.rotation_angle, m.polarity, m.subspace_similarity),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    # tear the gloo group down before exit: otherwise its threads can abort the process at shutdown
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
