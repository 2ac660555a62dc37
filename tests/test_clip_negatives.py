"""Hard negatives for the contrastive reranker: the loss, the negative captions, the dVAE round trip."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle_ds.config import ConfigError, DVAEConfig
from dalle_ds.data.shapes import ShapesDataset, contrast_attributes, sample_scene
from dalle_ds.eval.shapes_scorer import parse_caption
from dalle_ds.models.dvae import DiscreteVAE
from dalle_ds.train.clip_trainer import DvaeRoundTrip, contrastive_loss, hard_negative_captions
from dalle_ds.train.dvae_trainer import export_dvae


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


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
    ours = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), 6)
    assert torch.allclose(ours, out.loss, atol=1e-6)


def test_negatives_enter_only_as_wrong_answers():
    b, n_img, n_txt, scale = 5, 3, 7, 4.0
    img, txt = _unit(b + n_img, 8, 1), _unit(b + n_txt, 8, 2)
    per_image = scale * img @ txt.T  # [B + N, B + M]
    target = torch.arange(b)
    expected = 0.5 * (F.cross_entropy(per_image[:b], target) + F.cross_entropy(per_image.T[:b], target))
    got = contrastive_loss(img, txt, torch.tensor(scale), b)
    assert torch.allclose(got.double(), expected.double())
    # A negative caption that image 0 prefers raises the loss; a negative image's own similarity to a negative
    # caption does not matter (neither has a partner).
    harder = txt.clone()
    harder[b] = img[0]
    assert contrastive_loss(img, harder, torch.tensor(scale), b) > got
    other = img.clone()
    other[b:] = _unit(n_img, 8, 3)
    moved = contrastive_loss(other, txt, torch.tensor(scale), b)
    per_other = scale * other @ txt.T
    assert torch.allclose(moved.double(), 0.5 * (F.cross_entropy(per_image[:b], target)
                                                 + F.cross_entropy(per_other.T[:b], target)).double())


def _two_ranks(rank: int, world: int) -> None:
    """Each rank holds 3 pairs and its own negatives; the gathered loss must give every rank's embeddings the
    gradient of the global-batch loss (times the world size, which DeepSpeed's gradient averaging divides out)."""
    b, d, scale = 3, 8, torch.tensor(5.0, dtype=torch.float64)
    img, txt = _unit(world * b, d, 10), _unit(world * b, d, 11)
    neg_txt = [_unit(2, d, 20 + r) for r in range(world)]
    mine = slice(rank * b, (rank + 1) * b)
    local_img = img[mine].clone().requires_grad_()  # no negative images here
    local_txt = torch.cat([txt[mine], neg_txt[rank]]).requires_grad_()
    loss = contrastive_loss(local_img, local_txt, scale, b)
    loss.backward()
    # Reference, one process: every rank's rows against every pair plus that rank's negatives.
    ref_img, ref_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref_neg = [n.clone().requires_grad_() for n in neg_txt]
    losses = []
    for r in range(world):
        rows = slice(r * b, (r + 1) * b)
        target = torch.arange(r * b, (r + 1) * b)
        per_image = scale * ref_img[rows] @ torch.cat([ref_txt, ref_neg[r]]).T
        per_text = scale * ref_txt[rows] @ ref_img.T
        losses.append(0.5 * (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target)))
    assert torch.allclose(loss.detach(), losses[rank].detach())
    global_loss = torch.stack(losses).mean()
    global_loss.backward()
    assert torch.allclose(local_img.grad, world * ref_img.grad[mine], atol=1e-12)
    assert torch.allclose(local_txt.grad[:b], world * ref_txt.grad[mine], atol=1e-12)
    assert torch.allclose(local_txt.grad[b:], world * ref_neg[rank].grad, atol=1e-12)


@pytest.mark.distributed
def test_two_ranks_contrast_against_the_global_batch():
    from dalle_ds.dist.local_ranks import run_local_ranks

    run_local_ranks(_two_ranks, 2)


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
    out = DvaeRoundTrip(tmp_path / "dvae.pt", 64)(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    reference = model.reconstruct(images)  # fp32, NCHW
    # bf16 autocast may flip a near-tied argmax code; most pixels must agree to within bf16 rounding.
    close = ((out.int() - reference.int()).abs() <= 8).float().mean()
    assert close > 0.95, float(close)
    assert not torch.equal(out, images)
    # a CLIP at another size than the dVAE's: refused at start (the dVAE now checks its input size when encoding)
    with pytest.raises(ConfigError, match="encodes 64 px images, the CLIP sees 128 px"):
        DvaeRoundTrip(tmp_path / "dvae.pt", 128)


def test_clip_config_rejects_bad_negative_settings():
    from dalle_ds.config import CLIP_RUN_PRESETS, ConfigError
    import dataclasses

    with pytest.raises(ConfigError, match="hard_negatives"):
        dataclasses.replace(CLIP_RUN_PRESETS["test"], hard_negatives=-1).validate()
    with pytest.raises(ConfigError, match="dvae"):
        dataclasses.replace(CLIP_RUN_PRESETS["test"], dvae="/no/such/dvae.pt").validate()
