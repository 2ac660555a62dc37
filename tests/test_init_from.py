"""Fine-tuning: ``init_from`` starts a prior run from an exported prior's weights (DalleTrainer), with its tokenizer;
another architecture, another vocabulary or a missing file is refused, and a run folder with a checkpoint resumes
instead."""
import dataclasses
import shutil
import subprocess
import sys

import pytest
import torch

from dalle_ds.data.tokenizer import train_caption_tokenizer


@pytest.mark.slow
@pytest.mark.distributed
def test_prior_starts_from_an_exported_prior(tmp_path):
    from launch_utils import ROOT, deepspeed_launch, single_process_env
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 128, 32)

    def args(out, *extra):
        return ["--deepspeed_config", "ds_configs/cpu_dalle.json", "--preset", "test",
                "--set", f"data.train_tokens={shards / 'train'}", "--set", f"data.val_tokens={shards / 'val'}",
                "--set", "eval_every=0", "--set", "data.val_batches=1", "--out", str(out), *extra]

    first = tmp_path / "first"
    deepspeed_launch("launch/train_dalle.py", args(first, "--set", "steps=4"), num_procs=1)
    exported = torch.load(first / "dalle.pt", weights_only=False)

    # ZeRO-3 (partitioned parameters, even on one rank), learning rate 0: the weights stay what they were loaded as,
    # and the EMA of constant weights is those weights
    tune = tmp_path / "tune"
    proc = deepspeed_launch("launch/train_dalle.py", args(
        tune, "--set", "steps=2", "--set", f"init_from={first / 'dalle.pt'}", "--ds_set", "optimizer.params.lr=0",
        "--ds_set", "zero_optimization.stage=3"), num_procs=1)
    assert f"weights from {first / 'dalle.pt'} (step 4 of its run)" in proc.stdout + proc.stderr
    tuned = torch.load(tune / "dalle.pt", weights_only=False)
    assert tuned["state_dict"].keys() == exported["state_dict"].keys()
    for k, v in exported["state_dict"].items():
        assert torch.equal(tuned["state_dict"][k], v), k
    assert (tune / "tokenizer" / "tokenizer.json").read_text() == (first / "tokenizer" / "tokenizer.json").read_text()

    # refused before any training (one process, a world of one: the launcher adds nothing to a config error)
    def refused(*extra):
        proc = subprocess.run([sys.executable, "launch/train_dalle.py", *args(tmp_path / "refused", *extra)],
                              cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (proc.stdout + proc.stderr)[-2000:]
        return proc.stdout + proc.stderr

    out = refused("--set", "model.d_model=64", "--set", f"init_from={first / 'dalle.pt'}")
    assert "architecture differs" in out and "model.d_model 32 -> 64" in out and "Traceback" not in out
    other = train_caption_tokenizer([f"a {w} circle of {n}" for w in ("round", "tall", "flat") for n in range(40)],
                                    vocab_size=300, max_length=15)
    other.save(tmp_path / "other_tokenizer")
    shutil.rmtree(tmp_path / "refused")
    out = refused("--set", f"data.tokenizer={tmp_path / 'other_tokenizer'}", "--set", f"init_from={first / 'dalle.pt'}")
    assert "has another vocabulary than that prior's tokenizer" in out and "Traceback" not in out

def test_a_missing_or_foreign_file_is_a_config_error_and_a_checkpoint_wins(tmp_path):
    from dalle_ds.config import ConfigError, DALLE_RUN_PRESETS
    from dalle_ds.train.dalle_trainer import DalleTrainer

    cfg = DALLE_RUN_PRESETS["test"]
    for path, needle in [(tmp_path / "none.pt", "init_from: prior \\(init_from\\) file not found"),
                         (tmp_path / "junk.pt", "is not a readable prior \\(init_from\\) file")]:
        if path.name == "junk.pt":
            path.write_bytes(b"junk")
        with pytest.raises(ConfigError, match=needle):
            DalleTrainer._init_weights_source(dataclasses.replace(cfg, init_from=str(path)), tmp_path, resuming=False)
    assert DalleTrainer._init_weights_source(cfg, tmp_path, resuming=False) is None
    # a run folder holding a checkpoint resumes from it: init_from is not read (the file need not exist any more)
    (tmp_path / "checkpoints" / "step00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    gone = dataclasses.replace(cfg, init_from=str(tmp_path / "none.pt"))
    assert DalleTrainer._init_weights_source(gone, tmp_path, resuming=True) is None
    with pytest.raises(ConfigError, match="file not found"):
        DalleTrainer._init_weights_source(gone, tmp_path, resuming=False)


def test_a_prior_trained_on_the_fly_records_its_dvae_absolute(tmp_path, monkeypatch):
    """``--set data.dvae=dvae.pt`` (relative to where training ran) was exported as it was typed, so sampling from
    any other folder failed with 'dVAE file not found: dvae.pt'. The export names the file absolute."""
    from types import SimpleNamespace

    from dalle_ds.config import DalleTrainConfig
    from dalle_ds.models.dalle import DALLE
    from dalle_ds.sample.pipeline import TextToImage
    from dalle_ds.train.dalle_trainer import DalleTrainer, load_dalle
    from tiny_artifacts import export_tiny_text_to_image

    prior, _ = load_dalle(export_tiny_text_to_image(tmp_path, ["a red circle", "a blue square"] * 4, image_size=16))
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "prior" / "tokenizer", run / "tokenizer")
    monkeypatch.chdir(tmp_path)  # where training ran, data.dvae given relative to it
    trainer = object.__new__(DalleTrainer)  # finish() alone: the export at the end of a run
    trainer.cfg = dataclasses.replace(DalleTrainConfig(model=prior.cfg), data=dataclasses.replace(
        DalleTrainConfig().data, train_tokens=None, dvae="dvae.pt"))
    trainer.run_dir, trainer.batches = run, SimpleNamespace(dataset=object())  # images encoded on the fly
    trainer.finish({"eval": {}, "steps": 1}, DALLE(prior.cfg).state_dict())
    monkeypatch.chdir(tmp_path / "prior")  # sampling elsewhere
    _, meta = load_dalle(run / "dalle.pt")
    assert meta["dvae"] == str(tmp_path / "dvae.pt")
    assert TextToImage.load(run / "dalle.pt").dvae.cfg.image_size == 16
    # a prior exported before, with the path as typed: the error says what the path is and what to pass
    from dalle_ds.train.dalle_trainer import export_dalle

    export_dalle(run / "old.pt", prior.cfg, DALLE(prior.cfg).state_dict(), 1, {"tokenizer": "tokenizer",
                                                                               "dvae": "dvae.pt"})
    with pytest.raises(FileNotFoundError, match="records its dVAE as 'dvae.pt', a path relative to the folder it "
                                                "was trained in; pass --dvae"):
        TextToImage.load(run / "old.pt")
