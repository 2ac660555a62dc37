"""The PowerSGD benchmark's harness in its quick mode: it runs, and what it measures is consistent (the compression
rate it measures is the formula's; the compressed reduction sends fewer bytes across machines than fp32)."""
import json
import subprocess
import sys

import pytest

from launch_utils import ROOT

pytestmark = pytest.mark.distributed


def test_bench_powersgd_quick(tmp_path):
    out = tmp_path / "psgd"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_powersgd.py"), "--quick", "--parts",
                    "reduce,orth", "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    res = json.loads(out.with_suffix(".json").read_text())
    r = res["reduce"]
    assert r["compression_rate_measured"] == pytest.approx(r["compression_rate_formula_fused_qkv"], rel=0.01)
    assert r["powersgd"]["bytes_inter"] + r["powersgd"]["bytes_uncompressed"] < r["fp32_allreduce"]["bytes_baseline"]
    z3, full = r["powersgd_zero3"], r["powersgd"]  # the ZeRO-3 partitions skip the all-gather inside the machine
    assert z3["bytes_inter"] == full["bytes_inter"] and z3["bytes_intra"] < 0.8 * full["bytes_intra"]
    assert 2 * r["powersgd_bf16"]["bytes_intra"] == full["bytes_intra"]  # bf16 gradients travel as bf16
    assert {x["method"] for x in res["orth"]} == {"householder", "qr", "gram_schmidt"}
    assert all(x["orth_error_well"] < 1e-5 for x in res["orth"])
    assert "| powersgd |" in out.with_suffix(".md").read_text()
