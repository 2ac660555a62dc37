"""The CLIP vision tower's position-embedding start (``ClipModelConfig.vision_position_init``)."""
import dataclasses
import math

import pytest
import torch

from dalle_ds.config import CLIP_RUN_PRESETS, ClipModelConfig, ConfigError
from dalle_ds.sample.clip import build_clip, sincos2d_table


class _Tok:
    """The few tokenizer fields build_clip reads."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 9

    def __len__(self):
        return 10


def test_sincos2d_table_matches_the_formula_elementwise():
    grid, dim = 3, 8
    table = sincos2d_table(grid, dim)
    assert table.shape == (grid * grid, dim)
    for r in range(grid):
        for c in range(grid):
            row = table[r * grid + c]
            for k in range(dim // 4):
                f = 10000.0 ** (-k / (dim // 4))
                expect = [math.sin(r * f), math.cos(r * f), math.sin(c * f), math.cos(c * f)]
                got = [row[k], row[dim // 4 + k], row[dim // 2 + k], row[3 * dim // 4 + k]]
                assert [float(g) for g in got] == pytest.approx(expect, abs=1e-6)
    # every patch gets its own code
    assert len({tuple(r.tolist()) for r in table}) == grid * grid
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos2d_table(3, 6)


def test_build_clip_starts_from_the_table_or_from_transformers_default():
    cfg = ClipModelConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, projection_dim=16, text_len=8)
    torch.manual_seed(0)
    weight = build_clip(cfg, _Tok()).vision_model.embeddings.position_embedding.weight
    assert torch.equal(weight[0], torch.zeros(32))  # the class token has no grid position
    assert torch.equal(weight[1:], sincos2d_table(4, 32))
    torch.manual_seed(0)
    default = build_clip(dataclasses.replace(cfg, vision_position_init="default"), _Tok())
    w = default.vision_model.embeddings.position_embedding.weight
    assert w.abs().max() < 0.2 and not torch.equal(w[1:], sincos2d_table(4, 32))


def test_clip_config_rejects_an_unknown_position_init():
    preset = CLIP_RUN_PRESETS["test"]
    with pytest.raises(ConfigError, match="vision_position_init"):
        dataclasses.replace(preset, model=dataclasses.replace(preset.model, vision_position_init="rope")).validate()
    with pytest.raises(ConfigError, match="divisible by 4"):
        dataclasses.replace(preset, model=dataclasses.replace(preset.model, width=30, heads=2)).validate()
