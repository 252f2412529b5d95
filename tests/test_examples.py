"""Every example script runs in its tiny --smoke configuration and writes its results table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.parametrize("name, n_runs", [("edge_of_stability", 1), ("lr_sweep", 2), ("batch_size_sweep", 2)])
def test_example_smoke(name, n_runs, tmp_path, capsys):
    mod = _load(name)
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0].startswith(("Edge of stability", "LR sweep", "Batch-size sweep"))
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert len(rows) == n_runs + 1 and all(row in out for row in rows)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == n_runs
    for r in results:
        assert r["measurements"] >= 2 and r["final_sharpness"] > 0 and 0 <= r["test_acc"] <= 1
        assert abs(r["threshold"] - 2 / r["lr"]) < 1e-9
        assert Path(r["run_dir"]).is_dir()
    if name == "lr_sweep":
        assert (tmp_path / "report" / "sweep.png").is_file()
        assert all(0 <= r["similarity_to_first"] <= 1 for r in results)
