"""SharpnessMonitor from a LightningCLI YAML file (class_path / init_args)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_rpe import SharpnessMonitor

pytest.importorskip("jsonargparse")


def test_lightning_cli_yaml_builds_and_runs_the_monitor(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI
    from lit_models import TinyMLP, full_batch_loader

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
seed_everything: 3
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_rpe.SharpnessMonitor
      init_args:
        every_n_steps: 1
        top_k: 2
        lambda_min: false
        probe_size: 8
        dtype: float64
        prefix: "curv/"
model:
  hidden: 4
  optimizer: nesterov
"""
    )
    cli = LightningCLI(TinyMLP, run=False, args=["--config", str(config)], save_config_callback=None)
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, SharpnessMonitor)]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert (monitor.every_n_steps, monitor.top_k, monitor.lambda_min, monitor.dtype, monitor.prefix) == (
        1, 2, False, "float64", "curv/")
    cli.trainer.fit(cli.model, full_batch_loader(8))
    assert monitor.latest is not None and len(monitor.latest.eigenvalues) == 2 and monitor.latest.lambda_min is None
    assert "curv/eig_2" in cli.trainer.callback_metrics


def test_lightning_cli_rejects_an_invalid_option(capsys: pytest.CaptureFixture) -> None:
    from lightning.pytorch.cli import LightningCLI
    from lit_models import TinyMLP

    args = ["--trainer.callbacks+=lightning_rpe.SharpnessMonitor", "--trainer.callbacks.dtype=float16",
            "--trainer.logger=false"]
    with pytest.raises((SystemExit, ValueError)) as excinfo:
        LightningCLI(TinyMLP, run=False, args=args, save_config_callback=None)
    text = str(excinfo.value) + capsys.readouterr().err
    # the Literal annotation lets jsonargparse refuse the value while parsing, before anything runs
    assert "Parser key \"dtype\"" in text and "Literal['float32', 'float64']" in text and "float16" in text
