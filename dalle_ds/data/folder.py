"""User image-caption data through Hugging Face ``datasets``: an image folder with captions, or WebDataset shards.

Both loaders are map-style torch Datasets yielding ``{"image": uint8 [3, S, S], "caption": str, ...metadata}``.

**Bad images never crash a run and never vanish silently.** ``datasets`` decodes images lazily, so a truncated or
non-image file would otherwise raise inside a DataLoader worker, in the middle of training. Here the image columns
are read undecoded (``datasets.Image(decode=False)``) and decoded by :func:`dalle_ds.data.images.load_image` inside a
``try``. By default (``validate=True``) every image is decoded once at construction (a tqdm bar shows progress):
unreadable rows are left out of the index, counted in :attr:`stats`, and reported in one ``logging`` warning that
gives the count and the first few names. If an image becomes unreadable later (the file changed on disk), or with
``validate=False`` (no up-front pass, for very large datasets), ``__getitem__`` logs a warning, counts the row in
this process's :attr:`stats` and returns the next readable sample instead of raising.

**Empty captions** (missing, ``None``, ``""`` or whitespace) keep their image with caption ``""`` and are counted in
``stats["empty_caption"]``: the image is still good dVAE data, and for the prior an empty caption is a legitimate
"unconditional" example (the text positions are all padding). Filter on ``caption != ""`` if that is unwanted.

**Offline and no surprise writes to ~.** Loading uses the local files only (set ``HF_HUB_OFFLINE=1`` and
``HF_DATASETS_OFFLINE=1``; nothing here contacts the hub). ``datasets`` writes an Arrow cache while preparing the
data; its location is, in order: the ``cache_dir`` argument; the Hugging Face default when the user has set
``HF_DATASETS_CACHE`` or ``HF_HOME`` (their choice); else ``<data dir>/.dalle_ds_cache`` (hidden, so the image folder
scan ignores it) when that is writable; else ``<tmp>/dalle_ds_hf_cache``. For WebDataset shards the cache holds a
copy of the image bytes (the same as the shards' size).

Layouts (``datasets`` 5.x, checked offline):

* image folder: ``<dir>/metadata.jsonl`` (``{"file_name": "0001.png", "text": "...", ...}`` per line) or
  ``<dir>/metadata.csv`` (``file_name,text,...``) next to the images; ``<dir>/train/`` and ``<dir>/test/``
  subfolders become splits. Extra metadata fields come back as typed values. ``datasets`` silently drops images that
  have no metadata row; they are counted here as ``stats["not_in_metadata"]`` and warned about. A metadata row whose
  file is missing counts as unreadable.
* WebDataset: tar shards holding ``<key>.png`` / ``.jpg`` / ..., ``<key>.txt`` and optionally ``<key>.json`` per
  sample; ``datasets`` makes one column per extension plus ``__key__`` and ``__url__``. It infers those columns from
  the first 5 samples of the first shard only (which must all have the same members) and drops other members, so
  image and caption members that appear later (``.jpg`` samples in a later shard) are found from the tar headers and
  added. A sample with no image at all counts as unreadable.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dalle_ds.utils.ranks import is_job_rank0

from .augment import PaperCrop, aspect_ratio_ok
from .images import load_image, to_chw_uint8

__all__ = ["ImageTextFolder", "WebDatasetShards", "CAPTION_COLUMNS", "WDS_CAPTION_KEYS"]

logger = logging.getLogger(__name__)

CAPTION_COLUMNS: tuple[str, ...] = ("text", "caption", "captions")
WDS_CAPTION_KEYS: tuple[str, ...] = ("txt", "text", "caption", "captions")
# Preferred image column when a WebDataset sample has several image extensions.
WDS_IMAGE_KEYS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif", "ppm", "image")
N_EXAMPLES = 5  # how many unreadable names to keep in stats and show in the warning
_CACHE_SUBDIR = ".dalle_ds_cache"

try:  # the extensions the imagefolder builder scans for, so our "not in metadata" check matches it exactly
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS as _HF_IMAGE_EXTENSIONS

    IMAGE_EXTENSIONS = frozenset(e.lower() for e in _HF_IMAGE_EXTENSIONS)
except Exception:  # pragma: no cover - older/newer datasets layouts
    IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})


def iter_image_files(folder: Union[str, os.PathLike]) -> Iterator[str]:
    """The image files under ``folder`` (by extension, :data:`IMAGE_EXTENSIONS`), lazily; hidden files and folders,
    our cache and ``__pycache__`` are left out."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]  # hidden dirs, our cache, __pycache__
        for fname in files:
            if not fname.startswith(".") and os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, fname)


def _caption_text(value: Any) -> str:
    """A metadata caption value → str, stripped. None/NaN → ""; a list (several captions per image) → its first
    non-empty item."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        for item in value:
            text = _caption_text(item)
            if text:
                return text
        return ""
    if isinstance(value, float) and value != value:  # NaN from a CSV
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def _default_cache_dir(anchor: Path) -> Optional[str]:
    """Where ``datasets`` should write its Arrow cache (see the module docstring); None means its own default."""
    if os.environ.get("HF_DATASETS_CACHE") or os.environ.get("HF_HOME"):
        return None
    candidate = anchor / _CACHE_SUBDIR
    try:
        candidate.mkdir(exist_ok=True)
        if os.access(candidate, os.W_OK):
            return str(candidate)
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / "dalle_ds_hf_cache"
    fallback.mkdir(parents=True, exist_ok=True)
    return str(fallback)


def _ranks(across_ranks: bool) -> tuple[int, int]:
    """(rank, world size) of torch.distributed when ``across_ranks`` and it runs more than one rank, else (0, 1)."""
    import torch.distributed as dist

    if across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reports(across_ranks: bool) -> bool:
    """Whether this process logs what the whole dataset holds (unreadable images, files without a metadata row).
    The ranks that build a dataset ``across_ranks`` all find the same (and keep the same :attr:`stats`), so rank 0
    alone reports it, once per job, also before torch.distributed starts (``launch/tokenize_images.py`` builds its
    data first)."""
    return not across_ranks or is_job_rank0()


@contextlib.contextmanager
def _rank0_first(across_ranks: bool):
    """Rank 0 runs the block first (``datasets`` prepares its Arrow cache there), the other ranks after it has
    finished, when they read a cache it wrote instead of all preparing the same one at once: ``datasets`` serializes
    that with file locks, which some shared filesystems (NFS, Lustre without flock) do not honour across nodes. If
    rank 0 raises, the others still run the block (and raise the same error) rather than wait forever."""
    import torch.distributed as dist

    rank, world = _ranks(across_ranks)
    if world > 1 and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if world > 1 and rank == 0:
            dist.barrier()


def _load_hf(builder: str, cache_dir: Optional[str], what: str, **kwargs: Any):
    import datasets  # imported lazily: it is slow to import and only these loaders need it

    try:
        return datasets.load_dataset(builder, cache_dir=cache_dir, **kwargs)
    except Exception as err:
        raise ValueError(
            f"datasets could not load {what} with the {builder!r} builder: {type(err).__name__}: {err}"
        ) from err


class _OutOfAspect(ValueError):
    """An image whose aspect ratio is beyond the dataset's ``max_aspect_ratio``."""


class _ImageTextDataset(Dataset):
    """Shared machinery: undecoded image columns, caption extraction, the index of readable rows, and stats."""

    def __init__(
        self,
        hf_ds: Any,
        image_columns: Sequence[str],
        caption_column: Optional[str],
        image_size: int,
        validate: bool,
        description: str,
        across_ranks: bool = False,
        crop: Optional[PaperCrop] = None,
        max_aspect_ratio: float = 0.0,
    ) -> None:
        from datasets import Image as HFImage

        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if crop is not None and crop.size != image_size:
            raise ValueError(f"crop makes {crop.size} px squares but image_size is {image_size}")
        if max_aspect_ratio and max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be ≥ 1 (or 0: no limit), got {max_aspect_ratio}")
        for col in image_columns:
            if isinstance(hf_ds.features[col], HFImage):
                hf_ds = hf_ds.cast_column(col, HFImage(decode=False))
        self._ds = hf_ds
        self.image_size = image_size
        self.image_columns = list(image_columns)
        self.caption_column = caption_column  # a column name or "column.field" into a struct column, or None
        caption_top = caption_column
        if caption_column and caption_column not in hf_ds.column_names:
            caption_top = caption_column.split(".", 1)[0]
        self.extra_columns = [c for c in hf_ds.column_names if c not in self.image_columns and c != caption_top]
        self.description = description
        self.validated = bool(validate)
        self.across_ranks = bool(across_ranks)
        self.crop = crop
        self.max_aspect_ratio = float(max_aspect_ratio or 0.0)
        self._bad_rows: set[int] = set()  # rows that failed in __getitem__ (this process)
        total = len(hf_ds)
        self.stats: dict[str, Any] = {
            "total": total, "kept": total, "unreadable": 0, "aspect_ratio": 0, "empty_caption": 0,
            "unreadable_examples": [],
        }
        if validate:
            self._rows = self._validate()
        else:
            self._rows = np.arange(total, dtype=np.int64)
        self.stats["kept"] = len(self._rows)
        self.stats["empty_caption"] = sum(1 for c in self.captions() if not c)

    # ----- subclass hooks -------------------------------------------------------------------------------------
    def _row_name(self, row: dict[str, Any]) -> str:
        raise NotImplementedError

    # ----- decoding -------------------------------------------------------------------------------------------
    def _image_source(self, row: dict[str, Any]) -> Union[str, bytes]:
        for col in self.image_columns:
            value = row.get(col)
            if value is None:
                continue
            if isinstance(value, dict):
                if value.get("bytes") is not None:
                    return value["bytes"]
                if value.get("path"):
                    return value["path"]
                continue
            if isinstance(value, (bytes, bytearray, str)):
                return value
        raise ValueError(f"the sample has no image (looked in {self.image_columns})")

    @property
    def takes_sample_key(self) -> bool:
        """True with a ``crop``: ``dataset[(epoch, index)]`` then draws that sample's crop for that epoch."""
        return self.crop is not None

    def _decode(self, row: dict[str, Any], key: Optional[tuple[int, int]] = None) -> torch.Tensor:
        img = load_image(self._image_source(row))
        if not aspect_ratio_ok(*img.size, self.max_aspect_ratio):
            raise _OutOfAspect(f"{img.size[0]}x{img.size[1]} is beyond the aspect-ratio limit {self.max_aspect_ratio}")
        if key is not None and self.crop is not None:
            img = self.crop(img, key)
        return to_chw_uint8(img, self.image_size)

    def _record_unreadable(self, name: str) -> None:
        self.stats["unreadable"] += 1
        if len(self.stats["unreadable_examples"]) < N_EXAMPLES:
            self.stats["unreadable_examples"].append(name)

    def _validate(self) -> np.ndarray:
        """Decode every image once; return the indices of the readable rows and log one summary warning.

        With ``across_ranks`` under torch.distributed, rank r decodes rows r, r + W, ... and the unreadable ones are
        all-gathered: each rank does 1/W of the work, and all ranks keep the same rows (a rank that checked every
        image alone could lose one to a transient read error the others did not have, and the ranks would then
        split different datasets). A collective then: every rank builds the dataset."""
        rank, world = _ranks(self.across_ranks)
        name_cols = [c for c in ("__key__", "__url__") if c in self._ds.column_names]
        columns = list(dict.fromkeys(self.image_columns + name_cols))
        total = len(self._ds)
        mine = self._ds.select_columns(columns)
        if world > 1:
            mine = mine.select(range(rank, total, world))
        bad: list[tuple[int, str, str]] = []  # (row, name, reason)
        excluded: list[int] = []  # rows beyond max_aspect_ratio
        index = rank
        bar = tqdm(total=len(mine), desc=f"checking images ({self.description})", unit="img", disable=None)
        for batch in mine.iter(batch_size=256):
            n = len(batch[columns[0]])
            for j in range(n):
                row = {c: batch[c][j] for c in columns}
                try:
                    self._decode(row)
                except _OutOfAspect:
                    excluded.append(index)
                except Exception as err:  # noqa: BLE001 - any decoding failure means "unreadable", never a crash
                    bad.append((index, self._row_name(row), f"{type(err).__name__}: {err}"))
                index += world
            bar.update(n)
        bar.close()
        if world > 1:
            import torch.distributed as dist

            gathered: list = [None] * world
            dist.all_gather_object(gathered, (bad, excluded))
            bad = sorted(b for part, _ in gathered for b in part)
            excluded = sorted(i for _, part in gathered for i in part)
        for _, name, _ in bad:
            self._record_unreadable(name)
        reports = _reports(self.across_ranks)
        if bad and reports:
            logger.warning(
                "%s: skipped %d of %d images as unreadable, e.g. %s",
                self.description, len(bad), total, "; ".join(f"{name} ({why})" for _, name, why in bad[:N_EXAMPLES]),
            )
        self.stats["aspect_ratio"] = len(excluded)
        if excluded and reports:
            logger.info("%s: left out %d of %d images whose longer side exceeds %g times the shorter",
                        self.description, len(excluded), total, self.max_aspect_ratio)
        keep = np.ones(total, dtype=bool)
        keep[[i for i, _, _ in bad] + excluded] = False
        return np.flatnonzero(keep).astype(np.int64)

    # ----- captions -------------------------------------------------------------------------------------------
    def _caption_of(self, row: dict[str, Any]) -> str:
        col = self.caption_column
        if col is None:
            return ""
        if col in row:
            return _caption_text(row[col])
        top, field = col.split(".", 1)
        value = row.get(top)
        return _caption_text(value.get(field) if isinstance(value, dict) else None)

    def captions(self, limit: Optional[int] = None) -> list[str]:
        """Captions of the kept samples in dataset order (first ``limit``), read without decoding any image."""
        rows = self._rows if limit is None else self._rows[: max(0, int(limit))]
        col = self.caption_column
        if col is None:
            return [""] * len(rows)
        top = col if col in self._ds.column_names else col.split(".", 1)[0]
        values = list(self._ds.select_columns([top])[top])
        return [self._caption_of({top: values[int(i)]}) for i in rows]

    # ----- Dataset API ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: Union[int, tuple[int, int]]) -> dict[str, Any]:
        """Sample ``index``; ``dataset[(epoch, index)]`` gives it with that epoch's random crop when the dataset has a
        ``crop`` (the deterministic centre square otherwise)."""
        key = None
        if isinstance(index, tuple):
            key = (int(index[0]), int(index[1]))
            index = key[1]
        n = len(self._rows)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        # Fall forward to the next readable row if this one cannot be decoded (see the module docstring). Rows found
        # bad here are remembered, so each is decoded, counted and reported once per process.
        for attempt in range(min(n, 100)):
            row_index = int(self._rows[(index + attempt) % n])
            if row_index in self._bad_rows:
                continue
            row = self._ds[row_index]
            try:
                image = self._decode(row, None if key is None else (key[0], row_index))
            except _OutOfAspect:  # only without the up-front pass (validate=False): skipped quietly, counted
                self._bad_rows.add(row_index)
                self.stats["aspect_ratio"] += 1
                continue
            except Exception as err:  # noqa: BLE001
                name = self._row_name(row)
                self._bad_rows.add(row_index)
                self._record_unreadable(name)
                count = self.stats["unreadable"]
                if count <= N_EXAMPLES or (count & (count - 1)) == 0:  # first few, then at powers of two
                    logger.warning(
                        "%s: unreadable image %s (%s: %s) replaced by the next sample; %d unreadable so far in this "
                        "process", self.description, name, type(err).__name__, err, count,
                    )
                continue
            sample = {"image": image, "caption": self._caption_of(row)}
            for col in self.extra_columns:
                sample[col] = row[col]
            return sample
        raise RuntimeError(
            f"{self.description}: no readable image among {min(n, 100)} samples from index {index}; see the warnings"
        )


class ImageTextFolder(_ImageTextDataset):
    """Images in a folder with captions in ``metadata.jsonl`` or ``metadata.csv``, via ``load_dataset("imagefolder")``.

    Args:
        path: the data directory (``data_dir`` of the imagefolder builder).
        split: which split to read (``train`` unless the folder has ``train/``, ``test/``... subfolders).
        image_size: output side S.
        caption_column: metadata column holding the caption; by default the first of ``text``, ``caption``,
            ``captions`` that exists. A list-valued column (several captions per image) uses the first non-empty one.
        cache_dir: where ``datasets`` writes its Arrow cache (see the module docstring for the default).
        validate: decode every image once at construction (default) so bad ones are skipped and counted up front.
        require_caption: raise when no caption column is found; ``False`` allows caption-less folders (dVAE training)
            and gives every sample the caption ``""``.
        across_ranks: under torch.distributed (more than one rank), build the dataset as a collective: rank 0
            prepares the ``datasets`` cache before the others read it, and the validation pass is split between the
            ranks and its result shared, so every rank keeps the same rows. Every rank must then build it.
        crop: a :class:`~dalle_ds.data.augment.PaperCrop` (the paper's random crops for one stage). Then
            ``dataset[(epoch, index)]`` draws that sample's crop for that epoch; ``dataset[index]`` stays the
            centre square.
        max_aspect_ratio: leave out images whose longer side is more than this times the shorter (the paper: 2;
            0 keeps all). Counted in ``stats["aspect_ratio"]``.

    Samples: ``{"image": uint8 [3, S, S], "caption": str, <other metadata columns>}``. :attr:`stats` has ``total``,
    ``kept``, ``unreadable``, ``aspect_ratio``, ``empty_caption``, ``unreadable_examples`` (first few relative
    paths) and ``not_in_metadata`` (image files in the folder that ``datasets`` ignored because no metadata row names
    them).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        split: str = "train",
        image_size: int = 64,
        caption_column: Optional[str] = None,
        *,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        validate: bool = True,
        require_caption: bool = True,
        across_ranks: bool = False,
        crop: Optional[PaperCrop] = None,
        max_aspect_ratio: float = 0.0,
    ) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise FileNotFoundError(f"image folder {self.path} does not exist or is not a directory")
        self.split = split
        cache = str(cache_dir) if cache_dir is not None else _default_cache_dir(self.path)
        with _rank0_first(across_ranks):
            dd = _load_hf("imagefolder", cache, f"image folder {self.path}", data_dir=str(self.path))
        if split not in dd:
            raise ValueError(f"split {split!r} not found in image folder {self.path}; it has: {', '.join(dd)}")
        hf = dd[split]
        if "image" not in hf.column_names:
            raise ValueError(f"image folder {self.path}: no 'image' column (columns: {hf.column_names})")
        what = f"image folder {self.path}"
        caption = _pick_caption_column(
            hf, caption_column, CAPTION_COLUMNS, what, require_caption,
            'add a metadata.jsonl (or metadata.csv) next to the images with a file_name and a text column, one row '
            'per image such as {"file_name": "0001.png", "text": "a red cube on a table"}',
        )
        super().__init__(hf, ["image"], caption, image_size, validate, f"ImageTextFolder({self.path}, split={split})",
                         across_ranks, crop, max_aspect_ratio)
        self.stats["not_in_metadata"] = self._count_not_in_metadata(dd)

    def _row_name(self, row: dict[str, Any]) -> str:
        value = row.get("image")
        path = value.get("path") if isinstance(value, dict) else None
        if not path:
            return "<unnamed image>"
        try:
            return str(Path(path).resolve().relative_to(self.path))
        except ValueError:
            return str(path)

    def _count_not_in_metadata(self, dd: Any) -> int:
        """Image files under the folder that appear in no split (``datasets`` drops them without a word)."""
        from datasets import Image as HFImage

        listed: set[str] = set()
        for part in dd.values():
            column = part.cast_column("image", HFImage(decode=False)).select_columns(["image"])["image"]
            listed.update(os.path.realpath(v["path"]) for v in column if v and v.get("path"))
        missing = [os.path.relpath(full, self.path) for full in map(os.path.realpath, iter_image_files(self.path))
                   if full not in listed]
        if missing and _reports(self.across_ranks):
            logger.warning(
                "image folder %s: %d image files have no metadata row and are not used (add a row with their "
                "file_name to the metadata file to use them), e.g. %s",
                self.path, len(missing), ", ".join(sorted(missing)[:N_EXAMPLES]),
            )
        return len(missing)

    def __repr__(self) -> str:
        return f"ImageTextFolder({str(self.path)!r}, split={self.split!r}, n={len(self)}, image_size={self.image_size})"


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace expansion: ``shard-{000..002}.tar`` (zero-padded ranges) and ``{a,b}`` alternatives."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for opt in options for p in _expand_braces(head + opt + tail)]


def resolve_shards(pattern_or_files: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> list[str]:
    items = [pattern_or_files] if isinstance(pattern_or_files, (str, os.PathLike)) else list(pattern_or_files)
    files: list[str] = []
    for item in items:
        for pattern in _expand_braces(os.fspath(item)):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
            else:
                matches = [pattern] if os.path.isfile(pattern) else []
            if not matches:
                raise FileNotFoundError(f"no WebDataset shard matches {pattern!r}")
            files.extend(os.path.abspath(m) for m in matches)
    if not files:
        raise FileNotFoundError(f"no WebDataset shards given ({pattern_or_files!r})")
    return list(dict.fromkeys(files))


def _tar_fields(files: Sequence[str]) -> list[str]:
    """Member "fields" (the name after the first dot of the basename: ``key.seg.png`` → ``seg.png``) in the shards,
    in first-seen order, read from the tar headers only. This is the WebDataset naming convention."""
    seen: dict[str, None] = {}
    for path in files:
        try:
            with tarfile.open(path, "r") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    if "." in base and not base.startswith("."):
                        seen.setdefault(base.split(".", 1)[1], None)
        except (tarfile.TarError, OSError) as err:  # datasets read it already; a damaged tail only limits this scan
            logger.warning("could not scan the members of %s (%s: %s)", path, type(err).__name__, err)
    return list(seen)


class WebDatasetShards(_ImageTextDataset):
    """WebDataset tar shards via ``load_dataset("webdataset", data_files=...)``, as a map-style Dataset.

    Args:
        pattern_or_files: a shard path, a glob (``shards/*.tar``), a brace pattern (``shard-{000000..000009}.tar``),
            or a list of these; local files only. Shards are read in sorted order.
        image_size: output side S.
        image_key: the image extension/column (``png``, ``jpg``...); by default every image column is tried in the
            order png, jpg, jpeg, webp, ... and each sample uses the first it has.
        caption_key: the caption column (``txt`` ...) or ``"json.<field>"`` for a field of the ``.json`` member; by
            default the first of ``txt``, ``text``, ``caption``, ``captions`` as a column, then as a ``json`` field.
        cache_dir, validate, require_caption, across_ranks, crop, max_aspect_ratio: as for :class:`ImageTextFolder`.

    Samples: ``{"image": uint8 [3, S, S], "caption": str, "__key__": str, "__url__": str, <other members>}`` (for
    example ``"json"`` as a dict). :attr:`stats` names unreadable samples ``<shard file>:<key>``.
    """

    def __init__(
        self,
        pattern_or_files: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        image_size: int = 64,
        image_key: Optional[str] = None,
        caption_key: Optional[str] = None,
        *,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        validate: bool = True,
        require_caption: bool = True,
        across_ranks: bool = False,
        crop: Optional[PaperCrop] = None,
        max_aspect_ratio: float = 0.0,
    ) -> None:
        from datasets import Image as HFImage

        self.files = resolve_shards(pattern_or_files)
        cache = str(cache_dir) if cache_dir is not None else _default_cache_dir(Path(self.files[0]).parent)
        what = f"WebDataset shards {self.files[0]}" + (f" (+{len(self.files) - 1} more)" if len(self.files) > 1 else "")
        with _rank0_first(across_ranks):
            hf = _load_hf("webdataset", cache, what, data_files={"train": self.files}, split="train")
            hf = self._add_late_members(hf, cache, what)
        if image_key is not None:
            if image_key not in hf.column_names:
                raise ValueError(f"{what}: image_key {image_key!r} is not a member; members: {hf.column_names}")
            image_columns = [image_key]
        else:
            found = [c for c in hf.column_names if isinstance(hf.features[c], HFImage)]
            image_columns = [c for c in WDS_IMAGE_KEYS if c in found] + [c for c in found if c not in WDS_IMAGE_KEYS]
            if not image_columns:
                raise ValueError(f"{what}: no image members found (columns: {hf.column_names}); name the image "
                                 "member: image_key= (data.image_key in a run config)")
        caption = _pick_caption_column(hf, caption_key, WDS_CAPTION_KEYS, what, require_caption,
                                       "give each sample a <key>.txt member holding its caption", json_fallback=True)
        super().__init__(hf, image_columns, caption, image_size, validate, f"WebDatasetShards({what})",
                         across_ranks, crop, max_aspect_ratio)

    def _add_late_members(self, hf: Any, cache: Optional[str], what: str) -> Any:
        """Reload with extra columns for image/caption members that ``datasets`` did not see.

        ``datasets`` infers the columns from the first 5 samples of the first shard and silently drops members with
        other extensions (e.g. ``.jpg`` samples in a later shard of a mostly-``.png`` set). The tar headers of all
        shards are scanned (cheap: no member is read) and missing image or caption members are added as columns.
        """
        from datasets import Image as HFImage
        from datasets import Value

        fields = _tar_fields(self.files)
        late = [f for f in fields if f not in hf.column_names]
        add = {}
        for field in late:
            ext = field.rsplit(".", 1)[-1].lower()
            if "." + ext in IMAGE_EXTENSIONS:
                add[field] = HFImage()
            elif field in WDS_CAPTION_KEYS:
                add[field] = Value("string")
        ignored = [f for f in late if f not in add]
        if ignored:
            logger.warning(
                "%s: members %s are not in the first samples of the first shard and are ignored", what, ignored
            )
        if not add:
            return hf
        logger.info("%s: adding members %s seen only in later samples", what, sorted(add))
        features = hf.features.copy()
        features.update(add)
        return _load_hf("webdataset", cache, what, data_files={"train": self.files}, split="train", features=features)

    def _row_name(self, row: dict[str, Any]) -> str:
        url, key = row.get("__url__"), row.get("__key__")
        return f"{os.path.basename(url) if url else '?'}:{key if key is not None else '?'}"

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.files)} shards, n={len(self)}, image_size={self.image_size})"


def _pick_caption_column(
    hf: Any,
    requested: Optional[str],
    candidates: Sequence[str],
    what: str,
    require: bool,
    add_captions: str,
    json_fallback: bool = False,
) -> Optional[str]:
    """The caption column: ``requested`` if given (``col`` or ``col.field``), else the first candidate present.
    ``add_captions`` is the error's first remedy, in the layout's terms."""
    columns = hf.column_names

    def struct_fields(col: str) -> list[str]:
        feature = hf.features.get(col)
        return list(feature.keys()) if isinstance(feature, dict) else []

    if requested is not None:
        if requested in columns:
            return requested
        top, _, field = requested.partition(".")
        if field and field in struct_fields(top):
            return requested
        raise ValueError(f"{what}: caption column {requested!r} not found; columns: {columns}")
    for col in candidates:
        if col in columns:
            return col
    if json_fallback:
        for col in candidates:
            if col in struct_fields("json"):
                return f"json.{col}"
    if require:
        raise ValueError(
            f"{what}: no caption column among {list(candidates)} (columns: {columns}); {add_captions}, or name the "
            "caption column: --caption_key NAME (launch/tokenize_images.py), --set data.caption_key=NAME "
            "(train_clip.py; data.images.caption_key for train_dalle.py), caption_column= / caption_key= in Python, "
            "where require_caption=False loads the images with empty captions instead (the dVAE's trainer does)"
        )
    return None
