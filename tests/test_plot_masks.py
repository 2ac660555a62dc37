"""launch/plot_masks.py: the picture is drawn from the mask definition and the block layout, pixel for pixel."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import plot_masks  # noqa: E402

from dalle_ds.ops.attention.layouts import FULL, PARTIAL, SKIP, block_status  # noqa: E402
from dalle_ds.ops.attention.masks import MaskSpec, kept_elements  # noqa: E402


def test_panel_pixels_match_the_mask_and_the_tiles():
    spec = MaskSpec("column", 3, 5)  # transposed kernel order, N = 28, tiles overhang the end
    n = spec.seq_len
    pic, counts = plot_masks.panel(spec, 8, 4, size=n)  # one pixel per (query, key) pair
    px = np.asarray(pic).reshape(-1, 3)
    colour = {name: np.all(px == np.array(rgb), axis=1).sum()
              for name, rgb in (("full", plot_masks.TILE_RGB[FULL][0]), ("shown", plot_masks.TILE_RGB[PARTIAL][0]),
                                ("masked", plot_masks.TILE_RGB[PARTIAL][1]), ("white", (255, 255, 255)))}
    vis = spec.dense(order="kernel")
    status = block_status(spec, 8, 4, order="kernel")
    tile = status.repeat_interleave(8, 0)[:n].repeat_interleave(4, 1)[:, :n]
    assert colour["full"] == int(((tile == FULL) & vis).sum()) and int(((tile == FULL) & ~vis).sum()) == 0
    assert colour["shown"] == int(((tile == PARTIAL) & vis).sum())
    assert colour["masked"] == int(((tile == PARTIAL) & ~vis).sum())
    assert colour["white"] == int((tile == SKIP).sum()) and sum(colour.values()) == n * n
    assert counts["kept"] == kept_elements(spec) and counts["causal"] == n * (n + 1) // 2
    assert (counts["full"], counts["partial"]) == (int((status == FULL).sum()), int((status == PARTIAL).sum()))


def test_cli_writes_the_sheet(tmp_path):
    out = plot_masks.main(["--text-len", "2", "--grid", "4", "--conv-kernel", "3", "--block", "4", "--size", "40",
                           "--out", str(tmp_path / "m.png")])
    img = Image.open(out)
    assert img.size == (3 * 40 + 4 * 16, 40 + plot_masks.CAPTION_PX + 32)
    assert torch.tensor(np.asarray(img)).float().std() > 0  # not blank


@pytest.mark.parametrize("extra, message", [
    (["--kinds", "row,rows"], "--kinds must be one of"),
    (["--grid", "0"], "--grid must be >= 1"),
    (["--text-len", "-1"], "--text-len must be >= 0"),
    (["--conv-kernel", "4"], "--conv-kernel must be a positive odd number"),
    (["--out", "{tmp}/masks"], "want a file ending in .png"),
])
def test_cli_refuses_bad_flags_with_a_usage_error(tmp_path, capsys, extra, message):
    """A mask the flags cannot describe, or an --out PIL cannot pick a format for, is a usage error naming the
    flag (exit 2), not MaskSpec's or PIL's traceback after the drawing."""
    argv = ["--text-len", "2", "--grid", "4", "--block", "4", "--size", "16", "--out", str(tmp_path / "m.png")]
    with pytest.raises(SystemExit) as e:
        plot_masks.main(argv + [a.format(tmp=tmp_path) for a in extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
