"""The stage-1 trainer under the real `deepspeed` launcher with 2 CPU ranks: it learns, checkpoints, and a resumed
run continues with exactly the losses of an uninterrupted one."""
import json

import pytest
import torch

from launch_utils import deepspeed_launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ARGS = ["--deepspeed_config", "ds_configs/cpu_dvae.json", "--preset", "test",
        "--set", "steps=8", "--set", "log_every=1", "--set", "save_every=4", "--set", "data.eval_samples=8"]


def _history(run_dir, name="dvae_metrics.json"):
    return {h["step"]: h for h in json.loads((run_dir / name).read_text())["history"]}


def test_two_rank_run_and_exact_resume(tmp_path):
    full, parted = tmp_path / "full", tmp_path / "parted"
    fresh = deepspeed_launch("launch/train_dvae.py", ARGS + ["--out", str(full)])
    # the start-up line says how the run started (it read "resumed from step None" for a new run)
    assert "world size 2; a new run" in fresh.stdout + fresh.stderr
    assert "resumed from step None" not in fresh.stdout + fresh.stderr
    stopped = deepspeed_launch("launch/train_dvae.py", ARGS + ["--out", str(parted), "--stop_at", "4"])
    assert "stopped at step 4 of 8 (--stop_at)" in stopped.stdout + stopped.stderr  # once, from rank 0
    assert (stopped.stdout + stopped.stderr).count("(--stop_at)") == 1
    assert (parted / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert not (parted / "dvae.pt").exists()
    resumed = deepspeed_launch("launch/train_dvae.py", ARGS + ["--out", str(parted)])
    assert "world size 2; resumed from step 4" in resumed.stdout + resumed.stderr

    a, b = _history(full), _history(parted)
    assert json.loads((parted / "dvae_metrics.json").read_text())["resumed_from"] == 4
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:  # deterministic data order + per-step Gumbel seeds: identical losses after resume
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
        assert b[step]["tau"] == a[step]["tau"] and b[step]["lr"] == a[step]["lr"]
    assert a[8]["loss"] < a[1]["loss"]  # and it learns a little even in 8 steps

    # The exported artifacts: EMA weights identical in both runs, a reconstruction grid, monitor CSVs.
    wa = torch.load(full / "dvae.pt", weights_only=False)["state_dict"]
    wb = torch.load(parted / "dvae.pt", weights_only=False)["state_dict"]
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)
    # channels_last (the run config's default, ZeRO-0 here) reached the weights the EMA copied and exported.
    convs = [v for v in wa.values() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in convs)
    assert (full / "reconstructions_final.png").stat().st_size > 1000
    assert (full / "monitor" / "dvae" / "dvae_loss.csv").read_text().count("\n") == 9
    assert list((full / "monitor" / "dvae").glob("events.out.tfevents.*"))
