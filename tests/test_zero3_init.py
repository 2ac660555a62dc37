"""The prior under ZeRO-3 is built inside deepspeed.zero.Init: no rank holds more than its partition of any
parameter after construction, and the gathered weights are exactly the plainly built model's (same seed)."""
import math

import pytest
import torch

from dalle_ds.dist.local_ranks import run_local_ranks

pytestmark = pytest.mark.distributed


def _check(rank, world):
    import deepspeed
    from dalle_ds.config import DALLE_PRESETS
    from dalle_ds.models.dalle import DALLE
    from dalle_ds.train.dalle_trainer import build_prior
    cfg = DALLE_PRESETS["test"]
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    torch.manual_seed(5)
    plain = DALLE(cfg)
    torch.manual_seed(5)
    sharded = build_prior(cfg, ds_config)
    local = sum(p.ds_tensor.numel() for p in sharded.parameters())
    full = sum(p.numel() for p in plain.parameters())
    assert all(p.numel() == 0 for p in sharded.parameters())  # nothing materialized outside the partitions
    assert local <= sum(math.ceil(p.numel() / world) for p in plain.parameters()) and local < full
    want = dict(plain.named_parameters())
    for name, p in sharded.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            assert torch.equal(p.data, want[name].data), name


def test_zero3_prior_is_built_partitioned_with_the_plain_init():
    run_local_ranks(_check, 2)
