"""Every DeepSpeed config in ds_configs/ trains its trainer for two steps on CPU (one process, test presets, the
batch cut to 4 and torch's AdamW; fp16_resblock configs with fp16 resblocks and per-resblock scaling).
test_ds_config.py checks that they parse; this checks that the trainers run with them: dvae_paper.json (bf16 mode)
used to crash the dVAE's first conv with fp32 pixels against bf16 weights."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch_utils import ROOT, single_process_env
from unit_shards import write_unit_splits

pytestmark = pytest.mark.slow
CONFIGS = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_unit_splits(tmp_path_factory.mktemp("shipped_shards"), 32, 8)


def _command(name: str, shards: Path, out: Path) -> list[str]:
    common = ["--deepspeed_config", f"ds_configs/{name}", "--preset", "test", "--set", "steps=2", "--out", str(out)]
    if "clip" in name:
        return ["launch/train_clip.py", *common]
    if "dvae" in name:
        return ["launch/train_dvae.py", *common]
    extra = (["--set", "model.resblock_grad_scaling=true", "--set", "model.resblock_dtype=float16"]
             if "fp16_resblock" in name else [])
    return ["launch/train_dalle.py", *common, "--set", f"data.train_tokens={shards / 'train'}", *extra]


def test_all_shipped_configs_are_covered():
    assert len(CONFIGS) >= 11 and "dvae_paper.json" in CONFIGS and "zero3_bf16_offload.json" in CONFIGS


def _run(command: list[str], name: str) -> subprocess.CompletedProcess:
    env = single_process_env(DS_ACCELERATOR="cpu")
    cmd = [sys.executable, *command, "--ds_set", "train_micro_batch_size_per_gpu=2"]
    if "train_batch_size" in (ROOT / "ds_configs" / name).read_text():
        cmd += ["--ds_set", "train_batch_size=4"]
    if "torch_adam" not in (ROOT / "ds_configs" / name).read_text():
        cmd += ["--ds_set", "+optimizer.params.torch_adam=true"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", CONFIGS)
def test_trains_two_steps(name, shards, tmp_path):
    proc = _run(_command(name, shards, tmp_path / "run"), name)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert '"steps": 2' in proc.stdout


def test_clip_in_bf16_mode_and_refused_under_zero3(tmp_path):
    """The reranker's trainer with a GPU-style bf16 config trains; under ZeRO-3 (its rank-0-only evaluation could
    not gather the EMA shards) it stops with a config error before any work."""
    common = ["launch/train_clip.py", "--preset", "test", "--set", "steps=2", "--out", str(tmp_path / "clip")]
    proc = _run([*common, "--deepspeed_config", "ds_configs/zero2_bf16.json"], "zero2_bf16.json")
    assert proc.returncode == 0 and '"steps": 2' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    common[-1] = str(tmp_path / "clip3")
    proc = _run([*common, "--deepspeed_config", "ds_configs/zero3_bf16.json"], "zero3_bf16.json")
    assert proc.returncode == 2 and "CLIP trainer supports ZeRO stages 0-2" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("name", ["zero3_bf16.json", "zero1_fp16_resblock.json"])
def test_16bit_adam_moments_train_with_zero3_and_fp16_resblocks(name, shards, tmp_path):
    """adam_moments=16bit with ZeRO-3 (partitioned parameters: the groups are made from their names) and with fp16
    resblocks under per-resblock scaling (DeepSpeed's fp32 mode) trains its steps."""
    proc = _run([*_command(name, shards, tmp_path / "run"), "--set", "adam_moments=16bit"], name)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert '"steps": 2' in proc.stdout
    (path,) = (tmp_path / "run" / "checkpoints").glob("step*/*optim_states.pt")
    saved = torch.load(path, weights_only=False)["optimizer_state_dict"]
    saved = saved.get("base_optimizer_state") or saved["optimizer_state_dict"]  # ZeRO-1/2 and ZeRO-3 name it so
    assert [g["moments"] for g in saved["param_groups"]] == ["16bit", "fp32"]
    assert [saved["state"][i]["exp_avg"].dtype for i in (0, 1)] == [torch.int16, torch.float32]
    assert [saved["state"][i]["exp_avg_sq"].dtype for i in (0, 1)] == [torch.int16, torch.float32]


def test_16bit_adam_moments_refuse_optimizer_offload(shards, tmp_path):
    name = "zero3_bf16_offload.json"
    proc = _run([*_command(name, shards, tmp_path / "run"), "--set", "adam_moments=16bit"], name)
    assert proc.returncode == 2 and "optimizer offload runs DeepSpeed's CPU Adam" in proc.stderr, proc.stderr[-3000:]
