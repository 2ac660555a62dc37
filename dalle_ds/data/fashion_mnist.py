"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, with captions made from the class names.

The package (``apt-get install dataset-fashion-mnist``, MIT licence, Zalando) installs the original gzipped IDX
files under ``/usr/share/datasets/fashion-mnist/``: 60,000 training and 10,000 test images, 28x28 grayscale, ten
classes. Nothing is downloaded. The IDX format (big-endian): a magic number (``0x00000803`` for 3-d uint8 images,
``0x00000801`` for 1-d uint8 labels), then one uint32 per dimension, then the raw bytes; so images start at byte 16
and labels at byte 8.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import to_chw_uint8

__all__ = ["FashionMNIST", "is_available", "CLASS_NAMES", "DEFAULT_ROOT", "DEFAULT_CAPTION_TEMPLATES", "APT_PACKAGE"]

APT_PACKAGE = "dataset-fashion-mnist"
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

# Label order of the original release (github.com/zalandoresearch/fashion-mnist: 0 T-shirt/top, 1 Trouser,
# 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot), worded for captions.
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

# "{a}" is the indefinite article that fits the class name ("a" / "an"); "{name}" is the class name.
DEFAULT_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {name}",
    "a black and white photo of {a} {name}",
    "a small grayscale picture of {a} {name}",
    "{a} {name}",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


def _article(name: str) -> str:
    return "an" if name[:1] in "aeiou" else "a"


def is_available(root: str | os.PathLike = DEFAULT_ROOT) -> tuple[bool, str]:
    """Whether the four IDX files are present under ``root``; the reason says what is missing and how to get it."""
    root = Path(root)
    missing = [name for pair in _FILES.values() for name in pair if not (root / name).is_file()]
    if not missing:
        return True, f"Fashion-MNIST found in {root}"
    return False, (
        f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); install the Debian package with "
        f"`sudo apt-get install {APT_PACKAGE}` or point root= (data.path in a run config, --path on the command "
        f"line) at the directory holding the .gz IDX files"
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(
            f"{path}: not an IDX file of the expected kind (magic {int(header[0]):#010x}, want {magic:#010x})"
        )
    shape = tuple(int(d) for d in header[1:])
    offset = 4 * (1 + ndim)
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated or corrupt IDX file ({len(data) - offset} bytes for shape {shape})")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST as ``{"image": uint8 [3, S, S], "caption": str, "label": int}`` samples.

    Args:
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        image_size: output side S; the 28x28 digits are resized with :func:`to_chw_uint8` (grayscale → 3 channels).
            The default 32 gives a 4x4 / 8x8 token grid with a dVAE downsampling by 8 / 4.
        root: directory holding the gzipped IDX files of the Debian package.
        caption_templates: format strings with ``{name}`` (class name) and optionally ``{a}`` ("a"/"an"). Sample
            ``i`` uses ``caption_templates[i % len(caption_templates)]``: deterministic, and since the files' label
            order is shuffled, every class gets every template.

    The whole split is decoded into memory at construction (47 MB for train, ~0.5 s); DataLoader workers share it
    through fork's copy-on-write.
    """

    splits = tuple(_FILES)
    classes = CLASS_NAMES

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        root: str | os.PathLike = DEFAULT_ROOT,
        caption_templates: Sequence[str] = DEFAULT_CAPTION_TEMPLATES,
    ) -> None:
        if split not in _FILES:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid splits: {', '.join(_FILES)}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        templates = tuple(caption_templates)
        if not templates:
            raise ValueError("caption_templates must hold at least one template")
        for t in templates:
            if "{name}" not in t:
                raise ValueError(f"caption template {t!r} has no {{name}} placeholder")
            t.format(a="a", name="x")  # fail now, not inside a worker, on a bad placeholder
        ok, reason = is_available(root)
        if not ok:
            raise FileNotFoundError(reason)
        self.split, self.image_size, self.root, self.caption_templates = split, image_size, Path(root), templates
        images_file, labels_file = _FILES[split]
        self.images = _read_idx(self.root / images_file, _IMAGES_MAGIC, ndim=3)  # uint8 [N, 28, 28]
        self.labels = _read_idx(self.root / labels_file, _LABELS_MAGIC, ndim=1).astype(np.int64)  # [N]
        if len(self.images) != len(self.labels):
            raise ValueError(f"{split}: {len(self.images)} images but {len(self.labels)} labels")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(CLASS_NAMES)):
            raise ValueError(f"{split}: labels outside 0..{len(CLASS_NAMES) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, index: int) -> str:
        """The caption of sample ``index`` (no image decoding)."""
        name = CLASS_NAMES[int(self.labels[index])]
        template = self.caption_templates[index % len(self.caption_templates)]
        return template.format(a=_article(name), name=name)

    def captions(self, limit: Optional[int] = None) -> list[str]:
        """Captions of the first ``limit`` samples (all by default), without touching the images."""
        n = len(self) if limit is None else min(int(limit), len(self))
        return [self.caption(i) for i in range(n)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image: torch.Tensor = to_chw_uint8(self.images[index], self.image_size)
        return {"image": image, "caption": self.caption(index), "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return (
            f"FashionMNIST(split={self.split!r}, n={len(self)}, image_size={self.image_size}, "
            f"root={str(self.root)!r})"
        )
