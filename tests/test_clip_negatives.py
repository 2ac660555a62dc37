"""Hard negatives for the contrastive reranker: the loss, the negative captions, the dVAE round trip."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle_ds.config import DVAEConfig
from dalle_ds.data.shapes import ShapesDataset, contrast_attributes, sample_scene
from dalle_ds.eval.shapes_scorer import parse_caption
from dalle_ds.models.dvae import DiscreteVAE
from dalle_ds.train.clip_trainer import DvaeRoundTrip, hard_negative_captions, loss_with_hard_negatives
from dalle_ds.train.dvae_trainer import export_dvae


def _logits(b: int, n_img: int, n_txt: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b + n_img, b + n_txt, generator=g, dtype=torch.float64) * 3


def test_without_negatives_it_is_clipmodels_own_loss():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, eos_token_id=49)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    ids = torch.randint(1, 48, (6, 8))
    ids[:, -1] = 49
    out = model(input_ids=ids, pixel_values=torch.randn(6, 3, 16, 16), return_loss=True)
    ours = loss_with_hard_negatives(out.logits_per_image, out.logits_per_text, 6)
    assert torch.allclose(ours, out.loss, atol=1e-6)


def test_negatives_enter_only_as_wrong_answers():
    b, n_img, n_txt = 5, 3, 7
    per_image = _logits(b, n_img, n_txt)
    target = torch.arange(b)
    expected = 0.5 * (F.cross_entropy(per_image[:b], target) + F.cross_entropy(per_image.T[:b], target))
    got = loss_with_hard_negatives(per_image, per_image.T, b)
    assert torch.allclose(got.double(), expected.double())
    # A negative caption that image 0 prefers raises the loss; a negative image's own row does not matter.
    harder = per_image.clone()
    harder[0, b] = harder[0, 0] + 5
    assert loss_with_hard_negatives(harder, harder.T, b) > got
    other = per_image.clone()
    other[b:, :] = 0  # rows of the negative images (they have no caption of their own) ...
    other[b:, :b] = per_image[b:, :b]  # ... except the columns where they compete for the true captions
    assert torch.allclose(loss_with_hard_negatives(other, other.T, b), got)


def test_hard_negative_captions_change_a_different_attribute_each():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(0, "train", i) for i in range(40)]
    for k in (1, 2, 4):
        out = hard_negative_captions(scenes, k, rng)
        assert len(out) == sum(min(k, len(contrast_attributes(s))) for s in scenes)
    out, at = hard_negative_captions(scenes, 4, rng), 0
    for scene in scenes:
        n = len(contrast_attributes(scene))
        captions = out[at:at + n]
        at += n
        assert scene["caption"] not in captions and len(set(captions)) == n
        truth = parse_caption(scene["caption"])
        changed = set()
        for c in captions:  # which attribute each one changed: all different
            fake = parse_caption(c)
            diff = {a for a in ("relation", "position") if fake[a] != truth[a]}
            diff |= {a for o, f in zip(truth["objects"], fake["objects"]) for a in ("color", "shape", "size")
                     if o[a] != f[a]}
            assert len(diff) == 1
            changed |= diff
        assert changed == set(contrast_attributes(scene))


def test_dvae_round_trip_is_encode_then_decode(tmp_path):
    torch.manual_seed(0)
    cfg = DVAEConfig(image_size=64, vocab_size=32, hidden=8, blocks_per_group=1, groups=3, decoder_init=8)
    model = DiscreteVAE(cfg).eval()
    export_dvae(tmp_path / "dvae.pt", cfg, model.state_dict(), step=0)
    images = torch.stack([ShapesDataset("train", 3)[i]["image"] for i in range(3)])
    out = DvaeRoundTrip(tmp_path / "dvae.pt")(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    reference = model.reconstruct(images)  # fp32, NCHW
    # bf16 autocast may flip a near-tied argmax code; most pixels must agree to within bf16 rounding.
    close = ((out.int() - reference.int()).abs() <= 8).float().mean()
    assert close > 0.95, float(close)
    assert not torch.equal(out, images)


def test_clip_config_rejects_bad_negative_settings():
    from dalle_ds.config import CLIP_RUN_PRESETS, ConfigError
    import dataclasses

    with pytest.raises(ConfigError, match="hard_negatives"):
        dataclasses.replace(CLIP_RUN_PRESETS["test"], hard_negatives=-1).validate()
    with pytest.raises(ConfigError, match="dvae"):
        dataclasses.replace(CLIP_RUN_PRESETS["test"], dvae="/no/such/dvae.pt").validate()
