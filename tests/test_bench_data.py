"""benchmarks/bench_data.py runs (tiny shapes) and reports every crop mode."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_data  # noqa: E402


def test_bench_data_reports_each_mode(tmp_path):
    out = tmp_path / "data"
    result = bench_data.main(["--photo", "40x30", "--size", "16", "--n", "3", "--repeats", "1", "--out", str(out)])
    assert set(result["seconds_per_image"]) == set(bench_data.MODES)
    assert all(t > 0 for t in result["seconds_per_image"].values())
    assert json.loads(Path(f"{out}.json").read_text())["photo"] == [40, 30]
    assert "| prior (Listing 2) |" in Path(f"{out}.md").read_text()
    with pytest.raises(SystemExit):
        bench_data.parse_args(["--photo", "40by30"])
