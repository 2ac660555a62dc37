"""launch/plot_augment.py: the footprints it draws are where the crops' pixels come from."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import plot_augment  # noqa: E402

from dalle_ds.data.augment import CropPlan, PaperCrop, apply_plan  # noqa: E402


def test_footprint_is_the_source_of_the_crop():
    """Crop the footprint out of the original and area-resize it: that is the crop (up to the flip)."""
    img = plot_augment.example_image()
    for listing in ("dvae", "prior"):
        crop = PaperCrop(listing, 64, seed=1)
        for epoch in range(4):
            plan = crop.plan(*img.size, (epoch, 0))
            x0, y0, x1, y1 = plot_augment.footprint(plan, 64)
            assert 0 <= x0 < x1 <= img.size[0] and 0 <= y0 < y1 <= img.size[1]
            assert (x1 - x0) == pytest.approx(64 * plan.side / plan.t) == pytest.approx(y1 - y0)
            got = np.asarray(apply_plan(img, plan, 64), dtype=np.float64)
            direct = np.asarray(img.resize((64, 64), Image.Resampling.BOX, box=(x0, y0, x1, y1)), dtype=np.float64)
            direct = direct[:, ::-1] if plan.flip else direct
            assert np.abs(got - direct).mean() < 6  # same region: only the filters differ
    small = CropPlan(left=3, top=0, side=20, t=20, x=0, y=0, flip=False)
    assert plot_augment.footprint(small, 64) == (3, 0, 23, 20)


def test_cli(tmp_path, capsys):
    out = plot_augment.main(["--example", "--size", "32", "--n", "2", "--out", str(tmp_path / "c.png")])
    assert Image.open(out).size[0] > 2 * 96
    with pytest.raises(SystemExit):
        plot_augment.main(["--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        plot_augment.main([str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):  # no image extension: refused before drawing (Pillow would fail at the save)
        plot_augment.main(["--example", "--out", str(tmp_path / "crops")])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit):
        plot_augment.main([str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x.png")])
    assert "not an image Pillow can read" in capsys.readouterr().err
