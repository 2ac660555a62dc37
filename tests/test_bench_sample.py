"""The sampling benchmark's harness runs on CPU (test preset) and reports consistent rows (timings are not checked)."""
import sys

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_sample_quick(tmp_path):
    import bench_sample

    out = tmp_path / "sample"
    result = bench_sample.main(["--quick", "--reps", "1", "--out", str(out)])
    assert [r["batch"] for r in result["rows"]] == [1, 4]
    assert result["copy_gb_per_s"] > 0 and result["matmul_tflops_per_s"] > 0
    for r in result["rows"]:
        assert r["cached_s"] > 0 and r["uncached_s"] > 0
        assert abs(r["share_sample"] + r["share_decode"] + r["share_rerank"] - 1) < 1e-9
        assert r["floor_images_per_s"] == r["batch"] / r["floor_s"] and r["floor_bytes"] > 0 < r["floor_flops"]
    assert "Floor: a perfect cached sampler" in (tmp_path / "sample.md").read_text()
    assert (tmp_path / "sample.json").is_file() and "| batch |" in (tmp_path / "sample.md").read_text()


def test_markdown_shows_the_cuda_graph_columns_when_measured():
    import bench_sample

    base = {"batch": 8, "cached_images_per_s": 2.0, "share_sample": 0.9, "share_decode": 0.05, "share_rerank": 0.05}
    result = {"preset": "350M", "device_name": "GPU", "dtype": "bfloat16", "image_tokens": 1024, "reps": 3,
              "command": "c", "rows": [dict(base, graph_images_per_s=6.0, graph_speedup=3.0, floor_images_per_s=24.0),
                                       dict(base, batch=16)]}
    rows = [line for line in bench_sample.markdown(result).splitlines() if line.startswith("| 8 ") or
            line.startswith("| 16 ")]
    assert rows[0].split("|")[2:7] == [" 2 ", " 6 ", " 3.00x ", " 24 ", " 25.0% "]  # best of the two: the graph
    assert rows[1].split("|")[2:7] == [" 2 ", " - ", " - ", " - ", " - "]  # no graph (CPU), no floor
    assert "drew other codes" not in bench_sample.markdown(result)
    result["rows"][0]["graph_matches_eager"] = False
    assert "drew other codes than eager sampling** at batch [8]" in bench_sample.markdown(result)
