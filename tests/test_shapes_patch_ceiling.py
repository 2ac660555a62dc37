"""The patch-ceiling probe's reductions: exact on block images, and a partly covered patch keeps its coverage only in
the mean."""
import sys

import torch

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_reductions_on_blocks_and_partial_patches():
    import shapes_patch_ceiling
    from dalle_ds.data.shapes import COLORS

    red = torch.tensor(next(iter(COLORS.values())), dtype=torch.float)
    img = torch.zeros(1, 3, 8, 8)
    img[0, :, :4, :4] = red[:, None, None]      # one full patch of a palette colour
    r = shapes_patch_ceiling.reductions(img, 4)
    assert torch.equal(r["majority colour, nearest"], img) and torch.equal(r["mean, nearest"], img)

    img[0, :, 4:, 4:5] = red[:, None, None]     # a quarter of the bottom-right patch
    r = shapes_patch_ceiling.reductions(img, 4)
    corner_major = r["majority colour, nearest"][0, :, 4:, 4:]
    corner_mean = r["mean, nearest"][0, :, 4:, 4:]
    assert torch.equal(corner_major, torch.zeros_like(corner_major))  # the majority is the background
    assert torch.allclose(corner_mean, (red / 4)[:, None, None].expand(3, 4, 4))  # coverage survives as a blend
