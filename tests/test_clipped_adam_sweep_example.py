"""examples/clipped_adam_sweep.py runs in its --smoke configuration and writes its table."""

import importlib.util
import json
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_clipped_adam_sweep_smoke(tmp_path, capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location("example_clipped_adam_sweep", EXAMPLES / "clipped_adam_sweep.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(EXAMPLES))
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["arm"] for r in results] == ["Adam", "abs p99", "rel q=0.9", "GD"]
    for r in results:
        assert not r["diverged"] and r["lambda_max"] > 0 and 0 <= r["test_acc"] <= 1 and r["max_ratio"] > 0
    adam, absolute, relative, _ = results
    assert absolute["clip"] == adam["calibrated_p99"] > 0
    assert 0 < absolute["clip_fraction"] < 0.5
    assert abs(relative["clip_fraction"] - 0.1) < 0.01  # q = 0.9: about 10% clipped
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("ClippedAdam sweep") and "rel q=0.9" in table and "rel q=0.9" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert mod.main(["--out", str(merged), "--merge", str(tmp_path / "results.json")]) == 0
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert [ln for ln in (merged / "results.md").read_text().splitlines() if ln.startswith("| ")] == rows
