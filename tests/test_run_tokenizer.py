"""The caption tokenizer a run keeps in its folder (dalle_ds.train.run_tokenizer): a resumed run uses the one its
checkpoints were trained with and refuses another; a run that does not resume writes its own, replacing a stale one;
a trainer given another job's folder refuses it before writing anything there."""
import json

import pytest

from dalle_ds.config import ConfigError
from dalle_ds.data.tokenizer import train_caption_tokenizer
from dalle_ds.train.run_tokenizer import ensure_run_tokenizer, same_tokenizer

ENGLISH = ["a red circle", "a blue square above a red circle", "two green triangles", "a small blue square"] * 4
FRENCH = ["un cercle rouge", "un carré bleu au-dessus d'un cercle rouge", "deux triangles verts"] * 4


class Captions:
    """The least a training set offers the tokenizer: its captions, without images."""

    def __init__(self, captions):
        self._captions = list(captions)

    def __len__(self):
        return len(self._captions)

    def captions(self):
        return list(self._captions)


def _ensure(dest, source=None, captions=ENGLISH, resuming=False):
    return ensure_run_tokenizer(str(source) if source else None, Captions(captions), dest, vocab_size=300,
                                max_length=15, resuming=resuming)


def _saved(path, captions):
    train_caption_tokenizer(captions, vocab_size=300, max_length=15).save(path)
    return path


def test_a_run_that_does_not_resume_replaces_a_stale_tokenizer(tmp_path):
    dest = tmp_path / "run" / "tokenizer"
    english = _ensure(dest)
    assert english.hf.get_vocab() == _ensure(dest).hf.get_vocab()  # the same captions: the same tokenizer
    french = _ensure(dest, captions=FRENCH)  # e.g. --no-resume on other data: trained anew, not the stale one
    assert french.hf.get_vocab() != english.hf.get_vocab()
    assert "cercle" in "".join(french.hf.get_vocab())
    other = _saved(tmp_path / "other", ENGLISH + ["a purple hexagon"])
    copied = _ensure(dest, source=other)  # a named tokenizer replaces the folder's too
    assert same_tokenizer(other, dest) and copied.hf.get_vocab() != french.hf.get_vocab()
    assert not (tmp_path / "run" / "tokenizer.tmp").exists()


def test_a_resumed_run_keeps_its_tokenizer_and_refuses_another(tmp_path):
    dest = tmp_path / "run" / "tokenizer"
    with pytest.raises(ConfigError, match="holds checkpoints but no caption tokenizer"):
        _ensure(dest, resuming=True)
    first = _ensure(dest)
    again = _ensure(dest, captions=FRENCH, resuming=True)  # the captions are not read: the checkpoint's tokenizer
    assert again.hf.get_vocab() == first.hf.get_vocab()
    same = tmp_path / "same"
    same.mkdir()
    # another file with the same tokenizer, formatted otherwise, is the same tokenizer
    (same / "tokenizer.json").write_text(json.dumps(json.loads((dest / "tokenizer.json").read_text()), indent=4))
    for name in (p.name for p in dest.iterdir() if p.name != "tokenizer.json"):
        (same / name).write_bytes((dest / name).read_bytes())
    assert _ensure(dest, source=same, resuming=True).hf.get_vocab() == first.hf.get_vocab()
    other = _saved(tmp_path / "other", FRENCH)
    with pytest.raises(ConfigError, match="is not the one the checkpoints in .* were trained with"):
        _ensure(dest, source=other, resuming=True)
    assert same_tokenizer(dest, same) and not same_tokenizer(dest, other)


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-resume"])
@pytest.mark.parametrize("trainer", ["dalle", "clip"])
def test_a_trainer_refuses_another_jobs_folder_before_writing_into_it(tmp_path, trainer, resume):
    from dalle_ds.config import CLIP_RUN_PRESETS, DALLE_RUN_PRESETS

    other = "clip" if trainer == "dalle" else "dalle"
    (tmp_path / "checkpoints" / "step00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    (tmp_path / f"{other}_run_config.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}}
    with pytest.raises(ConfigError, match=f"another run \\({other}\\), not of a {trainer} run"):
        if trainer == "dalle":
            from dalle_ds.train.dalle_trainer import DalleTrainer

            DalleTrainer(DALLE_RUN_PRESETS["test"], ds, tmp_path, resume=resume)
        else:
            from dalle_ds.train.clip_trainer import ClipTrainer

            ClipTrainer(CLIP_RUN_PRESETS[next(iter(CLIP_RUN_PRESETS))], ds, tmp_path, resume=resume)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no tokenizer folder left behind


def test_set_aside_moves_an_earlier_runs_state_together(tmp_path):
    """--no-resume in a folder holding a checkpoint: its checkpoints, logs, configs and tokenizer move into one
    replaced_<time> folder; exported artifacts stay; a second call finds nothing to move."""
    from dalle_ds.train.checkpoint import has_checkpoint_of, set_aside_for_new_run

    assert set_aside_for_new_run(tmp_path, "dalle") is None  # an empty folder: nothing to do
    (tmp_path / "checkpoints" / "step00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    for name in ("dalle_run_config.json", "dalle_ds_config.json", "dalle.pt"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "monitor" / "dalle").mkdir(parents=True)
    (tmp_path / "tokenizer").mkdir()
    aside = set_aside_for_new_run(tmp_path, "dalle", also=("tokenizer",))
    assert aside.parent == tmp_path and aside.name.startswith("replaced_")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "dalle_ds_config.json", "dalle_run_config.json",
                                                       "monitor", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dalle.pt", aside.name]
    assert (aside / "checkpoints" / "latest").read_text() == "step00000002"
    assert not has_checkpoint_of(tmp_path, "dalle") and set_aside_for_new_run(tmp_path, "dalle") is None
    # a tokenizer this run is configured to copy from the folder itself stays (keep)
    (tmp_path / "checkpoints" / "step00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    (tmp_path / "dalle_run_config.json").write_text("{}")
    (tmp_path / "tokenizer").mkdir()
    second = set_aside_for_new_run(tmp_path, "dalle", also=("tokenizer",), keep=(None, str(tmp_path / "tokenizer")))
    assert (tmp_path / "tokenizer").is_dir() and not (second / "tokenizer").exists()
    assert sorted(p.name for p in second.iterdir()) == ["checkpoints", "dalle_run_config.json"]


@pytest.mark.slow
def test_no_resume_starts_over_beside_the_earlier_run(tmp_path):
    """A prior stopped after update 1, then started again in the same folder with --no-resume: the earlier run's
    checkpoints, logs and tokenizer are set aside before anything is written, the new run trains from step 0 (its
    first loss is the earlier run's: same seed and data), and its CSV log holds only its own history. Before, the
    earlier checkpoints stayed beside the new tokenizer, and a later plain start resumed them with it."""
    import subprocess
    import sys

    from launch_utils import ROOT, single_process_env
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 64, 8)
    run = tmp_path / "run"
    cmd = [sys.executable, "launch/train_dalle.py", "--deepspeed_config", "ds_configs/cpu_dalle.json",
           "--preset", "test", "--set", f"data.train_tokens={shards / 'train'}", "--set", "steps=2",
           "--set", "save_every=0", "--set", "eval_every=0", "--set", "log_every=1", "--set", "data.val_batches=0",
           "--out", str(run), "--stop_at", "1"]
    outs = [subprocess.run(c, cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=600)
            for c in (cmd, [*cmd, "--no-resume"])]
    for proc in outs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    aside = [p for p in run.iterdir() if p.name.startswith("replaced_")]
    assert len(aside) == 1 and "--no-resume: " in outs[1].stderr, outs[1].stderr[-3000:]
    assert {"checkpoints", "monitor", "tokenizer", "dalle_run_config.json"} <= {p.name for p in aside[0].iterdir()}

    def csv(folder):
        return (folder / "monitor" / "dalle" / "dalle_loss.csv").read_text().split()

    assert csv(run) == csv(aside[0]) and csv(run)[0] == "step,loss" and len(csv(run)) == 2
    assert (run / "checkpoints" / "latest").read_text() == "step00000001"
