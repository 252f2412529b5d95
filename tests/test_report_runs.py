"""The report on real runs: the run card gives the optimizer and lr actually used, labels follow it,
and the controller's runs are named and drawn."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_rpe import InstabilityController, SharpnessMonitor
from lightning_rpe.callbacks.run_card import RUN_CARD_FILE, read_run_card
from lightning_rpe.cli import main
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.models import MLPClassifier
from lightning_rpe.report import load_run, summarize, threshold_label, write_report

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path, name, model, callbacks, steps=8, loggers=None):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name=name, default_hp_metric=False)
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1,
                         logger=[logger, *(loggers or [])], callbacks=callbacks, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(n_train=100))
    return Path(logger.log_dir)


def test_adam_config_summary_uses_the_optimizer_that_trained(tmp_path):
    # adam.yaml builds Adam(lr=0.005, betas=(0.9, 0.99)) from its optimizer: section; the model's
    # own (unused) default lr 0.05 is what hparams.yaml holds.
    argv = ["fit", "--config", str(ROOT / "examples" / "configs" / "adam.yaml"), "--trainer.max_steps", "12",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.init_args.hidden", "[16]",
            "--monitor.init_args.every_n_steps", "4", "--trainer.enable_model_summary", "false"]
    assert main(argv) == 0
    (run_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    assert "lr: 0.05" in (run_dir / "hparams.yaml").read_text()
    card = json.loads((run_dir / RUN_CARD_FILE).read_text())
    group = card["optimizer"]["groups"][0]
    assert card["optimizer"]["name"] == "Adam" and group["kind"] == "adam" and group["lr"] == 0.005
    assert group["betas"] == [0.9, 0.99] and card["prefix"] == "rpe/" and card["controller"] is None
    assert card["monitor"]["every_n_steps"] == 4 and card["monitor"]["preconditioned"] is True
    run = load_run(run_dir)
    s = summarize(run)
    assert s.lr == 0.005 and s.lr_source == "run_card" and s.optimizer == "Adam"
    # the summary's numbers are the event files' ...
    thr = run.scalars["rpe/threshold"]
    assert s.final_threshold == thr.last and s.final_ratio == run.scalars["rpe/stability_ratio"].last
    assert s.final_preconditioned_sharpness == run.scalars["rpe/preconditioned_sharpness"].last
    # ... and agree with the optimizer used: 38 / 0.005 = 7600 at beta1 = 0.9
    assert thr.last == pytest.approx(38 / 0.005, rel=1e-6)
    assert threshold_label(run) == "38/lr (Adam, beta1=0.9)" == s.threshold_formula
    md = write_report([run_dir], out=tmp_path / "rep")["markdown"].read_text()
    assert "| Adam | 0.005 | run_card | 38/lr (Adam, beta1=0.9) | none |" in md


def test_run_card_written_to_every_logger_and_describes_sgd_momentum(tmp_path):
    model = MLPClassifier(hidden=(8,), optimizer="sgd", lr=0.02, momentum=0.9)
    csv = CSVLogger(save_dir=str(tmp_path), name="csv")
    run_dir = _fit(tmp_path, "sgd", model, [SharpnessMonitor(every_n_steps=4, prefix="m/")], loggers=[csv])
    card = read_run_card(run_dir)
    assert card == read_run_card(csv.log_dir)
    g = card["optimizer"]["groups"][0]
    assert (g["kind"], g["lr"], g["momentum"], g["nesterov"]) == ("heavy_ball", 0.02, 0.9, False)
    assert g["threshold_times_lr"] == pytest.approx(3.8)  # (2 + 2 beta) / lr and g["n_params"] == card["model"]["n_params"]
    assert card["prefix"] == "m/" and card["run"]["start_step"] == 0
    run = load_run(run_dir)  # the card's prefix is read back
    assert run.names.prefix == "m/" and summarize(run).measurements >= 2
    assert threshold_label(run) == "3.8/lr (SGD heavy-ball, momentum=0.9)"


def test_controller_runs_are_labelled_and_drawn(tmp_path):
    runs = []
    for enabled in (True, False):
        monitor = SharpnessMonitor(every_n_steps=1, top_k=1)
        ctl = InstabilityController(band=(1.1, 1.5), enabled=enabled)
        model = MLPClassifier(hidden=(8,), lr=0.5)
        runs.append(_fit(tmp_path, f"ctl_{enabled}", model, [monitor, ctl], steps=6))
    on, off = (load_run(r) for r in runs)
    assert on.label() == "SGD lr=0.5, controller band [1.1, 1.5]"
    assert off.label() == "SGD lr=0.5, controller disabled"
    s_on = summarize(on)
    lr_tag = on.scalars["rpe/lr"]
    assert s_on.controller == "band [1.1, 1.5]" and s_on.final_effective_lr == lr_tag.last
    assert s_on.final_lr_scale == on.scalars["rpe/lr_scale"].last
    assert lr_tag.last == pytest.approx(0.5 * s_on.final_lr_scale)
    res = write_report(runs, out=tmp_path / "rep")
    md = res["markdown"].read_text()
    assert "controller band [1.1, 1.5]" in md and "controller disabled" in md
    assert (tmp_path / "rep" / "sweep.png").is_file()


def test_resumed_fit_overwrites_the_card_with_the_restart_step(tmp_path):
    def trainer(steps):
        logger = TensorBoardLogger(save_dir=str(tmp_path), name="r", version=0, default_hp_metric=False)
        return pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=logger,
                          callbacks=[SharpnessMonitor(every_n_steps=2)], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)

    first = trainer(4)
    first.fit(MLPClassifier(hidden=(8,), lr=0.05), datamodule=DigitsDataModule(n_train=100))
    ckpt = tmp_path / "c.ckpt"
    first.save_checkpoint(ckpt)
    run_dir = Path(first.logger.log_dir)
    assert read_run_card(run_dir)["run"]["start_step"] == 0
    trainer(6).fit(MLPClassifier(hidden=(8,), lr=0.05), datamodule=DigitsDataModule(n_train=100), ckpt_path=ckpt)
    assert read_run_card(run_dir)["run"]["start_step"] == 4
    sharp = load_run(run_dir).scalars["rpe/sharpness"]
    assert len(sharp) == 4 and sorted(set(sharp.steps.tolist())) == sharp.steps.tolist()  # no step twice
