"""The dVAE update benchmark's harness (test preset): every mode runs the trainer's loss and writes its report."""
import sys

import pytest

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_dvae_step_quick(tmp_path):
    import bench_dvae_step

    out = tmp_path / "dvae_step"
    r = bench_dvae_step.main(["--preset", "test", "--batch", "2", "--repeats", "1", "--out", str(out)])
    assert set(r["seconds_per_update"]) == set(bench_dvae_step.MODES)
    assert all(t > 0 for t in r["seconds_per_update"].values())
    md = (tmp_path / "dvae_step.md").read_text()
    assert (tmp_path / "dvae_step.json").is_file() and md.count("| bf16") == 2 and "1.00×" in md


def test_bench_dvae_step_rejects_unknown_mode():
    import bench_dvae_step

    with pytest.raises(SystemExit):
        bench_dvae_step.main(["--modes", "fp8 NCHW"])
