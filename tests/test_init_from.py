"""Fine-tuning: ``init_from`` starts a prior run from an exported prior's weights (DalleTrainer), with its tokenizer;
another architecture or another vocabulary is refused, and a run folder with a checkpoint resumes instead."""
import dataclasses

import pytest
import torch

from dalle_ds.data.tokenizer import train_caption_tokenizer


@pytest.mark.slow
@pytest.mark.distributed
def test_prior_starts_from_an_exported_prior(tmp_path):
    from launch_utils import deepspeed_launch, deepspeed_start
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 128, 32)

    def args(out, *extra):
        return ["--deepspeed_config", "ds_configs/cpu_dalle.json", "--preset", "test",
                "--set", f"data.train_tokens={shards / 'train'}", "--set", f"data.val_tokens={shards / 'val'}",
                "--set", "eval_every=0", "--set", "data.val_batches=1", "--out", str(out), *extra]

    first = tmp_path / "first"
    deepspeed_launch("launch/train_dalle.py", args(first, "--set", "steps=4"), num_procs=1)
    exported = torch.load(first / "dalle.pt", weights_only=False)

    # ZeRO-3 on 2 ranks, learning rate 0: the weights stay what they were loaded as, and the EMA of constant weights
    # is those weights. Stopped after one update and resumed: the second start resumes, without init_from's load.
    tune = tmp_path / "tune"
    tune_args = args(tune, "--set", "steps=2", "--set", f"init_from={first / 'dalle.pt'}",
                     "--ds_set", "optimizer.params.lr=0", "--ds_set", "zero_optimization.stage=3")
    proc = deepspeed_launch("launch/train_dalle.py", [*tune_args, "--stop_at", "1"], num_procs=2)
    assert f"weights from {first / 'dalle.pt'} (step 4 of its run)" in proc.stdout + proc.stderr
    proc = deepspeed_launch("launch/train_dalle.py", tune_args, num_procs=2)
    log = proc.stdout + proc.stderr
    assert "is not used" in log and "resumed from step 1" in log
    tuned = torch.load(tune / "dalle.pt", weights_only=False)
    assert tuned["state_dict"].keys() == exported["state_dict"].keys()
    for k, v in exported["state_dict"].items():
        assert torch.equal(tuned["state_dict"][k], v), k
    assert (tune / "tokenizer" / "tokenizer.json").read_text() == (first / "tokenizer" / "tokenizer.json").read_text()

    # refused, on every rank alike and before any training: another architecture, another vocabulary
    wider = deepspeed_start("launch/train_dalle.py", args(tmp_path / "wider", "--set", "model.d_model=64",
                                                          "--set", f"init_from={first / 'dalle.pt'}"), num_procs=1)
    out = wider.communicate(timeout=300)[0]
    assert wider.returncode == 2 and "architecture differs" in out and "model.d_model 32 -> 64" in out, out[-2000:]
    other = train_caption_tokenizer([f"a {w} circle of {n}" for w in ("round", "tall", "flat") for n in range(40)],
                                    vocab_size=300, max_length=15)
    other.save(tmp_path / "other_tokenizer")
    foreign = deepspeed_start("launch/train_dalle.py", args(
        tmp_path / "foreign", "--set", f"data.tokenizer={tmp_path / 'other_tokenizer'}",
        "--set", f"init_from={first / 'dalle.pt'}"), num_procs=1)
    out = foreign.communicate(timeout=300)[0]
    assert foreign.returncode == 2 and "has another vocabulary than that prior's tokenizer" in out, out[-2000:]


def test_a_missing_or_foreign_file_is_a_config_error(tmp_path):
    from dalle_ds.config import ConfigError, DALLE_RUN_PRESETS
    from dalle_ds.train.dalle_trainer import DalleTrainer

    cfg = DALLE_RUN_PRESETS["test"]
    for path, needle in [(tmp_path / "none.pt", "init_from: prior \\(init_from\\) file not found"),
                         (tmp_path / "junk.pt", "is not a readable prior \\(init_from\\) file")]:
        if path.name == "junk.pt":
            path.write_bytes(b"junk")
        with pytest.raises(ConfigError, match=needle):
            DalleTrainer._init_weights_source(dataclasses.replace(cfg, init_from=str(path)), tmp_path, resume=True)
    assert DalleTrainer._init_weights_source(cfg, tmp_path, resume=True) is None
