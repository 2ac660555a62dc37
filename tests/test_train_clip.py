"""The contrastive reranker: trained under the deepspeed launcher (2 CPU ranks), saved as a standard Hugging Face
CLIP folder, reloaded by transformers, and used to rerank candidates."""
import pytest
import torch

from dalle_ds.data.shapes import ShapesDataset
from dalle_ds.sample.clip import ClipReranker
from launch_utils import deepspeed_launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_clip_trains_saves_reloads_and_reranks(tmp_path):
    out = tmp_path / "clip"
    deepspeed_launch("launch/train_clip.py", ["--deepspeed_config", "ds_configs/cpu_clip.json", "--preset", "test",
                                              "--set", "steps=30", "--out", str(out)])
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(out / "clip")  # a plain transformers folder
    assert model.config.projection_dim == 32
    rr = ClipReranker.from_pretrained(out / "clip")
    ds = ShapesDataset("test_id", num_samples=8, seed=3)
    images = torch.stack([ds[i]["image"] for i in range(8)])
    captions = [ds.scene(i)["caption"] for i in range(8)]
    paired = rr.score(images, captions)
    assert paired.shape == (8,) and torch.isfinite(paired).all() and paired.abs().max() <= 1 + 1e-5
    order, scores = rr.rerank(images, captions[0], keep=3)
    assert order.shape == (3,) and scores.shape == (8,)
    expected = rr.score(images, [captions[0]] * 8)  # the caption encoded once gives the same image–caption scores
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert order.tolist() == scores.argsort(descending=True)[:3].tolist()


def test_clip_trains_with_hard_negatives_on_dvae_round_trips(tmp_path):
    import json

    from dalle_ds.config import DVAEConfig
    from dalle_ds.models.dvae import DiscreteVAE
    from dalle_ds.train.dvae_trainer import export_dvae

    torch.manual_seed(0)
    cfg = DVAEConfig(image_size=64, vocab_size=32, hidden=8, blocks_per_group=1, groups=3, decoder_init=8)
    export_dvae(tmp_path / "dvae.pt", cfg, DiscreteVAE(cfg).state_dict(), step=0)
    out = tmp_path / "clip"
    deepspeed_launch("launch/train_clip.py", ["--deepspeed_config", "ds_configs/cpu_clip.json", "--preset", "test",
                                              "--set", "steps=6", "--set", "hard_negatives=2",
                                              "--set", "mirror_negatives=true", "--set", "binding_negatives=true",
                                              "--set", f"dvae={tmp_path / 'dvae.pt'}",
                                              "--out", str(out)])
    metrics = json.loads((out / "clip_metrics.json").read_text())
    history = metrics["history"]
    assert len(history) == 6 and all(h["loss"] > 0 for h in history)
    ev = metrics["eval"]
    for key in ("contrast_color", "contrast_shape", "contrast_size", "contrast_position", "contrast_relation",
                "contrast_mirror_position", "contrast_mirror_relation", "contrast_all"):
        assert 0.0 <= ev[key] <= 1.0, (key, ev)


def test_clip_resumes_exactly(tmp_path):
    """A preempted CLIP run (``--stop_at``) continues with the losses of an uninterrupted one, hard and binding
    negatives included (drawn from a generator seeded by the update), and exports the same EMA weights."""
    import json

    from transformers import CLIPModel

    args = ["--deepspeed_config", "ds_configs/cpu_clip.json", "--preset", "test", "--set", "steps=8",
            "--set", "save_every=4", "--set", "hard_negatives=2", "--set", "binding_negatives=true"]
    full, parted = tmp_path / "full", tmp_path / "parted"
    deepspeed_launch("launch/train_clip.py", args + ["--out", str(full)])
    deepspeed_launch("launch/train_clip.py", args + ["--out", str(parted), "--stop_at", "4"])
    assert not (parted / "clip").exists()  # stopped after its checkpoint, before the export
    deepspeed_launch("launch/train_clip.py", args + ["--out", str(parted)])

    def history(run):
        return {h["step"]: h for h in json.loads((run / "clip_metrics.json").read_text())["history"]}

    a, b = history(full), history(parted)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
    wa = CLIPModel.from_pretrained(full / "clip").state_dict()
    wb = CLIPModel.from_pretrained(parted / "clip").state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)
