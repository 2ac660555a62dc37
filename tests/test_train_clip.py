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
    expected = rr.score(images, [captions[0]] * 8)  # the rerank order is the order of the image–caption scores
    assert order.tolist() == expected.argsort(descending=True)[:3].tolist()
