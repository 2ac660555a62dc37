"""``run_local_ranks(..., timeout=)``: ranks that wait on each other forever (here: rank 1 never joins rank 0's
all-reduce, and does not raise either) are terminated and the call fails, naming them, instead of hanging the test."""
import time

import pytest
import torch
import torch.distributed as dist

from dalle_ds.dist.local_ranks import run_local_ranks

pytestmark = pytest.mark.distributed


def _rank0_waits(rank, world):
    if rank == 0:
        dist.all_reduce(torch.zeros(1))  # rank 1 never joins
    else:
        time.sleep(3600)


def test_a_hang_fails_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"timed out after 5 s: rank\(s\) 0, 1 did not finish"):
        run_local_ranks(_rank0_waits, 2, timeout=5)
    assert time.monotonic() - start < 60
