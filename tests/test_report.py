"""report: reads event files back, writes valid figures and a summary whose numbers match."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from lightning_rpe.report import (
    ReportError,
    find_runs,
    load_run,
    summarize,
    write_report,
)
from lightning_rpe.report.figures import (
    figure_labels,
    sharpness_figure,
    spectrum_figure,
    sweep_figure,
)


def _synthetic_run(path, lr, n=40, rotate=True, seed=0, with_first=True, hparams=True):
    """Event file shaped like the monitor's output: EoS sharpening to 2/lr, spectrum, rotation."""
    rng = np.random.default_rng(seed)
    w = SummaryWriter(str(path))
    thr = 2.0 / lr
    values = {}
    flips = 0
    prev_pol = None
    for i in range(n):
        step = i * 25
        sharp = min(thr * (0.3 + 0.02 * i), thr * (1 + 0.03 * rng.standard_normal()))
        pol = ((-1) ** i) * 0.01 * (1 + i / 10)
        if prev_pol is not None and np.sign(pol) != np.sign(prev_pol):
            flips += 1
        prev_pol = pol
        row = {
            "rpe/sharpness": sharp, "rpe/threshold": thr, "rpe/stability_ratio": sharp / thr,
            "rpe/eig_1": sharp, "rpe/eig_2": 0.7 * sharp, "rpe/eig_3": 0.4 * sharp,
            "rpe/lambda_min": -0.05 * sharp * (1 + abs(rng.standard_normal())),
            "rpe/rotation_cos": 1 - 10 ** rng.uniform(-6, -1), "rpe/rotation_angle": rng.uniform(0, 30),
            "rpe/subspace_similarity": rng.uniform(0.8, 1.0), "rpe/polarity": pol, "rpe/polarity_flips": flips,
            "rpe/hvps": float(rng.integers(5, 30)), "rpe/measure_seconds": rng.uniform(0.01, 0.1),
        }
        if with_first:
            row["rpe/subspace_similarity_to_first"] = 1 - i / n * (0.6 if rotate else 0.2)
        for tag, v in row.items():
            w.add_scalar(tag, v, step)
            values.setdefault(tag, []).append((step, float(np.float32(v))))
        w.add_scalar("train_loss", 1.0 / (1 + i), step)
        values.setdefault("train_loss", []).append((step, float(np.float32(1.0 / (1 + i)))))
    w.add_scalar("test_acc", 0.9 + lr, n * 25)
    values["test_acc"] = [(n * 25, float(np.float32(0.9 + lr)))]
    w.close()
    if hparams:
        (path / "hparams.yaml").write_text(f"lr: {lr}\nhidden:\n- 200\n- 200\n")
    return values


def test_summary_numbers_equal_event_files(tmp_path):
    run = tmp_path / "lr_0.05"
    vals = _synthetic_run(run, 0.05)
    data = load_run(run)
    s = summarize(data)
    sharp = [v for _, v in vals["rpe/sharpness"]]
    assert s.lr == 0.05 and s.lr_source == "hparams.yaml:lr"
    assert s.measurements == len(sharp) == 40
    assert s.final_step == 39 * 25
    assert s.final_sharpness == pytest.approx(sharp[-1], rel=1e-6)
    assert s.max_sharpness == pytest.approx(max(sharp), rel=1e-6)
    assert s.final_ratio == pytest.approx(vals["rpe/stability_ratio"][-1][1], rel=1e-6)
    assert s.min_lambda_min == pytest.approx(min(v for _, v in vals["rpe/lambda_min"]), rel=1e-6)
    assert s.total_hvps == pytest.approx(sum(v for _, v in vals["rpe/hvps"]))
    assert s.polarity_flips == vals["rpe/polarity_flips"][-1][1] == 39
    assert s.test_acc == pytest.approx(vals["test_acc"][0][1]) and s.test_acc_tag == "test_acc"
    assert s.final_train_loss == pytest.approx(vals["train_loss"][-1][1])
    assert s.final_subspace_similarity_to_first == pytest.approx(vals["rpe/subspace_similarity_to_first"][-1][1])
    assert s.rotated is True


def test_report_files_and_markdown(tmp_path):
    runs = []
    for i, lr in enumerate((0.02, 0.05, 0.1)):
        d = tmp_path / "sweep" / f"lr_{lr}"
        _synthetic_run(d, lr, rotate=lr > 0.03, seed=i)
        runs.append(d)
    out = tmp_path / "out"
    res = write_report([tmp_path / "sweep"], out=out)
    assert len(res["summaries"]) == 3
    names = sorted(p.name for p in out.glob("*.png"))
    assert "sweep.png" in names and len(names) == 3 * 3 + 1
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            w, h = im.size
            assert 600 <= w <= 2000 and 400 <= h <= 2000, (p.name, im.size)
        assert p.stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [s["lr"] for s in summary] == [0.02, 0.05, 0.1]
    assert [s["rotated"] for s in summary] == [False, True, True]
    for s in summary:
        assert f"{s['final_sharpness']:.4g}" in md
        assert f"![{s['name']}_sharpness]" in md
    assert "![sweep](sweep.png)" in md


def test_default_output_folder_and_missing_tags(tmp_path):
    run = tmp_path / "plain"
    w = SummaryWriter(str(run))
    for step in range(5):
        w.add_scalar("train_loss", 1.0 / (step + 1), step)
    w.close()
    res = write_report([run])
    assert res["out"] == (run / "report").resolve()
    s = res["summaries"][0]
    assert s.measurements == 0 and s.final_sharpness is None and s.rotated is None and s.lr is None
    assert s.final_train_loss == pytest.approx(0.2)
    assert len(res["figures"]) == 3  # figures still drawn, panels say what was not logged
    assert "| - |" in (res["markdown"]).read_text()


def test_lr_from_logged_learning_rate_and_val_acc_fallback(tmp_path):
    run = tmp_path / "r"
    w = SummaryWriter(str(run))
    w.add_scalar("lr-SGD", 0.07, 0)
    w.add_scalar("rpe/sharpness", 10.0, 0)
    w.add_scalar("val_acc", 0.5, 3)
    w.add_scalar("val_acc", 0.75, 7)
    w.close()
    s = summarize(load_run(run))
    assert s.lr == pytest.approx(0.07) and s.lr_source == "lr-SGD"
    assert s.test_acc == 0.75 and s.test_acc_tag == "val_acc"


def test_resumed_run_last_value_per_step_wins(tmp_path):
    run = tmp_path / "r"
    w = SummaryWriter(str(run))
    w.add_scalar("rpe/sharpness", 1.0, 0)
    w.add_scalar("rpe/sharpness", 2.0, 10)
    w.close()
    w = SummaryWriter(str(run))
    w.add_scalar("rpe/sharpness", 3.0, 10)
    w.add_scalar("rpe/sharpness", 4.0, 20)
    w.close()
    s = load_run(run).scalars["rpe/sharpness"]
    assert s.steps.tolist() == [0, 10, 20] and s.values.tolist() == [1.0, 3.0, 4.0]


def test_errors(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        find_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no TensorBoard event files"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(ReportError, match="at least one"):
        write_report([])
    with pytest.raises(ValueError, match="rotation_threshold"):
        _synthetic_run(tmp_path / "x", 0.1, n=2)
        write_report([tmp_path / "x"], rotation_threshold=0)
    assert not math.isnan(0.0)


def test_lr_read_from_hparams_with_python_tuple_tags(tmp_path):
    # Lightning writes tuples (e.g. Adam betas) as !!python/tuple, which a plain safe_load refuses
    run = tmp_path / "lr_0.2"
    _synthetic_run(run, 0.2, hparams=False)
    (run / "hparams.yaml").write_text("betas: !!python/tuple\n- 0.9\n- 0.999\nlr: 0.2\n")
    s = summarize(load_run(run))
    assert s.lr == 0.2 and s.lr_source == "hparams.yaml:lr"


def test_event_files_read_in_writing_order_not_name_order(tmp_path):
    # Two writers in the same second of one process: the file names differ only in the counter
    # (".9" then ".10"), which sorts the second file first as text. The later value must win.
    run = tmp_path / "r"
    paths = []
    for values in (((0, 1.0), (10, 2.0)), ((10, 3.0), (20, 4.0))):
        w = SummaryWriter(str(run), filename_suffix=f".tmp{len(paths)}")
        for step, v in values:
            w.add_scalar("rpe/sharpness", v, step)
        w.close()
        (new,) = [p for p in run.iterdir() if p.name.endswith(f".tmp{len(paths)}")]
        paths.append(new)
    for counter, p in zip((9, 10), paths):
        p.rename(run / f"events.out.tfevents.1700000000.host.123.{counter}")
    assert min(p.name for p in run.iterdir()).endswith(".10")  # text order is the wrong order
    s = load_run(run).scalars["rpe/sharpness"]
    assert s.steps.tolist() == [0, 10, 20] and s.values.tolist() == [1.0, 3.0, 4.0]


def test_other_prefix_is_read_back(tmp_path):
    run = tmp_path / "p"
    w = SummaryWriter(str(run))
    for step, v in ((0, 5.0), (10, 7.5)):
        w.add_scalar("curv/sharpness", v, step)
        w.add_scalar("curv/threshold", 40.0, step)
        w.add_scalar("curv/stability_ratio", v / 40.0, step)
        w.add_scalar("curv/lambda_min", -0.5 - step, step)
    w.close()
    s = summarize(load_run(run, prefix="curv/"))
    assert s.final_sharpness == 7.5 and s.final_threshold == 40.0 and s.measurements == 2
    assert s.min_lambda_min == pytest.approx(-10.5) and s.min_lambda_min_step == 10  # step 0 is the warm-up
    assert summarize(load_run(run)).final_sharpness is None  # default prefix: nothing of it
    (run / "run_card.json").write_text(json.dumps({"format": 1, "prefix": "curv/"}))
    assert summarize(load_run(run)).final_sharpness == 7.5  # the run card's prefix is the default
    res = write_report([run], out=tmp_path / "rep", prefix="curv/")
    assert "7.5" in res["markdown"].read_text()


def test_lambda_min_after_warmup_and_residuals(tmp_path):
    run = tmp_path / "lm"
    w = SummaryWriter(str(run))
    rows = [(0, -2.0, 0.01), (100, -0.3, 0.05), (200, 0.04, 0.1), (300, -0.2, 0.5), (1000, -0.1, 0.01)]
    for step, lam, res in rows:
        w.add_scalar("rpe/sharpness", 10.0, step)
        w.add_scalar("rpe/sharpness_residual", 0.02, step)
        w.add_scalar("rpe/lambda_min", lam, step)
        w.add_scalar("rpe/lambda_min_residual", res, step)
    w.close()
    data = load_run(run)
    s = summarize(data)  # warm-up: the first 10% of steps 0..1000, i.e. before step 100
    assert s.warmup_step == 100 and s.min_lambda_min == pytest.approx(-0.3) and s.min_lambda_min_step == 100
    assert s.min_lambda_min_residual == pytest.approx(0.05) and s.lambda_min_resolved is True
    assert s.final_sharpness_residual == pytest.approx(0.02)
    s = summarize(data, warmup=0.25)
    assert s.min_lambda_min == pytest.approx(-0.2) and s.lambda_min_resolved is False  # -0.2 + 0.5 >= 0
    res = write_report([run], out=tmp_path / "rep", warmup=0.25)
    md = res["markdown"].read_text()
    assert "-0.2 ± 0.5" in md and "no negative curvature resolved" in md
    with pytest.raises(ValueError, match="warmup"):
        write_report([run], warmup=1.0)


def test_non_finite_values_from_other_writers_do_not_poison_the_summary(tmp_path):
    # The monitor writes finite values only, but event files written or merged by other tools may hold
    # NaN: one made the maximum sharpness, maximum ratio and product total "nan", and the lowest
    # lambda_min after the warm-up "nan ± 0.01" ("no negative curvature resolved") in a review's run.
    run = tmp_path / "nan"
    w = SummaryWriter(str(run))
    rows = [(0, 4.0, -0.1, 10), (5, math.nan, math.nan, math.nan), (10, 6.0, -0.5, 12), (15, 5.0, -0.2, 9)]
    for step, sharp, lam, hvps in rows:
        w.add_scalar("rpe/sharpness", sharp, step)
        w.add_scalar("rpe/stability_ratio", sharp / 5.0, step)
        w.add_scalar("rpe/lambda_min", lam, step)
        w.add_scalar("rpe/lambda_min_residual", 0.01, step)
        w.add_scalar("rpe/hvps", hvps, step)
    w.close()
    s = summarize(load_run(run))
    assert s.max_sharpness == pytest.approx(6.0) and s.max_ratio == pytest.approx(1.2)
    assert s.total_hvps == pytest.approx(31.0)
    assert s.min_lambda_min == pytest.approx(-0.5) and s.min_lambda_min_step == 10
    assert s.lambda_min_resolved is True


def _card(path, kind, name, lr, beta=None, controller=None, prefix="rpe/"):
    num = {"gd": 2.0, "adam": (2 + 2 * 0.9) / 0.1}.get(kind, 2.0)
    card = {"format": 1, "prefix": prefix, "controller": controller, "run": {"seed": "0"},
            "optimizer": {"name": name, "class": f"x.{name}",
                          "groups": [{"index": 0, "kind": kind, "lr": lr, "threshold": num / lr,
                                      "threshold_times_lr": num, "preconditioned": kind == "adam", "beta": beta}]}}
    (path / "run_card.json").write_text(json.dumps(card))


def test_figure_labels_follow_the_optimizer_in_use(tmp_path):
    gd, adam = tmp_path / "gd", tmp_path / "adam"
    _synthetic_run(gd, 0.05, n=6)
    _card(gd, "gd", "SGD", 0.05)
    w = SummaryWriter(str(adam))
    for step in range(0, 100, 20):
        w.add_scalar("rpe/sharpness", 27.0, step)
        w.add_scalar("rpe/preconditioned_sharpness", 7000.0 + step, step)
        w.add_scalar("rpe/threshold", 7600.0, step)
        w.add_scalar("rpe/stability_ratio", (7000.0 + step) / 7600.0, step)
    w.close()
    _card(adam, "adam", "Adam", 0.005, beta=0.9)
    labels = " | ".join(figure_labels(sharpness_figure(load_run(gd))))
    assert "stability threshold 2/lr (GD)" in labels and "stability ratio = sharpness / threshold" in labels
    assert "preconditioned" not in labels and "SGD lr=0.05, no controller" in labels
    fig = sharpness_figure(load_run(adam))
    labels = " | ".join(figure_labels(fig))
    assert "stability threshold 38/lr (Adam, beta1=0.9)" in labels and "2/lr" not in labels
    assert "stability ratio = preconditioned sharpness / threshold" in labels
    # raw lambda_max on its own axes, not on the preconditioned one
    (main,) = [ax for ax in fig.axes if ax.get_ylabel().startswith("preconditioned sharpness")]
    (raw,) = [ax for ax in fig.axes if ax.get_ylabel().startswith(r"$\lambda_{max}(H)$")]
    assert main is not raw and raw.get_ylim()[1] < 100 < main.get_ylim()[1]
    # the threshold is not drawn on the eigenvalues of H for Adam (it applies to the preconditioned one)
    spectrum = figure_labels(spectrum_figure(load_run(adam)))
    assert not any(t.startswith("stability threshold") for t in spectrum)
    assert any("applies to the preconditioned sharpness" in t for t in spectrum)


def test_coming_metrics_are_drawn_when_present(tmp_path):
    run = tmp_path / "all"
    w = SummaryWriter(str(run))
    for i, step in enumerate(range(0, 200, 20)):
        for tag, v in {"rpe/sharpness": 30.0 + i, "rpe/threshold": 40.0, "rpe/stability_ratio": (30.0 + i) / 40,
                       "rpe/batch_sharpness": 35.0 + i, "rpe/batch_sharpness_se": 2.0,
                       "rpe/batch_sharpness_ratio": (35.0 + i) / 40, "rpe/eig_1": 30.0 + i, "rpe/eig_2": 20.0,
                       "rpe/eigenvalue_crossings": i // 3, "rpe/clip_fraction/pg1": 0.1 * (i % 3),
                       "rpe/clip_fraction/pg2": 0.05, "rpe/clip_level/pg1": 1e-3, "rpe/rollbacks": i // 4,
                       "rpe/finite_difference": float(i == 5), "rpe/verify_error": 1e-6 * (i + 1),
                       "rpe/lr": 0.05, "rpe/lr_scale": 1.0}.items():
            w.add_scalar(tag, v, step)
    w.close()
    data = load_run(run)
    labels = " | ".join(figure_labels(sharpness_figure(data)) + figure_labels(spectrum_figure(data)))
    for needle in ("batch sharpness (bars: standard error)", "batch sharpness / threshold",
                   "clip fraction pg1", "clip fraction pg2", "controller rollback", "finite differences",
                   "verify error", "eigenvalue crossings", "effective lr", "controller factor"):
        assert needle in labels, needle
    s = summarize(data)
    assert (s.eigenvalue_crossings, s.rollbacks, s.finite_difference_measurements) == (3.0, 2.0, 1)
    assert s.final_batch_sharpness == 44.0 and s.final_clip_fraction == pytest.approx(0.0)
    assert s.max_verify_error == pytest.approx(1e-5)
    md = write_report([run], out=tmp_path / "rep")["markdown"].read_text()
    assert "eigenvalue crossings" in md and "rollbacks" in md and "max verify error" in md
    # a run without them gets neither the columns nor the panels
    _synthetic_run(tmp_path / "plain", 0.05, n=4)
    md = write_report([tmp_path / "plain"], out=tmp_path / "rep2")["markdown"].read_text()
    assert "rollbacks" not in md and "verify error" not in md and "eigenvalue crossings" not in md
    labels = " | ".join(figure_labels(sharpness_figure(load_run(tmp_path / "plain"))))
    assert "batch sharpness" not in labels and "clip fraction" not in labels and "effective lr" not in labels


def test_sweep_groups_seeds_by_lr_with_spread(tmp_path):
    dirs = []
    for lr in (0.02, 0.05):
        for seed in range(3):
            d = tmp_path / f"lr{lr}_s{seed}"
            _synthetic_run(d, lr, n=5, seed=seed)
            _card(d, "gd", "SGD", lr)
            dirs.append(d)
    summaries = [summarize(load_run(d)) for d in dirs]
    fig = sweep_figure(summaries, 0.7)
    labels = figure_labels(fig)
    assert "SGD, no controller (mean ± sd over 3 runs per lr)" in labels
    assert "threshold 2/lr (GD)" in labels
    ax, ax_a = fig.axes[:2]
    assert ax.get_xlim() == ax_a.get_xlim()  # one x range for both panels
    (bars,) = [c for c in ax.containers]
    means = bars.lines[0].get_ydata()
    for lr, mean in zip((0.02, 0.05), means):
        vals = [s.final_sharpness for s in summaries if s.lr == lr]
        assert mean == pytest.approx(np.mean(vals))
