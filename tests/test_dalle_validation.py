"""The prior's validation loss over several ranks (dalle_ds/train/dalle_trainer.py ``DalleTrainer._val_loss``).

Under ZeRO-3 every forward pass gathers each layer's parameters with a collective, so all ranks must run the same
number of them: with 3 held-out pairs on 2 ranks, one rank has a pair fewer. It must neither hang (the short rank
reaching the loss all-reduce while the other still gathers) nor change the number: the reported loss is the exact
mean over the 3 pairs, what one rank gets for them. The parameter count the trainer logs is the model's under ZeRO-3
too (a partitioned parameter's numel() is 0).
"""
import multiprocessing
import threading

import pytest

from dalle_ds.dist.local_ranks import run_local_ranks
from unit_shards import write_unit_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _evaluate(rank, world, root, run, stage, tokenizer):
    import deepspeed
    from dalle_ds.config import DALLE_PRESETS, DalleDataConfig, DalleTrainConfig
    from dalle_ds.models.dalle import DALLE
    from dalle_ds.train.dalle_trainer import DalleTrainer
    from dalle_ds.train.engine_loop import parameter_count
    from dalle_ds.train.ds_config import prepare_ds_config

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the harness's process group (zero.Init counts ranks)
    data = DalleDataConfig(train_tokens=f"{root}/train", val_tokens=f"{root}/val", val_batches=3, tokenizer=tokenizer)
    cfg = DalleTrainConfig(model=DALLE_PRESETS["test"], data=data, steps=1, log_every=0, eval_every=0, save_every=0)
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}  # all partitioned
    ds = prepare_ds_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
                            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}},
                           steps=1, run_dir=run, job_name="dalle", world_size=world, accelerator="cpu")
    trainer = DalleTrainer(cfg, ds, run, resume=False)
    module = trainer.engine.module
    counts = {"partitioned": all(p.numel() == 0 for p in module.parameters()), "count": parameter_count(module),
              "plain_count": sum(p.numel() for p in DALLE(trainer.cfg.model).parameters())}
    return {**trainer.evaluate("t"), **counts}


def _run_with_timeout(timeout, *args):
    """``run_local_ranks(_evaluate, *args)``; a hang fails the test after ``timeout`` s (its ranks terminated)."""
    result = {}

    def target():
        try:
            result["value"] = run_local_ranks(_evaluate, *args)
        except BaseException as e:  # noqa: BLE001  (reported below)
            result["error"] = e

    before = set(multiprocessing.active_children())
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for p in set(multiprocessing.active_children()) - before:  # the ranks this call spawned, by process
            p.terminate()
        t.join(30)
        pytest.fail(f"the {args[0]}-rank validation did not finish within {timeout} s (ranks out of step?)")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.parametrize("stage", [3, 2])
def test_uneven_validation_split_finishes_with_the_single_rank_loss(tmp_path, stage):
    write_unit_shards(tmp_path / "train", 16, 0)
    write_unit_shards(tmp_path / "val", 3, 1)  # 2 ranks: pairs 0, 2 on rank 0 and 1 on rank 1
    two = _run_with_timeout(180, 2, str(tmp_path), str(tmp_path / "two"), stage, None)
    one = _run_with_timeout(180, 1, str(tmp_path), str(tmp_path / "one"), stage, str(tmp_path / "two" / "tokenizer"))
    assert two["val_pairs"] == one["val_pairs"] == 3
    # the logged parameter count is the model's, partitioned or not (ZeRO-3: numel() is 0 outside a gather)
    assert two["partitioned"] == one["partitioned"] == (stage == 3)
    assert two["count"] == one["count"] == two["plain_count"] > 0
    for key in ("val_loss", "val_text_loss", "val_image_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    if stage < 3:  # the EMA's loss too (not evaluated under ZeRO-3, where the average is sharded)
        assert two["val_ema_loss"] == pytest.approx(one["val_ema_loss"], rel=1e-6)
