"""Image grids and PNG writing without torchvision (there is no CPU build of torchvision for torch 2.13)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[C, H, W] or [H, W, C], uint8 or float in [0, 1] → uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype != torch.uint8:
            image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
        image = image.numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def make_grid(images: Sequence, ncol: int, pad: int = 2, pad_value: int = 255, scale: int = 1) -> np.ndarray:
    """Tile images (all the same size) into a uint8 [H, W, 3] grid, row-major, ``ncol`` per row."""
    if not len(images):
        raise ValueError("make_grid needs at least one image")
    tiles = [to_uint8_hwc(im) for im in images]
    if scale > 1:
        tiles = [t.repeat(scale, 0).repeat(scale, 1) for t in tiles]
    h, w = tiles[0].shape[:2]
    nrow = (len(tiles) + ncol - 1) // ncol
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = t
    return grid


def save_png(array: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Write a uint8 [H, W, 3] array as PNG (optionally with a one-line title band above it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if title:
        band = Image.new("RGB", (img.width, 14), (255, 255, 255))
        ImageDraw.Draw(band).text((2, 1), title, fill=(0, 0, 0))
        canvas = Image.new("RGB", (img.width, img.height + band.height), (255, 255, 255))
        canvas.paste(band, (0, 0))
        canvas.paste(img, (0, band.height))
        img = canvas
    img.save(path)
    return path


def fade_below(image: torch.Tensor, rows: int, grid: int) -> torch.Tensor:
    """An image prompt as the prior sees it: uint8 [C, H, W] with the pixels below the top ``rows`` of ``grid`` code
    rows faded to grey (a new tensor)."""
    shown = image.clone()
    cut = rows * image.shape[-2] // grid
    shown[:, cut:] = (shown[:, cut:].float() * 0.25 + 96).round().to(torch.uint8)
    return shown


def reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor, ncol: int = 8, scale: int = 2) -> np.ndarray:
    """Pairs of rows: originals on top, their reconstructions below, ``ncol`` per row."""
    n = min(len(originals), len(recons))
    tiles = []
    for start in range(0, n, ncol):
        chunk = range(start, min(start + ncol, n))
        tiles += [originals[i] for i in chunk] + [None] * (ncol - len(chunk))
        tiles += [recons[i] for i in chunk] + [None] * (ncol - len(chunk))
    h, w = to_uint8_hwc(originals[0]).shape[:2]
    blank = np.full((h, w, 3), 255, np.uint8)
    return make_grid([blank if t is None else t for t in tiles], ncol=ncol, scale=scale)
