"""Files written atomically: a reader sees the old content or the new, never a half-written file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask would set it for a moment,
    for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; ``os.replace``-d over ``path`` when the block ends without an
    exception, removed when it raises. The file gets the mode a plain ``open`` would give it (0666 less the umask):
    ``tempfile.mkstemp`` makes 0600 files, which other users of a shared run folder (a cluster group) could not read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_earlier_outputs(folder: str | Path, patterns: tuple[str, ...]) -> list[Path]:
    """Delete the files in ``folder`` matching ``patterns`` (globs relative to it) and return them: an entry point
    that writes a fixed set of outputs calls this (on one rank) before a re-run into the same folder, so that what
    an earlier run wrote and this one does not (more captions' grids, a metrics file of other options) is not left
    beside the new results as if it were theirs."""
    folder = Path(folder)
    removed = sorted({f for pattern in patterns for f in folder.glob(pattern) if f.is_file()})
    for f in removed:
        f.unlink()
    return removed
