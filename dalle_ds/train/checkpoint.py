"""Checkpoints through the DeepSpeed engine, made atomic, plus atomically written exported artifacts.

DeepSpeed writes a checkpoint as a folder ``<dir>/<tag>/`` (model, optimizer and ZeRO shards) and a ``latest`` file
naming the tag. A crash while the folder is being written must never leave ``latest`` pointing at a half-written
checkpoint, so we save with ``save_latest=False`` and, once every rank has finished (a barrier), rank 0 replaces
``latest`` with an atomic ``os.replace``. Older tags beyond ``keep`` are deleted only after that.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dalle_ds.train.distributed import barrier, is_rank0
from dalle_ds.train.distributed import rank as dist_rank
from dalle_ds.utils.files import atomic_write_bytes

_TAG = re.compile(r"^step(\d+)$")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_artifact(path: str | Path, kind: str, what: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an exported artifact (``{"kind": kind, "config": ..., "state_dict": ...}``), with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    blob = torch.load(p, map_location=map_location, weights_only=False)
    if not isinstance(blob, dict) or blob.get("kind") != kind:
        raise ValueError(f"{p} is not a {what} exported by dalle_ds (found kind "
                         f"{blob.get('kind') if isinstance(blob, dict) else type(blob).__name__!r}, want {kind!r})")
    return blob


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def list_tags(ckpt_dir: str | Path) -> list[str]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if p.is_dir() and _TAG.match(p.name)), key=lambda t: int(t[4:]))


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The committed tag named by ``latest``, or None when there is no complete checkpoint."""
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep: int = 2,
                    rank_state: dict[str, Any] | None = None) -> str:
    """Collective: every rank must call it. Returns the tag written.

    ``client_state`` goes into DeepSpeed's model-states file (written by data-parallel rank 0 only); ``rank_state``
    is this rank's own state (e.g. its ZeRO-3 share of the EMA), written by every rank as ``<tag>/rank<R>.pt``.
    """
    tag = step_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if rank_state is not None:
        atomic_torch_save(rank_state, Path(ckpt_dir) / tag / f"rank{dist_rank()}.pt")
    barrier()
    if is_rank0():
        atomic_write_bytes(Path(ckpt_dir) / "latest", tag.encode())
        if keep > 0:
            for old in list_tags(ckpt_dir)[:-keep]:
                if old != tag:
                    shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """Load the latest committed checkpoint into ``engine``.

    Returns (client_state, this rank's rank_state or None), or None when there is no committed checkpoint.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    own = Path(ckpt_dir) / tag / f"rank{dist_rank()}.pt"
    rank_state = torch.load(own, map_location="cpu", weights_only=False) if own.is_file() else None
    return client_state or {}, rank_state
