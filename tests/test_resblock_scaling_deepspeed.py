"""Per-resblock scaling under DeepSpeed ZeRO (one CPU rank per stage, in a subprocess: tests/zero_unscale_worker.py):
the gradients ZeRO holds after the backward equal the unscaled fp32 ones, and an overflow inside one resblock makes
DeepSpeed skip the step (parameters unchanged) while the scaler flags that block only."""
import json
import os
import subprocess
import sys

import pytest

from launch_utils import ROOT, free_port

pytestmark = [pytest.mark.distributed]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_sees_unscaled_gradients_and_skips_on_overflow(stage, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "zero_unscale_worker.py"), str(stage),
                           str(free_port()), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert max(r["rel"].values()) < 5e-3, r["rel"]  # fp16 branches vs fp32, after unscaling
    assert r["clean_skip"] is False
    assert r["flag_skip"] is True and r["flags"] == [k == 3 for k in range(8)]
    assert r["ds_skipped"] == 1 and r["unchanged"] is True
