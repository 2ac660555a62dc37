"""The underflow benchmark's harness (tiny model): its modes, the settled scales, and the direction of the effect."""
import sys

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_underflow_quick(tmp_path):
    import bench_underflow

    out = tmp_path / "underflow"
    r = bench_underflow.main(["--quick", "--out", str(out)])
    nb = r["model"]["resblocks"]
    assert nb == 6 and len(r["per_block_settled_log2"]) == nb
    assert all(7 <= v <= 24 for v in r["per_block_settled_log2"])
    assert min(r["per_block_settled_log2"]) >= min(24, r["global_settled_log2"])  # no block is worse off
    res = r["results"]
    mean = {m: sum(x["flushed"] for x in rows) / nb for m, rows in res.items()}
    # plain fp16 (scale 1) flushes activation gradients to zero; scaling recovers most of them
    assert mean["none"] > 0.01 and mean["per-block settled"] < 0.25 * mean["none"]
    if r["global_settled_log2"] <= 24:  # every per-block scale is then ≥ the global one: never more underflow
        assert mean["per-block settled"] <= mean[next(m for m in res if m.startswith("global settled"))] + 1e-9
    assert all(x["nonfinite"] == 0 for rows in res.values() for x in rows)  # the settled scales do not overflow
    assert (tmp_path / "underflow.json").is_file() and "| mode |" in (tmp_path / "underflow.md").read_text()
