"""InstabilityController under DDP (CPU, 2 processes, gloo): one decision, broadcast to every rank.

Each scenario runs a script in a subprocess (Lightning's "ddp" strategy re-launches the script for
rank 1). Every rank records the lr it actually used inside each optimizer step (a step pre-hook
registered after the controller's) and writes it to a JSON file.

* ``stub``: a synthetic monitor that reports a *different* curvature on each rank (10 on rank 0,
  15 on rank 1). Deciding locally would give the ranks different factors; with the decision made
  on rank zero and broadcast, both ranks use rank zero's factor at every step.
* ``guard``: a loss spike on rank 1 only: both ranks roll back at the same step and stay identical.
* ``real``: the real SharpnessMonitor (all-reduced Hessian products) on a tiny MLP: both ranks use
  the same factors, which change during the run, and end with identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import run_worker

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent

SCRIPT = r'''
import json, os, sys, warnings
sys.path.insert(0, {tests!r})
warnings.filterwarnings("ignore")
import torch
import torch.distributed as dist
import lightning.pytorch as pl
from lightning_rpe import InstabilityController, SharpnessMonitor
from test_controller import StubMonitor, TinyModel, legacy_controller, tiny_loader
from lit_models import TinyMLP, full_batch_loader

torch.set_num_threads(1)
mode, out = sys.argv[1], sys.argv[2]


class LrProbe(pl.Callback):
    """Registers a step pre-hook after the controller's and records the lr used in each step."""

    def __init__(self):
        self.used = []

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        opt.register_step_pre_hook(lambda o, a, k: self.used.append([float(g["lr"]) for g in o.param_groups]))


pl.seed_everything(0, verbose=False)
probe = LrProbe()
if mode == "stub":
    model = TinyModel(lr=0.1)
    monitor = StubMonitor(lambda step: 10.0 + 5.0 * dist.get_rank(), every=2)
    controller = legacy_controller(target_ratio=1.0, max_change=4.0)
    loader, steps = tiny_loader(n=32, batch_size=8), 6
elif mode == "guard":
    from test_controller_safety import FaultyModel
    # a loss spike on rank 1 only, at step 5: both ranks must roll back together
    model = FaultyModel({{5: 50.0}} if int(os.environ.get("LOCAL_RANK", 0)) == 1 else {{}}, lr=0.01)
    monitor = StubMonitor(lambda step: 10.0, every=2)
    controller = InstabilityController(target_ratio=1.0, warmup_steps=0, gauge="sharpness", spike_window=4,
                                       hold_steps=3)
    loader, steps = tiny_loader(n=32, batch_size=8), 8
else:
    model = TinyMLP(hidden=16, lr=0.05)
    monitor = SharpnessMonitor(every_n_steps=3, top_k=1, lambda_min=False, grad_alignment=False,
                               on_fit_start=False, on_fit_end=False, custom_scalars=False, dtype="float64")
    controller = legacy_controller(target_ratio=0.9, max_change=3.0)
    loader, steps = full_batch_loader(n=64), 15
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps,
                     callbacks=[monitor, controller, probe], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, use_distributed_sampler=True)
trainer.fit(model, loader)
rank = trainer.global_rank
state = {{k: v.detach().flatten().tolist() for k, v in model.state_dict().items()}}
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"used": probe.used, "factor": controller.factor, "n_decisions": controller.n_decisions,
               "world_size": trainer.world_size, "weights": state, "rollbacks": controller.n_rollbacks,
               "ratios": [list(m.ratios) for m in getattr(monitor, "history", [])]}}, f)
# tear the gloo group down before exit: otherwise its threads can abort the process at shutdown
# ("terminate called without an active exception")
if dist.is_initialized():
    dist.destroy_process_group()
'''


def run_ddp(tmp_path: Path, mode: str) -> tuple[dict, dict]:
    script = tmp_path / f"ddp_{mode}.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    run_worker(script, mode, str(tmp_path), cwd=tmp_path, timeout=240)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    return r0, r1


def test_ddp_ranks_use_rank_zeros_factor_even_when_their_measurements_differ(tmp_path: Path) -> None:
    r0, r1 = run_ddp(tmp_path, "stub")
    # rank 0 measures curvature 10 -> ratio 0.5 at lr 0.1 -> factor 2; rank 1 alone would pick 4/3
    assert [u[0] for u in r0["used"]] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    assert r1["used"] == r0["used"]
    assert r0["factor"] == r1["factor"] == 2.0
    assert r0["weights"] == r1["weights"]
    # the measurements really differed between the ranks
    assert r0["ratios"] and r1["ratios"] and r0["ratios"] != r1["ratios"]


def test_ddp_with_the_real_monitor_keeps_ranks_identical(tmp_path: Path) -> None:
    r0, r1 = run_ddp(tmp_path, "real")
    assert len(r0["used"]) == 15
    assert r1["used"] == r0["used"]
    assert len({round(u[0], 12) for u in r0["used"]}) >= 3  # the factor changed during the run
    assert r0["factor"] == r1["factor"] and r0["n_decisions"] == r1["n_decisions"] >= 2
    assert r0["weights"] == r1["weights"]


def test_ddp_a_spike_on_one_rank_rolls_back_every_rank(tmp_path: Path) -> None:
    r0, r1 = run_ddp(tmp_path, "guard")
    assert r0["rollbacks"] == r1["rollbacks"] == 1
    assert r1["used"] == r0["used"]
    assert r0["factor"] == r1["factor"]
    assert r0["weights"] == r1["weights"]
