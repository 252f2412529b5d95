"""examples/controller_sweep.py runs in its --smoke configuration and tabulates what it ran."""

import json

from test_examples import _load


def test_controller_sweep_smoke(tmp_path):
    mod = _load("controller_sweep")
    assert mod.main(["--experiment", "trajectories", "--smoke", "--out", str(tmp_path)]) == 0
    assert mod.main(["--experiment", "controller", "--gauges", "batch_sharpness", "--smoke", "--out", str(tmp_path)]) == 0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 8
    for r in runs:
        assert r["rows"] and all(row["sharpness"] > 0 for row in r["rows"])
        assert 0 <= r["test_acc"] <= 1 and not r["diverged"]
    controlled = [r for r in runs if r["gauge"] != "none"]
    assert {r["active_gauge"] for r in controlled} == {"batch_sharpness"}
    assert all(r["rows"][0]["bs"] > 0 for r in runs if r["batch"] < 1000)
    # nothing new to run: a second call appends nothing
    assert mod.main(["--experiment", "trajectories", "--smoke", "--out", str(tmp_path)]) == 0
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 8
    assert mod.main(["--table", "--steps", "30", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "### Uncontrolled" in table and "### Controller" in table
