"""The prior trained with PowerSGD through the real `deepspeed` launcher: 4 CPU ranks emulating 2 machines x 2 GPUs.
Under ZeRO-3 (parameters partitioned, as the paper shards them) with the paper's fp16 resblocks (per-resblock
gradient scaling) and 16-bit Adam moments, the run logs the compression it achieves (the formula of
tests/test_powersgd.py), and a preempted run resumes from its checkpoint -- error buffers included -- into exactly
the uninterrupted run's losses, gradient scales, gradient norms and error-buffer diagnostics; buffers re-centered
every 4 steps have no machine-specific part after those steps. Under ZeRO-1 it composes with 16-bit Adam moments."""
import json

import pytest

from launch_utils import deepspeed_launch
from unit_shards import write_unit_splits

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_unit_splits(tmp_path_factory.mktemp("psgd_shards"), 256, 32)


def _args(shards, out, ds_config, *extra):
    return ["--deepspeed_config", str(ds_config), "--preset", "test",
            "--set", f"data.train_tokens={shards / 'train'}", "--set", f"data.val_tokens={shards / 'val'}",
            "--set", "steps=12", "--set", "save_every=6", "--set", "log_every=1", "--set", "data.val_batches=1",
            "--set", "powersgd.enabled=true", "--set", "powersgd.rank=4", "--set", "powersgd.local_size=2",
            "--set", "powersgd.checkpoint_buffers=per_rank", "--set", "powersgd.diagnostics=true",
            "--set", "powersgd.recenter_every=4",
            "--out", str(out), *extra]


def test_powersgd_prior_logs_compression_and_resumes_exactly(shards, tmp_path):
    cfg = json.loads(open("ds_configs/cpu_dalle.json").read())
    # the paper's sharded parameters, every one partitioned (ZeRO-1: the 16-bit Adam test below)
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    cfg["train_micro_batch_size_per_gpu"] = 8
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))
    full, parted = tmp_path / "full", tmp_path / "parted"
    # the paper's composition: fp16 resblocks with per-resblock gradient scaling (fp32 master weights: DeepSpeed's
    # fp32 mode, as in ds_configs/zero3_fp16_resblock.json) and 16-bit Adam moments, with PowerSGD under ZeRO-3
    paper = ("--set", "model.resblock_grad_scaling=true", "--set", "model.resblock_dtype=float16",
             "--set", "adam_moments=16bit")
    deepspeed_launch("launch/train_dalle.py", _args(shards, full, ds, *paper), num_procs=4)
    deepspeed_launch("launch/train_dalle.py", _args(shards, parted, ds, *paper, "--stop_at", "6"), num_procs=4)
    deepspeed_launch("launch/train_dalle.py", _args(shards, parted, ds, *paper), num_procs=4)

    a = {h["step"]: h for h in json.loads((full / "dalle_metrics.json").read_text())["history"]}
    b = {h["step"]: h for h in json.loads((parted / "dalle_metrics.json").read_text())["history"]}
    assert sorted(b) == list(range(7, 13))
    for step in b:
        assert b[step]["loss"] == a[step]["loss"], step
        for key in ("grad_scale_log2/000_attn", "grad_scale_log2/007_mlp", "powersgd/error_norm", "powersgd/delayed_norm", "powersgd/spread_norm", "grad_norm",
                    "powersgd/rounding_ratio", "powersgd/swamped_fraction"):
            assert b[step][key] == a[step][key], (step, key)
    for h in a.values():  # the engine's norm before clipping (cpu_dalle.json clips at 4), one update per log
        assert h["grad_norm"] > 0 and h["grad_clipped"] == float(h["grad_norm"] > 4.0)
        assert 0 < h["powersgd/sent_fraction"] < 1 and h["powersgd/zeroed_buffers"] == 0
        assert 0 < h["powersgd/rounding_ratio"] < 1 and 0 <= h["powersgd/swamped_fraction"] < 1
        recentered = h["step"] % 4 == 0  # recenter_every=4: machines' buffers made equal after steps 4, 8, 12
        assert (h["powersgd/spread_norm"] == 0) == recentered and (h["powersgd/recentered_elements"] > 0) == recentered
    d, r, m = 32, 4, 2  # test preset width, rank per machine, GPUs per machine
    assert a[12]["powersgd/compression_rate"] == pytest.approx(1 - r * (m + 3) / (3 * d * m), rel=0.01)
    assert a[12]["powersgd/bytes_inter_machine"] < 0.2 * a[12]["powersgd/bytes_baseline_fp32"]
    assert a[12]["powersgd/skipped_steps"] == 0 and a[12]["powersgd/error_norm"] > 0
    assert a[12]["loss"] < a[1]["loss"] and a[12]["grad_scale_skip"] == 0
    import torch
    saved = torch.load(next((full / "checkpoints" / "step00000012").glob("zero_pp_rank_0_*optim_states.pt")),
                       weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]  # ZeRO-3's layout
    assert [(g["moments"], saved["state"][g["params"][0]]["exp_avg"].dtype) for g in saved["param_groups"]] == [
        ("16bit", torch.int16), ("fp32", torch.float32)]
    assert (full / "monitor" / "dalle" / "dalle_powersgd_compression_rate.csv").is_file()


def test_powersgd_with_16bit_adam_moments(shards, tmp_path):
    """PowerSGD (ZeRO-1, 2 machines x 2 ranks) composes with adam_moments=16bit: the client optimizer sits under
    PowerSGD's ZeRO optimizer, its matrices' moments are checkpointed as int16 codes, and the prior learns."""
    import torch

    cfg = json.loads(open("ds_configs/cpu_dalle.json").read())
    cfg["zero_optimization"] = {"stage": 1}
    cfg["train_micro_batch_size_per_gpu"] = 8
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    deepspeed_launch("launch/train_dalle.py", _args(shards, run, ds, "--set", "adam_moments=16bit"), num_procs=4)
    h = {x["step"]: x for x in json.loads((run / "dalle_metrics.json").read_text())["history"]}
    assert h[12]["loss"] < 0.9 * h[1]["loss"] and h[12]["powersgd/skipped_steps"] == 0
    assert h[12]["powersgd/compression_rate"] > 0.5
    paths = sorted((run / "checkpoints").glob("step00000012/*optim_states.pt"))
    assert len(paths) == 4  # one per rank
    for path in paths:
        saved = torch.load(path, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        assert [(g["moments"], saved["state"][g["params"][0]]["exp_avg"].dtype) for g in saved["param_groups"]] == [
            ("16bit", torch.int16), ("fp32", torch.float32)]
