"""dalle_ds/utils/files.py: atomic writes leave the old file or the new one, never a part, never a stray temporary
file, and give the new file the permissions a plain open() would (mkstemp's 0600 kept a cluster group out)."""
import os
import stat

import pytest
import torch

from dalle_ds.train.checkpoint import atomic_torch_save
from dalle_ds.utils.files import atomic_path, atomic_write_bytes


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_get_the_mode_open_would_give(tmp_path, umask_027):
    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    atomic_torch_save({"x": torch.ones(2)}, tmp_path / "b.pt")
    with open(tmp_path / "plain", "wb"):
        pass
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.pt") == _mode(tmp_path / "plain") == 0o640
    assert (tmp_path / "a.bin").read_bytes() == b"abc" and torch.equal(torch.load(tmp_path / "b.pt")["x"],
                                                                      torch.ones(2))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "c.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["c.bin"]
