"""The lightning-rpe command: help, one-line usage errors, demo, report, fit with every config."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_controller import _measurement

from lightning_rpe import SharpnessMonitor
from lightning_rpe.cli import RPELightningCLI, demo_threads, main
from lightning_rpe.demo import StepProgressBar
from lightning_rpe.report import load_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(c for c in (ROOT / "examples" / "configs").glob("*.yaml") if c.stem != "sharded")  # sharded: 2 GPUs


_CONTROLLER = ["fit", "--config", str(ROOT / "examples" / "configs" / "monitor_controller.yaml"), "--trainer.logger", "false"]


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if not ln.startswith("Seed set to")]
    assert rc == 2
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], err
    return err[0]


def test_top_level_help_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "fit", "report"):
        assert cmd in out
    assert main(["--version"]) == 0
    assert "lightning-rpe 0." in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [(["bogus"], "unknown command 'bogus'"), (["demo", "--foo"], "unrecognized arguments: --foo"),
     (["demo", "--steps", "0"], "--steps"), (["demo", "--lr", "abc"], "--lr"), (["demo", "--n-train", "1797"], "--n-train"),
     (["report"], "RUN_DIR"), (["report", "/definitely/not/here"], "not found"),
     (["fit", "--config", "/definitely/not/here.yaml"], "does not exist"),
     (["fit", "--no-such-option", "1"], "unrecognized arguments"),
     (["fit", "--model.lr", "-1"], "MLPClassifier: lr must be a finite float > 0; got -1"),
     (["report", "/definitely/not/here", "--warmup", "1.5"], "warmup must be in [0, 1)"),
     # jsonargparse's type errors, with the option named and every type of a union; a controller's own
     # ValueError raised "from None" (not the float check it replaced, which left out "auto")
     ([*_CONTROLLER, "--controller.init_args.max_factor", "big"], "max_factor: expected float, 'auto' or null; got big"),
     ([*_CONTROLLER, "--controller.init_args.band_goal", "middle"],
      "band_goal: Expected a typing.Literal['center', 'edge', 'cautious', 'auto']. Got value: middle"),
     ([*_CONTROLLER, "--controller.init_args.max_factor", "0.5"],
      'InstabilityController: max_factor must be "auto", None (unbounded) or a float >= 1; got 0.5')],
)
def test_usage_errors_are_one_line_with_exit_code_2(capsys, argv, needle):
    rc = main(argv)
    line = _one_line_error(capsys, rc)
    assert needle in line


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--steps" in out and "2/lr" in out and "default: 2500" in out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "--rotation-threshold" in capsys.readouterr().out
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--monitor" in out and "--controller" in out


def test_demo_tiny_run(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--steps", "30", "--every", "10", "--hidden", "16", "--n-train", "200", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Finished 30 steps" in text and "Run folder:" in text and "sharpness" in text
    run = load_run(out)
    sharp = run.scalars["rpe/sharpness"]
    assert len(sharp) >= 3 and sharp.steps[0] == 0
    assert (out / "report" / "summary.md").is_file() and len(list((out / "report").glob("*.png"))) == 3
    # the summary's final sharpness is the logged one
    assert f"Final sharpness {sharp.last:.2f}" in text
    # a second run into the same folder is refused with one line
    rc = main(["demo", "--steps", "2", "--out", str(out), "--no-progress"])
    assert "already holds a run" in _one_line_error(capsys, rc)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_fit_every_config(config, tmp_path, capsys):
    argv = ["fit", "--config", str(config), "--trainer.max_steps", "6", "--trainer.logger.init_args.save_dir",
            str(tmp_path), "--model.init_args.hidden", "[16]",
            "--trainer.enable_model_summary", "false"]
    if config.stem == "monitor_controller":
        argv += ["--controller.enabled", "false"]
    assert main(argv) == 0
    (events_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    run = load_run(events_dir)
    assert "rpe/sharpness" in run.scalars and len(run.scalars["rpe/sharpness"]) >= 2
    assert (events_dir / "config.yaml").is_file() and (events_dir / "run_card.json").is_file()
    # fit closes like the demo: run folder, a summary with the logged numbers, the report command
    captured = capsys.readouterr()
    out = captured.out
    assert "\r" not in captured.err  # no carriage-return progress bar when stderr is not a terminal
    assert "Finished 6 optimizer steps with" in out and f"Run folder: {events_dir}" in out
    assert f"lightning-rpe report {events_dir}" in out
    assert f"stability ratio {run.scalars['rpe/stability_ratio'].last:.3f}" in out
    # the loss is logged at every step when a monitor is present (the period-2 oscillation)
    assert run.scalars["train_loss"].steps.tolist() == list(range(6))
    if config.stem == "monitor_controller":
        assert "enabled: false" in (events_dir / "config.yaml").read_text()


def test_controller_toggle_on_from_command_line(tmp_path):
    cfg = ROOT / "examples" / "configs" / "monitor_controller.yaml"
    argv = ["fit", "--config", str(cfg), "--trainer.max_steps", "4", "--trainer.logger.init_args.save_dir",
            str(tmp_path), "--model.init_args.hidden", "[8]", "--controller.warmup_steps", "0",
            "--monitor.every_n_steps", "1", "--trainer.log_every_n_steps", "1"]
    assert main(argv) == 0
    (events_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    assert any(t.startswith("rpe/lr") for t in load_run(events_dir).scalars)


def test_validate_and_test_subcommands(tmp_path, capsys):
    cfg = ROOT / "examples" / "configs" / "monitor.yaml"
    common = ["--config", str(cfg), "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--model.init_args.hidden", "[8]"]
    assert main(["validate", *common]) == 0
    assert main(["test", *common]) == 0
    assert main(["predict", *common]) == 0


def test_scheduler_without_optimizer_is_refused(capsys, tmp_path):
    rc = main(["fit", "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "10",
               "--trainer.logger", "false"])
    assert "lr_scheduler" in _one_line_error(capsys, rc)


def test_controller_without_monitor_is_refused(capsys):
    rc = main(["fit", "--controller", "lightning_rpe.InstabilityController", "--controller.target_ratio", "1.2",
               "--trainer.logger", "false"])
    assert "SharpnessMonitor" in _one_line_error(capsys, rc)


def test_report_command(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    for lr in (0.05, 0.1):
        w = SummaryWriter(str(tmp_path / f"lr{lr}"))
        for step in range(3):
            w.add_scalar("rpe/sharpness", 2 / lr * (0.5 + step / 4), step)
        w.close()
        (tmp_path / f"lr{lr}" / "hparams.yaml").write_text(f"lr: {lr}\n")
    assert main(["report", str(tmp_path / "lr0.05"), str(tmp_path / "lr0.1"), "--out", str(tmp_path / "rep")]) == 0
    assert "2 run(s), 7 figure(s)" in capsys.readouterr().out
    assert (tmp_path / "rep" / "sweep.png").is_file()


def test_cli_class_is_importable_and_demo_threads():
    assert issubclass(RPELightningCLI, __import__("lightning.pytorch.cli", fromlist=["LightningCLI"]).LightningCLI)
    assert demo_threads(None, cores=2) == 1 and demo_threads(None, cores=1) == 1
    assert demo_threads(None, cores=8) is None and demo_threads(3, cores=2) == 3


def test_report_prefix_and_warmup_options(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "run"))
    for step, lam in ((0, -3.0), (50, -0.5), (100, -0.25)):
        w.add_scalar("my/sharpness", 1.0 + step, step)
        w.add_scalar("my/lambda_min", lam, step)
    w.close()
    assert main(["report", str(tmp_path / "run"), "--prefix", "my/", "--warmup", "0.6"]) == 0
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "| run | 3 | 100 | 101 |" in summary and "-0.25" in summary and "-3" not in summary.split("## Geometry")[0]


def test_console_script_and_module_entry_point(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "lightning_rpe", "report", str(tmp_path / "none")],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "not found" in res.stderr
    exe = shutil.which("lightning-rpe")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    res = subprocess.run([exe, "--help"], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout


def test_step_progress_bar_counts_optimizer_steps(tmp_path):
    import io

    from lightning_rpe.demo import run_demo

    stream = io.StringIO()
    res = run_demo(steps=12, every=6, hidden=(8,), n_train=100, out=tmp_path / "d", report=False, progress=True,
                   stream=stream)
    text = stream.getvalue()
    # not a terminal: plain lines, one per 10% of the steps, no carriage returns
    assert res.steps == 12 and "step 12/12" in text and "sharpness=" in text and "ratio=" in text
    assert "\r" not in text and text.count("\n") == 13
    assert text.startswith("full-batch GD: measuring the Hessian of the initial parameters (top-3 eigenvalues and "
                           "lambda_min) before the first step")
    assert res.measurements == len(res.trajectory) >= 3

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    run_demo(steps=4, every=2, hidden=(8,), n_train=100, out=tmp_path / "e", report=False, progress=True,
             stream=stream)
    assert "4/4" in stream.getvalue() and "\r" in stream.getvalue()  # tqdm's bar on a terminal


def test_progress_line_names_the_step_of_an_older_measurement() -> None:
    # the bar may run before the monitor's on_train_batch_end: a line at step 2500 showed the
    # measurement of step 2475 as if current (a review); it now says which step it is from
    monitor = SharpnessMonitor()
    monitor.latest = _measurement(step=2475, sharpness=40.66, stability_ratio=1.017)
    bar = StepProgressBar()
    trainer = SimpleNamespace(callback_metrics={}, callbacks=[monitor], global_step=2500)
    assert bar._postfix(trainer) == {"sharpness": "40.66", "ratio": "1.017", "measured at step": "2475"}
    trainer.global_step = 2475
    assert "measured at step" not in bar._postfix(trainer)
