"""Sampling from an image prompt (the paper's image-to-image translation, §3.3): the pipeline encodes the top rows
of an image, every candidate keeps those codes, and launch/sample.py draws the prompt beside the candidates.
The sampler's own parity (cached = full forward with a prefix) is in tests/test_dalle_model.py."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ds.sample.pipeline import TextToImage
from dalle_ds.utils.images import fade_below
from launch_utils import load_script
from tiny_artifacts import export_tiny_text_to_image

sample = load_script("launch/sample.py", "launch_sample_prompt")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny exported prior (4 × 4 code grid, 16 × 16 images) with its tokenizer and dVAE, and a prompt image."""
    d = tmp_path_factory.mktemp("prompt")
    export_tiny_text_to_image(d, ["a red circle", "a small blue square"] * 4, image_size=16, n_layers=2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(d / "prompt.png")  # not square
    return d


def _images(n, seed):
    return torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_candidates_keep_the_prompt_codes(art, monkeypatch):
    pipe = TextToImage.load(art / "prior" / "dalle.pt")
    images = _images(2, seed=int(torch.randint(0, 2**30, ())))
    codes = pipe.encode_prompt(images, rows=3)
    full = pipe.dvae.encode(images).reshape(2, -1)
    assert codes.shape == (2, 12) and torch.equal(codes, full[:, :12])
    assert pipe.encode_prompt(images, rows=0).shape == (2, 0)
    decoded = []
    real_decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda c: decoded.append(c.clone()) or real_decode(c))
    results = pipe.generate(["a red circle", "a small blue square"], num_candidates=3, batch_size=4,
                            prompt_codes=codes)
    sampled = torch.cat(decoded)  # sampling order: caption 0's three candidates, then caption 1's
    assert sampled.shape == (6, 16)
    assert torch.equal(sampled[:, :12], codes.repeat_interleave(3, dim=0))
    assert [r.images.shape for r in results] == [(3, 3, 16, 16)] * 2
    with pytest.raises(ValueError, match=r"prompt_codes must be \[2 captions, P\]"):
        pipe.generate(["a red circle", "a small blue square"], 3, prompt_codes=codes[:1])
    with pytest.raises(ValueError, match="prompt rows must be in 0..4"):
        pipe.encode_prompt(images, rows=5)
    # generate's own arguments (a str was sampled as one caption per character)
    with pytest.raises(TypeError, match="captions must be a list of str"):
        pipe.generate("a red circle", 1)
    for kwargs, needle in (({"num_candidates": 0}, "num_candidates must be an int ≥ 1, got 0"),
                           ({"num_candidates": 1, "batch_size": 0}, "batch_size must be an int ≥ 1, got 0")):
        with pytest.raises(ValueError, match=needle):
            pipe.generate(["a red circle"], **kwargs)
    with pytest.raises(TypeError, match="sampling must be a SamplingConfig, got dict"):
        pipe.generate(["a red circle"], 1, sampling={"temperature": 1.0})
    with pytest.raises(ValueError, match=r"prompt images must be \[N, 3, 16, 16\]"):
        pipe.encode_prompt(images[:, :, :8], rows=1)


def test_fade_below_fades_only_the_rows_not_given():
    image = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    shown = fade_below(image, rows=1, grid=4)
    assert torch.equal(shown[:, :4], image[:, :4]) and int(shown[:, 4:].max()) == int(shown[:, 4:].min()) == 146
    assert int(image.max()) == 200  # the prompt itself is untouched


def test_sample_cli_with_an_image_prompt(art, tmp_path):
    out = tmp_path / "out"
    rc = sample.main(["--prior", str(art / "prior" / "dalle.pt"), "--caption", "a red circle",
                      "--caption", "a small blue square", "--num_candidates", "3", "--keep", "2",
                      "--image_prompt", str(art / "prompt.png"), "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "samples.json").read_text())
    assert result["prompt_rows"] == 2 and result["image_prompt"] == str(art / "prompt.png")  # default: half the grid
    grid = np.asarray(Image.open(out / "grids" / "0000.png"))
    # one column more than the candidates (the prompt), each tile 16 px at scale 2 with 2 px padding, and a title band
    assert grid.shape[1] == 4 * (32 + 2) + 2 and grid.shape[0] == 14 + 32 + 4


def test_scene_prompts_are_drawn_at_the_dvae_size(tmp_path):
    """The shapes data renders at 64 and 128 px (the same scenes at both): with a 128-px dVAE, ``--image_prompt
    scene`` draws each caption's scene at 128 px (it was drawn at 64 and refused as the wrong size)."""
    d = tmp_path / "art128"
    d.mkdir()
    export_tiny_text_to_image(d, ["a red circle", "a small blue square"] * 4, image_size=128)
    out = tmp_path / "out"
    rc = sample.main(["--prior", str(d / "prior" / "dalle.pt"), "--shapes_split", "test_id", "--num_captions", "1",
                      "--image_prompt", "scene", "--prompt_rows", "31", "--num_candidates", "1", "--keep", "1",
                      "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "samples.json").read_text())["prompt_rows"] == 31


def test_a_rerun_into_the_same_out_replaces_the_earlier_samples(art, tmp_path, capsys):
    """A second run into the same --out with fewer captions and no --shapes_split / --save_candidates left the first
    run's metrics.json, candidates.pt and grids beside its samples.json, as if they were its own."""
    out = tmp_path / "out"
    common = ["--prior", str(art / "prior" / "dalle.pt"), "--num_candidates", "2", "--keep", "1", "--out", str(out)]
    assert sample.main([*common, "--shapes_split", "test_id", "--num_captions", "3", "--save_candidates"]) == 0
    assert (out / "metrics.json").is_file() and len(list((out / "grids").iterdir())) == 3
    capsys.readouterr()
    assert sample.main([*common, "--caption", "a red circle"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grids", "samples.json"]
    assert [p.name for p in (out / "grids").iterdir()] == ["0000.png"]
    assert "held an earlier run's samples (candidates.pt, metrics.json, samples.json, 3 grids): replaced" in \
        capsys.readouterr().err


def test_metrics_json_is_written_last(art, tmp_path, monkeypatch):
    """launch/demo.sh skips the sampling stage when its metrics.json exists: a run that failed while writing
    candidates.pt (written after it) left metrics.json behind, and the demo took the stage as done."""
    out = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        sample.main(["--prior", str(art / "prior" / "dalle.pt"), "--shapes_split", "test_id", "--num_captions", "2",
                     "--num_candidates", "2", "--keep", "1", "--save_candidates", "--out", str(out)])
    assert not (out / "metrics.json").exists() and not list(out.glob("*.pt")) and not list(out.glob(".*"))
    from dalle_ds.train.distributed import shutdown_distributed

    shutdown_distributed()  # distributed_run leaves the group up when its block raises: not for the next test
