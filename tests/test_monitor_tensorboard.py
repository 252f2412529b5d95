"""SharpnessMonitor with TensorBoard: event files (tags, steps, custom-scalars layout) and a live server."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from lit_models import TinyMLP, make_dataset, make_loader, make_trainer

from lightning_rpe import SharpnessMonitor

LAYOUT_TAG = "custom_scalars__config__"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SharpnessMonitor]:
    root = tmp_path_factory.mktemp("tb")
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(root, name="run", version=0)
    monitor = SharpnessMonitor(every_n_steps=2, top_k=3, probe_size=16)
    trainer = make_trainer([monitor], max_steps=6, logger=logger, log_every_n_steps=2)
    trainer.fit(TinyMLP(optimizer="momentum", group_lrs=(0.05, 0.02)), make_loader(make_dataset(32), 8, shuffle=True))
    return Path(logger.log_dir), monitor


def _accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_event_file_tags_steps_and_layout(run_dir) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    log_dir, monitor = run_dir
    acc = _accumulator(log_dir)
    tags = set(acc.Tags()["scalars"])
    expected = {"rpe/sharpness", "rpe/eig_1", "rpe/eig_2", "rpe/eig_3", "rpe/lambda_min", "rpe/threshold",
                "rpe/stability_ratio", "rpe/threshold/pg1", "rpe/threshold/pg2", "rpe/stability_ratio/pg1",
                "rpe/stability_ratio/pg2", "rpe/rotation_cos", "rpe/rotation_angle", "rpe/subspace_similarity",
                "rpe/subspace_similarity_to_first", "rpe/polarity", "rpe/polarity_flips", "rpe/grad_alignment", "rpe/hvps", "rpe/measure_seconds",
                "rpe/probe_loss"}
    assert expected <= tags, expected - tags
    # x = updates applied to the parameters a value describes: fit start (x 0) and after steps 2, 4, 6;
    # train_loss of batches 2, 4, 6 was computed on the parameters after 1, 3, 5 updates
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 3, 5]
    assert [e.step for e in acc.Scalars("rpe/sharpness")] == [0, 2, 4, 6]
    assert [e.step for e in acc.Scalars("rpe/rotation_cos")] == [2, 4, 6]
    # similarity to the first (fit-start) subspace: 1 at the first measurement, then in [0, 1]
    to_first = [e.value for e in acc.Scalars("rpe/subspace_similarity_to_first")]
    assert len(to_first) == 4 and to_first[0] == pytest.approx(1.0) and all(0.0 <= v <= 1.0 + 1e-6 for v in to_first)
    assert acc.Scalars("rpe/eig_3")[-1].value == pytest.approx(monitor.latest.eigenvalues[2], rel=1e-6)

    events = acc.Tensors(LAYOUT_TAG)
    assert events, "no custom-scalars layout written"
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[-1].tensor_proto.string_val[0])
    charts = {c.title: [t for t in c.multiline.tag] for cat in layout.category for c in cat.chart}
    assert [cat.title for cat in layout.category] == ["rpe/curvature"]
    assert set(charts) == {"sharpness vs stability threshold", "spectrum: top-k and lambda_min", "stability ratio",
                           "rotation and polarity (degrees)", "rotation cosines and alignment",
                           "solver residuals and product checks", "crossings, backend, unverified",
                           "ClippedAdam: fraction clipped and clip level"}

    def matched(title: str) -> set[str]:
        return {t for t in tags for rx in charts[title] if re.search(rx, t)}

    assert matched("sharpness vs stability threshold") == {"rpe/sharpness", "rpe/threshold", "rpe/threshold/pg1",
                                                           "rpe/threshold/pg2"}
    assert matched("spectrum: top-k and lambda_min") == {"rpe/eig_1", "rpe/eig_2", "rpe/eig_3", "rpe/lambda_min"}
    assert matched("rotation and polarity (degrees)") == {"rpe/rotation_angle", "rpe/polarity"}
    assert matched("rotation cosines and alignment") == {"rpe/rotation_cos", "rpe/subspace_similarity",
                                                         "rpe/subspace_similarity_to_first", "rpe/grad_alignment"}
    assert matched("stability ratio") == {"rpe/stability_ratio", "rpe/stability_ratio/pg1", "rpe/stability_ratio/pg2"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


def test_tensorboard_server_serves_the_tags_and_layout(run_dir) -> None:
    log_dir, _ = run_dir
    binary = shutil.which("tensorboard")
    if binary is None:
        pytest.skip("the tensorboard executable is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--logdir", str(log_dir.parent), "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false",
         "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        tags: dict = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if any("rpe/sharpness" in run_tags for run_tags in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        run_tags = next((t for t in tags.values() if "rpe/sharpness" in t), None)
        assert run_tags is not None, f"no rpe tags served within 90 s: {tags}"
        assert {"rpe/sharpness", "rpe/threshold", "rpe/lambda_min", "rpe/polarity", "train_loss"} <= set(run_tags)
        run = next(r for r, t in tags.items() if "rpe/sharpness" in t)
        series = _get_json(f"{base}/data/plugin/scalars/scalars?run={urllib.parse.quote(run)}&tag=rpe/sharpness")
        assert [int(point[1]) for point in series] == [0, 2, 4, 6]
        layout = _get_json(f"{base}/data/plugin/custom_scalars/layout")
        titles = [c["title"] for cat in layout["category"] for c in cat["chart"]]
        assert "sharpness vs stability threshold" in titles and "spectrum: top-k and lambda_min" in titles
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait(timeout=5)


def test_custom_scalar_categories_of_several_callbacks_are_merged(tmp_path: Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    from lightning_rpe.callbacks import _logging

    class Other(pl.Callback):  # e.g. the InstabilityController registering its own chart
        def on_train_start(self, trainer, pl_module):
            _logging.add_custom_scalars(trainer, {"controller": {"lr factor": ["^ctrl/factor$"]}})

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = make_trainer([SharpnessMonitor(every_n_steps=1, probe_size=8), Other()], max_steps=1, logger=logger)
    trainer.fit(TinyMLP(), make_loader(make_dataset(8), 8))
    events = _accumulator(Path(logger.log_dir)).Tensors(LAYOUT_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[-1].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["rpe/curvature", "controller"]
