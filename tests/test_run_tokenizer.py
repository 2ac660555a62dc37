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


@pytest.mark.parametrize("trainer", ["dalle", "clip"])
def test_a_trainer_refuses_another_jobs_folder_before_writing_into_it(tmp_path, trainer):
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

            DalleTrainer(DALLE_RUN_PRESETS["test"], ds, tmp_path)
        else:
            from dalle_ds.train.clip_trainer import ClipTrainer

            ClipTrainer(CLIP_RUN_PRESETS[next(iter(CLIP_RUN_PRESETS))], ds, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no tokenizer folder left behind
