"""Importing OpenAI's released dVAE (dalle_ds/models/openai_dvae.py, launch/import_dvae.py).

The reference is the release's own code: the ``DALL-E`` package from PyPI (``dall_e``; installed by the Makefile
with ``--no-deps``, since it declares torchvision). Its Encoder and Decoder are built small, every weight and bias
drawn fresh (the release initializes biases to zero, which would hide a bias mapped to the wrong conv), pickled the
way the release's files are, imported, and run side by side.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalle_ds.config import DVAE_PRESETS
from dalle_ds.models.openai_dvae import convert_release, import_release, read_release_state, release_config
from dalle_ds.train.dvae_trainer import load_dvae

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
import import_dvae  # noqa: E402

dall_e = pytest.importorskip("dall_e", reason="the DALL-E package (pip install --no-deps DALL-E==0.1) is the "
                                              "reference for these tests")

K, HID, INIT = 512, 64, 32  # the release's classes refuse K < 512 and hidden < 64


def release_pair(blocks: int = 2, vocab: int = K, seed: int | None = None):
    """The release's Encoder and Decoder with every parameter drawn N(0, 0.05²) (a fresh seed each run unless
    given)."""
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    enc = dall_e.Encoder(n_hid=HID, n_blk_per_group=blocks, vocab_size=vocab)
    dec = dall_e.Decoder(n_init=INIT, n_hid=HID, n_blk_per_group=blocks, vocab_size=vocab)
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return enc.eval(), dec.eval()


def save(obj, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("form", ["module", "module_legacy_format", "state_dict"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_imported_model_computes_what_the_release_computes(tmp_path, form, blocks):
    enc, dec = release_pair(blocks)
    legacy = form == "module_legacy_format"
    files = [save(m.state_dict() if form == "state_dict" else m, tmp_path / f"{name}.pkl", legacy)
             for m, name in ((enc, "encoder"), (dec, "decoder"))]
    model = import_release(*files, image_size=32)
    assert (model.cfg.groups, model.cfg.blocks_per_group, model.cfg.vocab_size, model.cfg.grid_size) == \
        (4, blocks, K, 4)

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = dall_e.map_pixels(images.float() / 255)
    with torch.no_grad():
        ref_logits = enc(x)
        assert torch.equal(model.encoder(model.preprocess(images)), ref_logits)  # same convolutions, same order
        codes = ref_logits.argmax(1)
        assert torch.equal(model.encode(images), codes)
        z = torch.softmax(torch.randn(3, K, 4, 4), dim=1)  # a relaxed sample, as in training
        assert torch.equal(model.decoder(z), dec(z))
        # the release's way to decode codes (one-hot, decoder, sigmoid of the location, unmap) against ours
        # (an embedding lookup instead of the one-hot 1x1 conv: another summation order)
        ref_pixels = dall_e.unmap_pixels(torch.sigmoid(dec(F.one_hot(codes, K).permute(0, 3, 1, 2).float())[:, :3]))
    torch.testing.assert_close(model.decode(codes), ref_pixels, rtol=0, atol=1e-5)


def test_the_full_size_release_is_the_paper_preset():
    """The release's default sizes (built on the meta device: shapes only) read as this project's paper preset."""
    meta = torch.device("meta")
    enc = dall_e.Encoder(device=meta).state_dict()
    dec = dall_e.Decoder(device=meta).state_dict()
    assert release_config(enc, dec) == DVAE_PRESETS["paper"]


def test_every_release_tensor_is_used_once(tmp_path):
    enc, dec = release_pair(1, seed=0)
    e, d = enc.state_dict(), dec.state_dict()
    cfg = release_config(e, d)
    converted = convert_release(e, d, cfg)
    assert len(converted) == len(e) + len(d)
    e["blocks.group_1.block_1.res_path.conv_5.w"] = torch.zeros(1)
    with pytest.raises(ValueError, match="no place for: blocks.group_1.block_1.res_path.conv_5.w"):
        convert_release(e, d, cfg)


def test_mismatched_or_wrong_files_are_refused_with_the_reason(tmp_path):
    enc, dec = release_pair(1, seed=1)
    enc_file = save(enc, tmp_path / "encoder.pkl")
    dec_file = save(dec, tmp_path / "decoder.pkl")
    with pytest.raises(ValueError, match="holds the release's Decoder, not its Encoder .swapped files"):
        import_release(dec_file, enc_file)
    _, other_dec = release_pair(1, vocab=1024, seed=2)
    with pytest.raises(ValueError, match="encoder has K = 512 codes but the decoder reads 1024"):
        import_release(enc_file, save(other_dec, tmp_path / "other.pkl"))
    _, deeper_dec = release_pair(2, seed=3)
    with pytest.raises(ValueError, match="encoder has 4 groups × 1 blocks but the decoder"):
        import_release(enc_file, save(deeper_dec, tmp_path / "deeper.pkl"))
    bad = enc.state_dict()
    bad["blocks.group_2.block_1.res_path.conv_2.w"] = bad["blocks.group_2.block_1.res_path.conv_2.w"][:, :, :1, :1]
    with pytest.raises(ValueError, match=r"not the release's layout: the tensor for encoder.net.\d+.res_path.3.weight "
                                         r"has shape \(32, 32, 1, 1\)"):
        import_release(save(bad, tmp_path / "bad_enc.pkl"), dec_file)
    (tmp_path / "junk.pkl").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a torch file of the released dVAE encoder"):
        read_release_state(tmp_path / "junk.pkl", "encoder")
    with pytest.raises(ValueError, match="holds a list"):
        read_release_state(save([1, 2], tmp_path / "list.pkl"), "encoder")
    with pytest.raises(FileNotFoundError):
        read_release_state(tmp_path / "missing.pkl", "decoder")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls Path.touch: what a hostile file would do with os.system
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("legacy", [False, True])
def test_reading_a_file_runs_no_code_from_it(tmp_path, legacy):
    marker = tmp_path / "ran"
    bad = save({"blocks.input.w": torch.zeros(1), "payload": _Payload(marker)}, tmp_path / "encoder.pkl", legacy)
    with pytest.raises(ValueError, match="not a torch file of the released dVAE encoder"):
        read_release_state(bad, "encoder")
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the same file, loaded without the guard: the payload runs
    assert marker.exists()


def test_import_dvae_cli_writes_a_dvae_stage_2_loads(tmp_path, capsys):
    enc, dec = release_pair(1)
    out = tmp_path / "out"
    rc = import_dvae.main(["--encoder", str(save(enc, tmp_path / "encoder.pkl")),
                           "--decoder", str(save(dec, tmp_path / "decoder.pkl")), "--out", str(out),
                           "--image_size", "64", "--preview_data", "shapes", "--preview_images", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "64x64 images -> 8x8 codes of K = 512" in printed and "preview: 8 images" in printed
    model = load_dvae(out / "dvae.pt")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model.encode(images), enc(dall_e.map_pixels(images.float() / 255)).argmax(1))
    report = json.loads((out / "import.json").read_text())
    assert report["config"]["vocab_size"] == 512 and report["preview"]["num_images"] == 8
    assert 0 < report["preview"]["codes_used"] <= 512
    assert (out / "reconstructions.png").stat().st_size > 0


def test_import_dvae_cli_argument_errors(tmp_path, capsys):
    enc_file = save(release_pair(1, seed=4)[0], tmp_path / "encoder.pkl")
    with pytest.raises(SystemExit):
        import_dvae.parse_args(["--encoder", str(enc_file), "--decoder", str(tmp_path / "nope.pkl"),
                                "--out", str(tmp_path / "o")])
    assert "--decoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        import_dvae.parse_args(["--encoder", str(tmp_path), "--decoder", str(enc_file), "--out", str(tmp_path / "o"),
                                ])
    assert f"did you mean {tmp_path / 'encoder.pkl'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        import_dvae.parse_args(["--encoder", str(enc_file), "--decoder", str(enc_file), "--out", str(tmp_path / "o"),
                                "--preview_path", str(tmp_path)])
    assert "--preview_path goes with --preview_data" in capsys.readouterr().err
    # the swapped pair fails as one line with exit code 2, before anything is written
    rc = import_dvae.main(["--encoder", str(enc_file), "--decoder", str(enc_file), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not its Decoder" in capsys.readouterr().err
    # so does a preview folder that is not there, before dvae.pt is written
    dec_file = save(release_pair(1, seed=4)[1], tmp_path / "decoder.pkl")
    rc = import_dvae.main(["--encoder", str(enc_file), "--decoder", str(dec_file), "--out", str(tmp_path / "o"),
                           "--preview_data", "imagefolder", "--preview_path", str(tmp_path / "no_images")])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_import_dvae_cli_does_not_replace_a_trained_dvae(tmp_path, capsys):
    """The README imports into runs/dvae, train_dvae.py's folder: a dvae.pt trained there (token shards and priors
    name it) is refused, unchanged, before anything is written; an earlier import is replaced."""
    from dalle_ds.models.dvae import DiscreteVAE
    from dalle_ds.train.dvae_trainer import export_dvae

    enc, dec = release_pair(1, seed=5)
    files = [str(save(enc, tmp_path / "encoder.pkl")), str(save(dec, tmp_path / "decoder.pkl"))]
    trained = tmp_path / "runs" / "dvae"
    from dalle_ds.config import DVAEConfig

    cfg = DVAEConfig(image_size=16, vocab_size=16, hidden=4, blocks_per_group=1, groups=3, decoder_init=8)
    export_dvae(trained / "dvae.pt", cfg, DiscreteVAE(cfg).state_dict(), step=100, metrics={"eval": {"loss": 1.0}})
    before = (trained / "dvae.pt").read_bytes()
    argv = ["--encoder", files[0], "--decoder", files[1], "--image_size", "32"]
    assert import_dvae.main([*argv, "--out", str(trained)]) == 2
    err = capsys.readouterr().err
    assert f"--out {trained}: holds a dvae.pt that is not an import" in err and len(err.strip().splitlines()) == 1
    assert (trained / "dvae.pt").read_bytes() == before and not (trained / "import.json").exists()
    imported = tmp_path / "runs" / "openai_dvae"
    assert import_dvae.main([*argv, "--out", str(imported)]) == 0
    assert import_dvae.main([*argv, "--out", str(imported)]) == 0  # an earlier import: replaced
