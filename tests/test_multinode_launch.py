"""A multi-node launch on one machine: DeepSpeed's launcher run once per "node" (``--no_ssh --node_rank i``), each
node in a UTS namespace with a hostname of its own, 2 nodes x 2 CPU ranks on loopback (launch_utils.
deepspeed_launch_nodes).

Every other multi-rank PowerSGD test emulates machines with ``powersgd.local_size=2`` under one launcher. Here the
machines are found the way a real job finds them, from the ranks' hostnames (dalle_ds.dist.topology), and the
launcher sets a per-node LOCAL_SIZE. The check: the paper's 12B composition (ZeRO-3, fp16 resblocks with per-resblock
gradient scaling, 16-bit Adam moments, PowerSGD) trained this way logs 2 machines x 2 ranks and gives, step by step,
exactly the losses, gradient norms, gradient scales and PowerSGD diagnostics of the emulated run.
"""
import json

import pytest

from launch_utils import can_fake_hostnames, deepspeed_launch, deepspeed_launch_nodes
from unit_shards import write_unit_splits

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _args(shards, out, ds_config, local_size: int):
    return ["--deepspeed_config", str(ds_config), "--preset", "test",
            "--set", f"data.train_tokens={shards / 'train'}", "--set", f"data.val_tokens={shards / 'val'}",
            "--set", "steps=6", "--set", "log_every=1", "--set", "data.val_batches=1",
            "--set", "model.resblock_grad_scaling=true", "--set", "model.resblock_dtype=float16",
            "--set", "adam_moments=16bit",
            "--set", "powersgd.enabled=true", "--set", "powersgd.rank=4", "--set", f"powersgd.local_size={local_size}",
            "--set", "powersgd.diagnostics=true", "--out", str(out)]


def test_two_nodes_by_hostname_equal_the_emulated_machines(tmp_path):
    why = can_fake_hostnames()
    if why:
        pytest.skip(why)
    shards = write_unit_splits(tmp_path / "shards", 256, 32)
    cfg = json.loads(open("ds_configs/cpu_dalle.json").read())
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    cfg["train_micro_batch_size_per_gpu"] = 8
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))

    nodes = deepspeed_launch_nodes("launch/train_dalle.py", _args(shards, tmp_path / "nodes", ds, 0), nodes=2,
                                   procs_per_node=2, workdir=tmp_path)
    log = nodes[0].stdout + nodes[0].stderr
    assert "2 machine(s) x 2 rank(s)" in log, log[-3000:]
    assert "all 4 rank(s) are on one machine" not in log
    deepspeed_launch("launch/train_dalle.py", _args(shards, tmp_path / "emulated", ds, 2), num_procs=4)

    a = json.loads((tmp_path / "nodes" / "dalle_metrics.json").read_text())["history"]
    b = json.loads((tmp_path / "emulated" / "dalle_metrics.json").read_text())["history"]
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 7))
    keys = ["loss", "grad_norm", "grad_scale_log2/000_attn", "grad_scale_log2/007_mlp", "powersgd/error_norm",
            "powersgd/delayed_norm", "powersgd/spread_norm", "powersgd/compression_rate",
            "powersgd/bytes_inter_machine"]
    for x, y in zip(a, b):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}, x["step"]
    assert a[-1]["powersgd/spread_norm"] > 0  # the two machines' buffers differ: there were two machines
