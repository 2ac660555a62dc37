"""The attention tuner's choices kept on disk, so a new process on the same GPU does not time every candidate again.

The tuner (``triton_backend._pick`` / ``_backward_path``) compiles and times every candidate tile configuration of a
kernel, and both backward paths, on the first call for a geometry: seconds per kernel and geometry, paid again by
every training or sampling process and by each rank. This file remembers the winners, one JSON object per file:

    {"version": 1, "entries": {"<context>": {"<kernel>:T256:W32:d64:bfloat16:bh128": {"block_m": 64, ...}, ...}}}

``context`` names what a choice is only valid for: the GPU's name and compute capability, the triton version and a
hash of the kernels' source; a change of any of them starts a fresh section (old sections stay, harmless).

Where: ``DALLE_DS_ATTN_CACHE`` (a file path; ``off`` disables the cache), else
``$XDG_CACHE_HOME/dalle_ds/attention_tuning.json`` (``~/.cache`` without XDG_CACHE_HOME). Writes are atomic
(temporary file + ``os.replace``) and merge with what is on disk, so ranks writing at once lose at most one another's
newest entry, which is then timed again. A file that cannot be read or parsed is ignored with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

from dalle_ds.utils.files import atomic_write_bytes

VERSION = 1


def cache_path() -> Path | None:
    """The cache file, or None when ``DALLE_DS_ATTN_CACHE=off``."""
    env = os.environ.get("DALLE_DS_ATTN_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("off", "0", "") else Path(env).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dalle_ds" / "attention_tuning.json"


@lru_cache(maxsize=None)
def kernels_hash() -> str:
    """First 12 hex digits of the SHA-1 of triton_kernels.py: tuned choices are for this source only."""
    return hashlib.sha1((Path(__file__).parent / "triton_kernels.py").read_bytes()).hexdigest()[:12]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"attention tuning cache {path} ignored (unreadable: {e})", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
        warnings.warn(f"attention tuning cache {path} ignored (not a version-{VERSION} cache)", stacklevel=3)
        return {}
    return data["entries"]


def lookup(context: str, name: str):
    """The stored choice for ``name`` under ``context`` (a dict of Config fields, or a path name), or None."""
    path = cache_path()
    if path is None:
        return None
    section = _read(path).get(context)
    return section.get(name) if isinstance(section, dict) else None


def store(context: str, name: str, value) -> None:
    """Add one choice (JSON-serializable) to the file, merged with its current content; failures only warn."""
    path = cache_path()
    if path is None:
        return
    try:
        entries = _read(path)
        section = entries.get(context)
        entries[context] = {**(section if isinstance(section, dict) else {}), name: value}
        atomic_write_bytes(path, (json.dumps({"version": VERSION, "entries": entries}, indent=1,
                                             sort_keys=True) + "\n").encode())
    except OSError as e:  # a read-only home or a full disk must not stop training
        warnings.warn(f"attention tuning cache {path} not written: {e}", stacklevel=2)


def status_rows() -> list[dict]:
    """For ``python -m dalle_ds.info``: where the cache is and how much it holds."""
    path = cache_path()
    if path is None:
        return [{"name": "tuning cache", "available": False, "reason": "off (DALLE_DS_ATTN_CACHE=off)"}]
    entries = _read(path)
    if not entries:
        return [{"name": "tuning cache", "available": True, "reason": f"{path} (empty: a GPU's first calls tune)"}]
    n = sum(len(v) for v in entries.values() if isinstance(v, dict))
    return [{"name": "tuning cache", "available": True,
             "reason": f"{path}: {n} choices for {len(entries)} (GPU, triton, kernel source) combinations"}]
