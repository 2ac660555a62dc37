"""One entry point that builds any dataset by name, and a cheap way to read a dataset's captions.

Every dataset built here yields ``{"image": uint8 [3, S, S], "caption": str, ...}`` samples; batch them with
:func:`dalle_ds.data.images.collate_samples`. Imports are lazy so that, e.g., building "shapes" never imports
``datasets``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch.utils.data import Dataset, Subset

__all__ = ["build_dataset", "dataset_captions", "DATASETS"]


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., Dataset]  # (split, image_size, **kwargs) -> Dataset
    kwargs: tuple[str, ...]  # accepted keyword arguments
    required: tuple[str, ...]
    splits: str  # human-readable, for the error message


def _shapes(split: str, image_size: int, **kw: Any) -> Dataset:
    from dalle_ds.data.shapes import ShapesDataset

    return ShapesDataset(split=split, image_size=image_size, **kw)


def _fashion_mnist(split: str, image_size: int, **kw: Any) -> Dataset:
    from dalle_ds.data.fashion_mnist import FashionMNIST

    return FashionMNIST(split=split, image_size=image_size, **kw)


def _imagefolder(split: str, image_size: int, path: Any, **kw: Any) -> Dataset:
    from dalle_ds.data.folder import ImageTextFolder

    return ImageTextFolder(path, split=split, image_size=image_size, **kw)


def _webdataset(split: str, image_size: int, path: Any, **kw: Any) -> Dataset:
    """``path`` is a pattern/list of shards, or a dict ``{split: pattern_or_files}`` (WebDataset has no splits)."""
    from dalle_ds.data.folder import WebDatasetShards

    if isinstance(path, dict):
        if split not in path:
            raise ValueError(f"webdataset: split {split!r} not in the path dict (splits: {', '.join(map(str, path))})")
        path = path[split]
    return WebDatasetShards(path, image_size=image_size, **kw)


_LOADER_KWARGS = ("cache_dir", "validate", "require_caption", "across_ranks", "crop", "max_aspect_ratio")
DATASETS: dict[str, _Entry] = {
    "shapes": _Entry(_shapes, ("num_samples", "seed", "extra_shapes"), (), "train, test_id, test_ood"),
    "fashion_mnist": _Entry(_fashion_mnist, ("root", "caption_templates"), (), "train, test"),
    "imagefolder": _Entry(_imagefolder, ("path", "caption_column") + _LOADER_KWARGS, ("path",),
                          "the folder's splits (train unless it has train/ test/ subfolders)"),
    "webdataset": _Entry(_webdataset, ("path", "image_key", "caption_key") + _LOADER_KWARGS, ("path",),
                         "any: path may be a dict {split: shards}"),
}


def _describe() -> str:
    lines = []
    for name, entry in DATASETS.items():
        args = ", ".join(f"{k} (required)" if k in entry.required else k for k in entry.kwargs)
        lines.append(f"  {name}: kwargs [{args}]; splits: {entry.splits}")
    return "\n".join(lines)


def build_dataset(name: str, split: str, image_size: int, **kwargs: Any) -> Dataset:
    """Build the dataset ``name`` ("shapes", "fashion_mnist", "imagefolder", "webdataset") for ``split``.

    Unknown names, unknown keyword arguments and missing required ones raise ``ValueError`` listing every dataset
    with the keyword arguments it accepts, before any data is read.
    """
    entry = DATASETS.get(name)
    if entry is None:
        raise ValueError(f"unknown dataset {name!r}; valid names and their kwargs:\n{_describe()}")
    unknown = sorted(set(kwargs) - set(entry.kwargs))
    if unknown:
        raise ValueError(f"dataset {name!r} does not accept {unknown}; valid names and their kwargs:\n{_describe()}")
    missing = [k for k in entry.required if kwargs.get(k) is None]
    if missing:
        raise ValueError(f"dataset {name!r} needs {missing}; valid names and their kwargs:\n{_describe()}")
    return entry.build(split, image_size, **kwargs)


def dataset_captions(ds: Dataset, limit: Optional[int] = None) -> list[str]:
    """The captions of ``ds`` (the first ``limit``), e.g. to train the caption tokenizer.

    Uses the dataset's ``captions()`` method when it has one (no image decoding), looks through ``torch`` Subsets,
    and otherwise falls back to ``ds[i]["caption"]``, which decodes images.
    """
    n = len(ds)  # type: ignore[arg-type]
    n = n if limit is None else min(max(0, int(limit)), n)
    if isinstance(ds, Subset):
        indices = [int(i) for i in ds.indices][:n]
        if hasattr(ds.dataset, "captions"):
            needed = max(indices) + 1 if indices else 0
            base = dataset_captions(ds.dataset, limit=needed)
            return [base[i] for i in indices]
        return [str(ds.dataset[i]["caption"]) for i in indices]
    method = getattr(ds, "captions", None)
    if callable(method):
        try:
            takes_limit = len(inspect.signature(method).parameters) >= 1
        except (TypeError, ValueError):
            takes_limit = False
        captions = list(method(n)) if takes_limit else list(method())
        return [str(c) for c in captions[:n]]
    return [str(ds[i]["caption"]) for i in range(n)]
