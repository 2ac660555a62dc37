"""Image conversion (to_chw_uint8), decoding (load_image) and batch collation (collate_samples)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ds.data.images import collate_samples, load_image, to_chw_uint8


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exact_size_rgb_is_returned_unchanged():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    out = to_chw_uint8(Image.fromarray(arr), 16)
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    assert torch.equal(out, torch.from_numpy(arr).permute(2, 0, 1))
    # the same through the numpy path, HWC and CHW
    assert torch.equal(to_chw_uint8(arr, 16), out)
    assert torch.equal(to_chw_uint8(np.moveaxis(arr, -1, 0).copy(), 16), out)


def test_non_square_is_centre_cropped():
    # 30 wide x 20 high: 5 red columns | 20 green | 5 blue. The centre 20x20 square is all green.
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[:, :5] = (255, 0, 0)
    arr[:, 5:25] = (0, 255, 0)
    arr[:, 25:] = (0, 0, 255)
    out = to_chw_uint8(Image.fromarray(arr), 20)
    assert out.shape == (3, 20, 20)
    assert torch.all(out[1] == 255) and torch.all(out[0] == 0) and torch.all(out[2] == 0)
    # tall image: 10 wide x 40 high, top/bottom bands cropped away
    tall = np.zeros((40, 10, 3), dtype=np.uint8)
    tall[15:25] = 200
    out = to_chw_uint8(tall, 10)
    assert out.shape == (3, 10, 10) and torch.all(out == 200)


def test_downscale_is_antialiased():
    # A 1-pixel checkerboard shrunk 8x must average to mid-grey; point sampling would give pure 0s or 255s.
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    out = to_chw_uint8(board, 8)
    assert out.shape == (3, 8, 8)
    assert int(out.min()) >= 100 and int(out.max()) <= 155
    # a constant image stays exactly constant
    flat = np.full((100, 70, 3), (12, 34, 56), dtype=np.uint8)
    out = to_chw_uint8(flat, 9)
    assert torch.equal(out, torch.tensor([12, 34, 56], dtype=torch.uint8).view(3, 1, 1).expand(3, 9, 9))


def test_upscale_small_grayscale():
    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    out = to_chw_uint8(gray, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA"])
def test_modes_become_rgb(mode):
    img = Image.new("RGB", (12, 12), (200, 200, 200)).convert(mode)
    out = to_chw_uint8(img, 12)
    assert out.shape == (3, 12, 12) and out.dtype == torch.uint8


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert torch.all(to_chw_uint8(img, 8) == 255)
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 255))  # opaque red
    out = to_chw_uint8(img, 8)
    assert torch.all(out[0] == 255) and torch.all(out[1:] == 0)


def test_sixteen_bit_and_float_inputs_are_scaled():
    img16 = Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16))
    assert torch.all(to_chw_uint8(img16, 6) == 255)
    assert torch.all(to_chw_uint8(np.full((6, 6), 65535, dtype=np.uint16), 6) == 255)
    assert torch.all(to_chw_uint8(np.full((6, 6, 3), 0.5, dtype=np.float32), 6) == 128)
    assert torch.all(to_chw_uint8(np.ones((6, 6), dtype=bool), 6) == 255)


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        to_chw_uint8(np.zeros((4, 4), np.uint8), 0)
    with pytest.raises(TypeError, match="PIL"):
        to_chw_uint8([[0, 1], [2, 3]], 2)
    with pytest.raises(ValueError, match="shape"):
        to_chw_uint8(np.zeros((5, 5, 2), np.uint8), 4)
    with pytest.raises(ValueError, match="dtype"):
        to_chw_uint8(np.zeros((4, 4), np.int32), 4)


def test_load_image_decodes_fully_or_raises(tmp_path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    data = _png_bytes(img)
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(img))
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    assert load_image(path).size == (40, 40)
    with pytest.raises(Exception):
        load_image(data[: len(data) // 2])  # truncated: header fine, pixels missing
    with pytest.raises(Exception):
        load_image(b"this is not an image")


def test_load_image_applies_exif_orientation():
    img = Image.new("RGB", (30, 10), (0, 128, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _png_bytes(img, "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (30, 10)
    assert load_image(data).size == (10, 30)


def test_collate_samples():
    batch = [
        {"image": torch.full((3, 4, 4), i, dtype=torch.uint8), "caption": f"c{i}", "label": i, "meta": {"k": i}}
        for i in range(3)
    ]
    batch[1]["caption"] = None
    batch[2]["extra"] = [1, 2]
    out = collate_samples(batch)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 3, 4, 4)
    assert [int(out["image"][i, 0, 0, 0]) for i in range(3)] == [0, 1, 2]
    assert out["caption"] == ["c0", "", "c2"]
    assert out["label"] == [0, 1, 2] and out["meta"] == [{"k": 0}, {"k": 1}, {"k": 2}]
    assert out["extra"] == [None, None, [1, 2]]
    with pytest.raises(ValueError, match="empty"):
        collate_samples([])
    bad = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8)}, {"image": torch.zeros(3, 5, 5, dtype=torch.uint8)}]
    with pytest.raises(ValueError, match="shape"):
        collate_samples(bad)
