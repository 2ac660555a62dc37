"""Worker for test_resblock_scaling_deepspeed.py: one DeepSpeed rank (gloo, CPU) that compares the prior's
parameter gradients with per-resblock scaling (fp16 branches, unscaled by gradient hooks) against fp32 without
scaling, as ZeRO sees them after the backward, then checks that an injected overflow makes DeepSpeed skip the step.
Usage: python zero_unscale_worker.py STAGE PORT OUT.json"""
import dataclasses
import json
import logging
import os
import sys

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import logger, safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

from dalle_ds.config import DALLE_PRESETS  # noqa: E402
from dalle_ds.models.dalle import DALLE  # noqa: E402
from dalle_ds.precision import install_unscale_hooks  # noqa: E402

logger.setLevel(logging.ERROR)
stage = int(sys.argv[1])
base = dataclasses.replace(DALLE_PRESETS["test"], attn_backend="sdpa")
text = torch.randint(2, 300, (2, base.text_len), generator=torch.Generator().manual_seed(0))
image = torch.randint(0, base.image_vocab_size, (2, base.image_len), generator=torch.Generator().manual_seed(1))


def engine(cfg):
    torch.manual_seed(0)
    model = DALLE(cfg)
    if model.grad_scaler is not None:
        install_unscale_hooks(model.resblocks, model.grad_scaler)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 4.0, "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    return eng, model


def grads(eng, model):
    eng.backward(eng(text, image).loss)
    return {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}


ref_eng, ref_model = engine(base)
want = grads(ref_eng, ref_model)
eng, model = engine(dataclasses.replace(base, resblock_grad_scaling=True, resblock_dtype="float16"))
got = grads(eng, model)
rel = {n: float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)) for n in want}
eng.step()
clean_skip = model.grad_scaler.update()

# an overflow inside block 3's branch: DeepSpeed must skip the step, the scaler must flag block 3 only
before = {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}


def overflow(_mod, _inp, out):
    out.register_hook(lambda g: g * float("inf"))


handle = model.resblocks[3].fn.fc.register_forward_hook(overflow)
eng.backward(eng(text, image).loss)
handle.remove()
skipped_before = eng.skipped_steps
eng.step()
flag_skip = model.grad_scaler.update()
unchanged = all(torch.equal(safe_get_full_fp32_param(p), before[n]) for n, p in model.named_parameters())
json.dump({"rel": rel, "clean_skip": clean_skip, "flag_skip": flag_skip, "flags": model.grad_scaler.last_flags,
           "ds_skipped": eng.skipped_steps - skipped_before, "unchanged": unchanged}, open(sys.argv[3], "w"))
