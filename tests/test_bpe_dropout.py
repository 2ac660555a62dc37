"""Seeded BPE dropout (dalle_ds/data/bpe_dropout.py): at rate 0 it is the trained tokenizer's own segmentation; with
a rate it follows Provilkov et al.'s rule, repeats for a seed, keeps the text, and reaches the training batches
keyed by (epoch, index) so that a resumed run sees the same segmentations."""
import random
from dataclasses import replace

import pytest
import torch

from dalle_ds.config import DALLE_RUN_PRESETS, DALLE_PRESETS, ConfigError, DalleDataConfig
from dalle_ds.data.bpe_dropout import SeededBPEDropout
from dalle_ds.data.tokenizer import train_caption_tokenizer
from dalle_ds.train.dalle_trainer import CaptionCollate
from dalle_ds.train.data_loading import StepBatches


@pytest.fixture(scope="module")
def corpus():
    import pydoc_data.topics as topics  # ~465k characters of stdlib prose and code, bundled with Python

    return [line for text in topics.topics.values() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_caption_tokenizer(corpus, vocab_size=2000, max_length=64)


def _random_texts(rng: random.Random, n: int) -> list[str]:
    """Mixed-script strings with runs of letters, digits, punctuation, spaces and emoji."""
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,;:'\"!?-_()[] éüßñ ÆØ жзк 日本語 한국 🎉🙂 \t\n"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(n)]


def test_rate_zero_is_the_tokenizers_segmentation(tok, corpus):
    seed = random.randrange(2**32)  # fresh inputs every run; the seed is in the failure message
    rng = random.Random(seed)
    texts = rng.sample(corpus, 1500) + _random_texts(rng, 300) + ["", "   ", "aaaa aaa aa a", "x" * 400]
    enc = SeededBPEDropout(tok._backend)
    for text in texts:
        want = tok._backend.encode(text, add_special_tokens=False).ids
        assert enc.encode(text, 0.0, seed=0) == want, (seed, text)


def test_dropout_repeats_for_a_seed_keeps_the_text_and_splits_more(tok, corpus):
    texts = corpus[:400]
    enc = SeededBPEDropout(tok._backend)
    plain = [enc.encode(t, 0.0, 0) for t in texts]
    dropped = [enc.encode(t, 0.1, i) for i, t in enumerate(texts)]
    assert dropped == [enc.encode(t, 0.1, i) for i, t in enumerate(texts)]  # a seed gives one segmentation
    assert sum(a != b for a, b in zip(plain, [enc.encode(t, 0.1, i + 1) for i, t in enumerate(texts)])) > 200
    for t, p, d in zip(texts, plain, dropped):
        assert tok._backend.decode(d) == tok._backend.decode(p), t  # the same text, cut elsewhere
    n_plain, n_dropped = sum(map(len, plain)), sum(map(len, dropped))
    assert 1.05 * n_plain < n_dropped < 3 * n_plain, (n_plain, n_dropped)  # dropped merges leave more pieces
    # At a rate near 1 almost every merge is dropped: nearly one token per byte.
    n_bytes = sum(len(t.lower().encode()) for t in texts)
    assert sum(len(enc.encode(t, 0.99, 7)) for t in texts) > 0.9 * n_bytes


class _Draws:
    """A stand-in for random.Random: random() returns the listed values in turn."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_the_merge_rule(tok):
    enc = SeededBPEDropout(tok._backend)
    enc.ranks = {("a", "b"): 0, ("b", "c"): 1, ("ab", "c"): 2, ("a", "a"): 3, ("aa", "aa"): 4}
    assert enc.segment_word("abc", 0.0, None) == ["abc"]
    # Step 1 drops (a, b) and keeps (b, c): b and c merge; (a, bc) is no merge, so the word ends there.
    assert enc.segment_word("abc", 0.5, _Draws([0.1, 0.9])) == ["a", "bc"]
    # Every candidate of a step dropped: the segmentation stops, even though later steps could have merged.
    assert enc.segment_word("abc", 0.5, _Draws([0.1, 0.2])) == ["a", "b", "c"]
    # (a, b) kept at step 1, then (ab, c) dropped at step 2.
    assert enc.segment_word("abc", 0.5, _Draws([0.7, 0.9, 0.3])) == ["ab", "c"]
    # The best merge applies at every surviving position, left to right, never overlapping.
    assert enc.segment_word("aaaa", 0.0, None) == ["aaaa"]
    assert enc.segment_word("aaa", 0.0, None) == ["aa", "a"]
    assert enc.segment_word("aaaa", 0.5, _Draws([0.1, 0.9, 0.9, 0.1])) == ["a", "aa", "a"]


def test_encode_arguments(tok):
    ids, lengths = tok.encode(["a b c", "def"], bpe_dropout=0.1, seeds=[1, 2])
    assert ids.shape == (2, 64) and lengths.tolist() == [int((ids[i] != 0).sum()) for i in range(2)]
    with pytest.raises(ValueError, match="seeds"):
        tok.encode(["a b c"], bpe_dropout=0.1)
    with pytest.raises(ValueError, match="one seed per caption"):
        tok.encode(["a", "b"], bpe_dropout=0.1, seeds=[1])
    with pytest.raises(ValueError, match="bpe_dropout"):
        tok.encode(["a"], bpe_dropout=1.0, seeds=[1])
    assert torch.equal(tok.encode(["a b c"], bpe_dropout=0.0, seeds=[5])[0], tok.encode(["a b c"])[0])


def test_config_and_paper_preset():
    assert DALLE_RUN_PRESETS["paper"].data.bpe_dropout == 0.1  # footnote 5
    assert DalleDataConfig().bpe_dropout == 0.0
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ConfigError, match="bpe_dropout"):
            DalleDataConfig(train_tokens=None, dvae=None, bpe_dropout=bad).validate()


class _Captions(torch.utils.data.Dataset):
    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"caption": self.texts[i], "image_tokens": torch.tensor([i])}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_batches_are_keyed_by_epoch_and_index(tok, corpus, num_workers):
    """Through StepBatches: a sample's segmentation changes from epoch to epoch, and a loader resumed mid-run
    yields the uninterrupted loader's ids (the workers learn the epoch with each index)."""
    ds = _Captions(corpus[:24])
    model_cfg = replace(DALLE_PRESETS["test"], text_len=65)  # the tokenizer's 64 caption tokens fit
    collate = CaptionCollate(tok, model_cfg, bpe_dropout=0.3, seed=11)
    sb = StepBatches(ds, 4, 1, 0, 5, num_workers, collate, tag_epoch=True)
    it = iter(sb)
    run = [next(it) for _ in range(3 * sb.batches_per_epoch)]  # three epochs of 6 batches
    by_sample: dict[int, list] = {}
    for batch in run:
        for i, row in zip(batch["image_tokens"].view(-1).tolist(), batch["text"]):
            by_sample.setdefault(i, []).append(row)
    assert all(len(rows) == 3 for rows in by_sample.values())
    changed = sum(not torch.equal(rows[0], rows[1]) or not torch.equal(rows[1], rows[2])
                  for rows in by_sample.values())
    assert changed > 12, changed
    resumed = StepBatches(ds, 4, 1, 0, 5, num_workers, collate, tag_epoch=True)
    resumed.load_state_dict({"epoch": 1, "index": 2})
    it = iter(resumed)
    for want in run[sb.batches_per_epoch + 2:]:
        got = next(it)
        assert torch.equal(got["text"], want["text"]) and torch.equal(got["image_tokens"], want["image_tokens"])
    # Without a key (validation) the collate segments plainly.
    plain = collate([ds[i] for i in range(4)])["text"]
    assert torch.equal(plain, CaptionCollate(tok, model_cfg)([ds[i] for i in range(4)])["text"])
