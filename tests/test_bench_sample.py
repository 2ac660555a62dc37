"""The sampling benchmark's harness runs on CPU (test preset) and reports consistent rows (timings are not checked)."""
import sys

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_sample_quick(tmp_path):
    import bench_sample

    out = tmp_path / "sample"
    result = bench_sample.main(["--quick", "--reps", "1", "--out", str(out)])
    assert [r["batch"] for r in result["rows"]] == [1, 4]
    for r in result["rows"]:
        assert r["cached_s"] > 0 and r["uncached_s"] > 0
        assert abs(r["share_sample"] + r["share_decode"] + r["share_rerank"] - 1) < 1e-9
    assert (tmp_path / "sample.json").is_file() and "| batch |" in (tmp_path / "sample.md").read_text()
