"""The position probe's harness runs and reports held-out accuracy (learning is the benchmark's job, not a test's)."""
import sys

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_clip_position_probe_quick():
    import clip_position_probe

    out = clip_position_probe.main(["--steps", "2", "--scenes", "120", "--every", "1", "--batch", "8"])
    assert [h["step"] for h in out["history"]] == [1, 2]
    assert all(0.0 <= h["held_out_accuracy"] <= 1.0 and h["loss"] > 0 for h in out["history"])
