"""The prior under the real `deepspeed` launcher (2 CPU ranks, ZeRO-3, DeepSpeed fp32 mode) with fp16 resblocks and
per-resblock gradient scaling: it learns, every block's scale is logged, and a resumed run continues the scales from
the checkpoint."""
import json
import subprocess
import sys

import pytest

from launch_utils import ROOT, deepspeed_launch
from unit_shards import write_unit_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _history(run):
    return {h["step"]: h for h in json.loads((run / "dalle_metrics.json").read_text())["history"]}


def _ds_config(tmp_path, stage: int):
    cfg = json.loads((ROOT / "ds_configs" / "cpu_dalle.json").read_text())
    cfg["zero_optimization"] = {"stage": stage}
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


def _args(cfg, root, out, *extra):
    return ["--deepspeed_config", str(cfg), "--preset", "test",
            "--set", f"data.train_tokens={root / 'train'}", "--set", f"data.val_tokens={root / 'val'}",
            "--set", "model.resblock_grad_scaling=true", "--set", "model.resblock_dtype=float16",
            "--set", "model.activation_checkpointing=true",
            "--set", "steps=60", "--set", "save_every=30", "--set", "log_every=1", "--out", str(out), *extra]


def test_zero3_fp16_resblock_scaling_learns_logs_and_resumes(tmp_path):
    write_unit_shards(tmp_path / "train", 512, 0)
    write_unit_shards(tmp_path / "val", 64, 1)
    cfg, run = _ds_config(tmp_path, 3), tmp_path / "run"
    deepspeed_launch("launch/train_dalle.py", _args(cfg, tmp_path, run, "--stop_at", "30"))
    deepspeed_launch("launch/train_dalle.py", _args(cfg, tmp_path, run))
    h = _history(run)
    assert sorted(h) == list(range(31, 61))  # the resumed part (the first part is in the partial metrics)
    first = json.loads((run / "dalle_partial_metrics.json").read_text())["history"]
    h.update({r["step"]: r for r in first})
    n_blocks = 2 * 4  # preset "test": 4 layers
    keys = [k for k in h[1] if k.startswith("grad_scale_log2/")]
    assert len(keys) == n_blocks and "grad_scale_log2/001_mlp" in keys
    # M = 2 replicas: init 2·2^13, then ×2^(1/1000) per clean update; the resumed run continues from step 30's
    for k in keys:
        for step in range(1, 61):
            expected = 1 + 13 + step / 1000 if h[step]["grad_scale_skip"] == 0 else None
            if expected is not None and all(h[s]["grad_scale_skip"] == 0 for s in range(1, step + 1)):
                assert h[step][k] == pytest.approx(expected, abs=1e-6), (k, step)
    assert all(h[s]["grad_scale_skip_mismatch"] == 0 for s in h)
    skipped = 0  # the running count of skipped updates, carried across the resume
    for s in range(1, 61):
        skipped += h[s]["grad_scale_skip"]
        assert h[s]["grad_scale_skipped_total"] == skipped, s
    # it learns (16 codes: ln 16 = 2.77 nats at chance)
    start, end = h[1]["image_loss"], sum(h[s]["image_loss"] for s in range(56, 61)) / 5
    assert end < 0.75 * start, (start, end)
    # the Figure-12-style plot of the scales from the run folder
    subprocess.run([sys.executable, "launch/plot_scales.py", "--run", str(run)], cwd=ROOT, check=True)
    assert (run / "grad_scales.svg").read_text().count("<polyline") == n_blocks


def test_configs_that_would_apply_an_overflowing_update_are_refused():
    """Per-resblock scaling leaves a nonfinite gradient for DeepSpeed's check to skip the update: DeepSpeed's fp16
    mode, ZeRO-0, and ZeRO-1/2 with that check turned off (compute_grad_norm in fp32 mode, check_grad_overflow in
    bf16 mode) are refused before anything is built."""
    import types

    from dalle_ds.config import ConfigError
    from dalle_ds.train.dalle_trainer import DalleTrainer

    cases = [({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "fp16.enabled must be false"),
             ({"zero_optimization": {"stage": 0}}, "needs zero_optimization.stage ≥ 1"),
             ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm=false turns off"),
             ({"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 1}},
              "check_grad_overflow=false turns off")]
    for ds_config, message in cases:
        with pytest.raises(ConfigError, match=message):
            DalleTrainer._setup_resblock_scaling(types.SimpleNamespace(), None, ds_config)
