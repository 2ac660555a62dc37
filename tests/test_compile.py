"""torch.compile of the prior's resblocks (DALLE.compile_resblocks; ``compile=true`` in a prior run): the compiled
model computes what the eager one does (with activation checkpointing and with per-resblock fp16 gradient scaling,
whose overflow filter must still hold inside compiled blocks), ZeRO-3 is refused, and a run under DeepSpeed learns.

Inductor compiles C++ on CPU: the first test pays the cold compile (~15-25 s on the 2-core dev machine)."""
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from dalle_ds.config import ConfigError, DalleConfig, DalleTrainConfig
from dalle_ds.models.dalle import DALLE
from dalle_ds.train.dalle_trainer import DalleTrainer
from dalle_ds.train.ds_config import check_compile_supported
from launch_utils import ROOT, single_process_env
from prior_batches import inject_inf_gradient, random_batch
from unit_shards import write_unit_shards

CFG = DalleConfig(text_vocab_size=50, text_len=6, image_vocab_size=20, image_grid=4, d_model=32, n_layers=3,
                  n_heads=2, conv_kernel=3, attn_backend="dense")


def _pair(**kw) -> tuple[DALLE, DALLE]:
    """(model to compile, eager copy with the same weights)."""
    cfg = dataclasses.replace(CFG, **kw)
    torch.manual_seed(0)
    a, b = DALLE(cfg), DALLE(cfg)
    b.load_state_dict(a.state_dict())
    return a, b


def _compiled_blocks(model: DALLE) -> int:
    return sum(getattr(b, "_compiled_call_impl", None) is not None for b in model.resblocks)


def test_compiled_resblocks_match_eager_with_checkpointing():
    torch._dynamo.reset()
    model, eager = _pair(activation_checkpointing=True)
    model.compile_resblocks()
    assert _compiled_blocks(model) == len(model.resblocks) == 6 and _compiled_blocks(eager) == 0
    text, image = random_batch(CFG, 4, 0)
    for _ in range(2):  # the second call runs the cached compiled code
        for m in (model, eager):
            m.zero_grad()
            out = m(text, image)
            out.loss.backward()
            m.loss = out.loss.detach()
        torch.testing.assert_close(model.loss, eager.loss, rtol=1e-6, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_resblocks_keep_the_overflow_filter():
    """fp16 branches with per-resblock scaling: an Inf in block k's backward (hook registered before compiling)
    reaches only block k's gradients, the update is skipped and only scale k is divided."""
    torch._dynamo.reset()
    model, _ = _pair(resblock_grad_scaling=True, resblock_dtype="float16")
    k = 3  # layer 1's MLP block
    inject_inf_gradient(model.resblocks[k].fn.fc)
    model.compile_resblocks()
    scales = model.grad_scaler.scales.clone()
    text, image = random_batch(CFG, 4, 1)
    model(text, image).loss.backward()
    assert model.unscale_grads_() is True
    for j, block in enumerate(model.resblocks):
        assert all(torch.isfinite(p.grad).all() for p in block.parameters()) == (j != k), j
    assert model.grad_scaler.update() is True
    new = model.grad_scaler.scales
    assert new[k] == pytest.approx(scales[k] / math.sqrt(2))
    assert all(new[j] > scales[j] for j in range(len(new)) if j != k)


def test_compile_refuses_zero3(tmp_path):
    with pytest.raises(ConfigError, match="not with ZeRO-3"):
        check_compile_supported({"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="not with ZeRO-3"):  # the trainer says so before it reads any data
        DalleTrainer(DalleTrainConfig(compile=True), {"zero_optimization": {"stage": 3}}, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    for stage in (0, 1, 2):
        check_compile_supported({"zero_optimization": {"stage": stage}})
    check_compile_supported({})


@pytest.mark.slow
def test_compiled_prior_run_learns_under_deepspeed(tmp_path):
    """launch/train_dalle.py with compile=true (one process, ZeRO-2): the compiled model trains."""
    write_unit_shards(tmp_path / "train", 256, 0)
    write_unit_shards(tmp_path / "val", 32, 1)
    run = tmp_path / "run"
    env = single_process_env()
    cmd = [sys.executable, str(ROOT / "launch" / "train_dalle.py"), "--deepspeed_config",
           str(ROOT / "ds_configs" / "cpu_dalle.json"), "--preset", "test",
           "--set", f"data.train_tokens={tmp_path / 'train'}", "--set", f"data.val_tokens={tmp_path / 'val'}",
           "--set", "compile=true", "--set", "steps=30", "--set", "save_every=0", "--set", "log_every=1",
           "--out", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run / "dalle_run_config.json").read_text())["compile"] is True
    h = {r["step"]: r for r in json.loads((run / "dalle_metrics.json").read_text())["history"]}
    start, end = h[1]["image_loss"], sum(h[s]["image_loss"] for s in range(26, 31)) / 5
    assert end < 0.8 * start, (start, end)
