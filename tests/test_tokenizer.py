"""Caption BPE tokenizer: vocab bound, lowercasing, round trips, truncation counts, save/load, transformers reload."""
import itertools
import logging
import pickle

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from dalle_ds.data.tokenizer import (
    BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, CaptionTokenizer, train_caption_tokenizer,
)

COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "white"]
SHAPES = ["circle", "square", "triangle", "cross"]
RELATIONS = ["above", "below", "to the left of", "to the right of"]


def _captions():
    out = [
        f"a {size} {c1} {s1} {rel} a {c2} {s2}"
        for (c1, s1), (c2, s2), rel, size in zip(
            itertools.product(COLOURS, SHAPES), itertools.product(reversed(COLOURS), SHAPES),
            itertools.cycle(RELATIONS), itertools.cycle(["small", "large"]),
        )
    ]
    out += [f"A {c.upper()} {s.title()} in the Top Left" for c in COLOURS for s in SHAPES]
    out += ["a photo of an ankle boot", "a black and white photo of a pair of trousers"]
    return out


CAPTIONS = _captions()


@pytest.fixture(scope="module")
def tok():
    return train_caption_tokenizer(CAPTIONS, vocab_size=400, max_length=16)


def test_special_ids_and_vocab_bound(tok):
    assert [tok.hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID, UNK_ID] == [0, 1, 2, 3]
    assert tok.pad_id == 0 and tok.max_length == 16
    assert 256 + 4 < tok.vocab_size <= 400 and len(tok) == tok.vocab_size
    big = train_caption_tokenizer(CAPTIONS, vocab_size=16384)
    assert tok.vocab_size <= big.vocab_size < 16384  # an upper bound: a small corpus gives a small vocab


def test_vocab_limit_is_reached_on_a_large_corpus():
    import pydoc_data.topics as topics  # ~465k characters of stdlib text, bundled with Python

    text = [t for t in topics.topics.values()]
    tok = train_caption_tokenizer(text, vocab_size=3000, max_length=256)
    assert tok.vocab_size == 3000


def test_lowercasing_and_whitespace(tok):
    a, la = tok.encode(["A RED Circle", "a red circle", "  a   red\tcircle  ", "Ａ ｒｅｄ circle"])  # incl. NFKC
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2]) and torch.equal(a[0], a[3])
    assert la.tolist() == [la[0].item()] * 4
    assert tok.normalize("  A  RED Circle ") == "a red circle"


def test_encode_layout_and_decode_round_trip():
    tok = train_caption_tokenizer(CAPTIONS, vocab_size=400, max_length=64)
    texts = ["a small red circle above a blue square", "A Purple Cross", "", "éclair ✓ 日本語 never seen"]
    ids, lengths = tok.encode(texts)
    assert tok.truncated_count == 0
    assert ids.dtype == torch.long and ids.shape == (4, 64) and lengths.dtype == torch.long
    for row, n in zip(ids, lengths.tolist()):
        assert torch.all(row[n:] == PAD_ID) and torch.all(row[:n] >= 4)  # no bos/eos/unk; pads after the caption
    assert lengths[2] == 0
    # merges learned from the corpus make known captions short
    assert lengths[0] < len("a small red circle above a blue square".split()) + 2
    decoded = tok.decode(ids, lengths)
    assert decoded == [tok.normalize(t) for t in texts]
    assert decoded[3] == "éclair ✓ 日本語 never seen"  # byte level: nothing is unknown
    assert tok.decode(ids) == decoded  # pads are skipped without lengths too
    assert tok.decode(ids[1]) == "a purple cross" and tok.decode(ids[1].tolist()) == "a purple cross"
    single, n = tok.encode("A Purple Cross")
    assert torch.equal(single[0], ids[1]) and n.tolist() == [lengths[1].item()]


def test_truncation_is_counted_and_warned(tok, caplog):
    long = " ".join(["a small red circle above a blue square"] * 5)
    full, _ = train_caption_tokenizer(CAPTIONS, vocab_size=400, max_length=200).encode([long])
    tok.truncated_count = 0
    with caplog.at_level(logging.WARNING, logger="dalle_ds.data.tokenizer"):
        ids, lengths = tok.encode([long, "a red circle", long])
    assert tok.truncated_count == 2
    assert lengths.tolist()[0] == lengths.tolist()[2] == 16
    assert torch.equal(ids[0], full[0, :16])  # truncation keeps the first max_length tokens
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated 1 of 2 captions (2 of 3 rows)" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalle_ds.data.tokenizer"):
        tok.encode(["a red circle"])
        tok.encode([long])
    assert tok.truncated_count == 3 and "3 truncated so far" in caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # no warning without truncation


def test_truncation_warning_counts_a_repeated_caption_once(caplog):
    """Sampling encodes one caption once per candidate image: the warning counts captions, and names the rows."""
    tok = train_caption_tokenizer(CAPTIONS, vocab_size=400, max_length=16)
    long = " ".join(["a small red circle above a blue square"] * 5)
    with caplog.at_level(logging.WARNING, logger="dalle_ds.data.tokenizer"):
        tok.encode([long] * 4)
    assert tok.truncated_count == 4
    assert "truncated 1 of 1 captions (4 of 4 rows) to max_length=16" in caplog.text
    assert "4 truncated so far" in caplog.text


def test_save_load_and_transformers_reload(tok, tmp_path):
    texts = CAPTIONS[:20] + ["Unseen WORDS, with punctuation!", ""]
    ids, lengths = tok.encode(texts)
    tok.save(tmp_path / "tok")
    again = CaptionTokenizer.load(tmp_path / "tok")
    assert (again.vocab_size, again.max_length) == (tok.vocab_size, tok.max_length)
    ids2, lengths2 = again.encode(texts)
    assert torch.equal(ids, ids2) and torch.equal(lengths, lengths2)
    assert again.decode(ids2, lengths2) == tok.decode(ids, lengths)
    # a plain transformers load, offline, gives the same ids and lowercases by itself
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.model_max_length == 16 and len(hf) == tok.vocab_size
    enc = hf(texts, padding="max_length", truncation=True)["input_ids"]
    assert torch.equal(torch.tensor(enc), ids)
    assert hf("A RED Circle")["input_ids"] == hf("a red circle")["input_ids"]
    shorter = CaptionTokenizer.load(tmp_path / "tok", max_length=4)
    assert shorter.encode(texts)[0].shape == (len(texts), 4)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CaptionTokenizer.load(tmp_path / "nothing")


def test_pickles_for_dataloader_workers(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.encode(CAPTIONS[:5])[0], tok.encode(CAPTIONS[:5])[0])


def test_retraining_is_deterministic(tok):
    again = train_caption_tokenizer(iter(CAPTIONS), vocab_size=400, max_length=16)  # any iterable
    assert again.hf.backend_tokenizer.to_str() == tok.hf.backend_tokenizer.to_str()
    assert torch.equal(again.encode(CAPTIONS)[0], tok.encode(CAPTIONS)[0])


def test_argument_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        train_caption_tokenizer(CAPTIONS, vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size"):
        train_caption_tokenizer(CAPTIONS, vocab_size=16385)
    assert train_caption_tokenizer(CAPTIONS[:10], vocab_size=20000, max_vocab_size=32768).vocab_size < 20000
    with pytest.raises(ValueError, match="max_length"):
        train_caption_tokenizer(CAPTIONS, max_length=0)
    with pytest.raises(ValueError, match="no captions"):
        train_caption_tokenizer([])
    with pytest.raises(TypeError):
        train_caption_tokenizer("a single string")
    with pytest.raises(TypeError):
        train_caption_tokenizer(["ok", 3])
