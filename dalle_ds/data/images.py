"""Image helpers shared by every dataset: decoding, conversion to a fixed-size uint8 CHW tensor, and batch collation.

Conventions used throughout ``dalle_ds.data``:

* A sample is a dict ``{"image": torch.uint8 [3, S, S], "caption": str, ...}``. Images stay uint8 until the model
  (the dVAE maps them to its own input range), which keeps DataLoader traffic 4x smaller than float32.
* Every image becomes 3-channel RGB at ``S x S``: grayscale is repeated over the channels, transparent images are
  composited onto white, and non-square images are centre-cropped to a square then resized with an antialiasing
  filter (see :func:`to_chw_uint8` for why).
"""
from __future__ import annotations

import io
import os
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["load_image", "to_rgb", "to_chw_uint8", "collate_samples"]

ImageLike = Union[Image.Image, np.ndarray]

# Pillow's bicubic resize is antialiased: its filter support is widened by the downscale factor, so shrinking a
# large photo averages all covered pixels instead of sampling (unlike torch's interpolate without antialias=True).
_RESAMPLE = Image.Resampling.BICUBIC
# Transparent pixels are shown on white, the usual rendering of transparent PNG/WebP icons and drawings.
_ALPHA_BACKGROUND = (255, 255, 255)


def load_image(source: Union[str, os.PathLike, bytes, bytearray]) -> Image.Image:
    """Open an image from a path or encoded bytes and decode it fully.

    ``Image.open`` is lazy: it only reads the header, so a truncated file would fail later, inside whoever first
    touches the pixels (possibly a DataLoader worker). Calling ``load()`` here makes every decoding error surface at
    this call, where callers catch it. EXIF orientation (photos from phones and cameras) is applied, so the pixels
    are upright as a viewer would show them.

    Raises whatever Pillow raises for unreadable data (``PIL.UnidentifiedImageError``, ``OSError`` for truncated
    files, ``SyntaxError``/``ValueError`` for some broken formats, ``Image.DecompressionBombError``, ...).
    """
    if isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    else:
        img = Image.open(os.fspath(source))
    img.load()
    transposed = ImageOps.exif_transpose(img)
    return transposed if transposed is not None else img


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """HxW, HxWxC or CxHxW array (C in 1, 3, 4) → PIL image. Floats are read as values in [0, 1]."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW → HWC, only when the layout is unambiguous
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an HxW, HxWxC or CxHxW image array with C in (1, 3, 4), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) // 257).astype(np.uint8)  # 16-bit → 8-bit: 65535 maps to 255
    elif arr.dtype != np.uint8:
        raise ValueError(f"unsupported image array dtype {arr.dtype}; use uint8, uint16, bool or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB: grayscale repeated over 3 channels, alpha composited on white, 16-bit scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # Pillow's own I→L conversion clips at 255 instead of scaling; 16-bit PNGs open in these modes.
        arr = np.asarray(img, dtype=np.int64)
        img = Image.fromarray((np.clip(arr, 0, 65535) // 257).astype(np.uint8))
    elif img.mode == "F":
        img = _array_to_pil(np.asarray(img, dtype=np.float32))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_chw_uint8(img: ImageLike, image_size: int) -> torch.Tensor:
    """Convert an image to a ``torch.uint8`` tensor of shape ``[3, image_size, image_size]``.

    Steps: convert to RGB (grayscale → 3 equal channels; alpha composited on white; 16-bit scaled to 8-bit), take the
    largest centred square, resize it to ``image_size`` with Pillow's antialiased bicubic filter.

    Cropping the centre square and then resizing is the same as "resize the shorter side to ``image_size`` with
    antialiasing, then centre-crop" (the common choice for DALL-E-style training, which wants square inputs without
    distorting aspect ratios), but done in one resampling pass with no rounding of the longer side. We centre-crop
    rather than pad because padding bars would become tokens the model must learn to draw. Images that are already
    ``image_size`` square are not resampled at all, so built-in datasets rendered at the target size stay exact.

    Args:
        img: a PIL image (any mode) or a numpy array (HxW, HxWxC or CxHxW with C in 1/3/4; uint8, uint16, bool, or
            float in [0, 1]).
        image_size: output side length S (≥ 1).
    """
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    image_size = int(image_size)
    if isinstance(img, np.ndarray):
        img = _array_to_pil(img)
    elif not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image or numpy.ndarray, got {type(img).__name__}")
    img = to_rgb(img)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image of size {w}x{h}")
    if (w, h) != (image_size, image_size):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.resize((image_size, image_size), _RESAMPLE, box=(left, top, left + side, top + side))
    arr = np.asarray(img, dtype=np.uint8)  # H, W, 3
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def collate_samples(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate dataset samples for a DataLoader.

    ``"image"`` tensors are stacked into ``uint8 [B, 3, S, S]``; ``"caption"`` stays a ``list[str]`` (the tokenizer
    runs on whole batches later); every other key becomes a plain list, so metadata of any type (None, dicts, nested
    lists from a ``metadata.jsonl``) passes through without the surprises of ``default_collate``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    keys: list[str] = []
    for sample in batch:
        for key in sample:
            if key not in keys:
                keys.append(key)
    out: dict[str, Any] = {}
    for key in keys:
        values = [sample.get(key) for sample in batch]
        if key == "image":
            if any(not isinstance(v, torch.Tensor) for v in values):
                raise TypeError("every sample's 'image' must be a torch.Tensor")
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"images in a batch must share one shape, got {sorted(shapes)}")
            out[key] = torch.stack(values)
        elif key == "caption":
            out[key] = ["" if v is None else str(v) for v in values]
        else:
            out[key] = values
    return out
