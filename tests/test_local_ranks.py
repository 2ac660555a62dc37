"""The local multi-rank harness: rank 0's return value comes back, and a rank that raises fails the call with its
traceback instead of leaving the other ranks blocked in a collective it never joins."""
import pytest
import torch
import torch.distributed as dist

from dalle_ds.dist.local_ranks import run_local_ranks
from dalle_ds.train.distributed import distributed_run, shutdown_distributed

pytestmark = pytest.mark.distributed


def _sum_of_ranks(rank, world):
    t = torch.tensor(float(rank))
    dist.all_reduce(t)
    return {"world": world, "sum": float(t)}


def _rank1_fails(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.all_reduce(torch.zeros(1))  # rank 0 waits here for a rank that never comes


def test_returns_rank0_result_and_reports_a_failing_rank():
    assert run_local_ranks(_sum_of_ranks, 3) == {"world": 3, "sum": 3.0}
    with pytest.raises(RuntimeError, match="rank 1 raised:(.|\n)*boom on rank 1"):
        run_local_ranks(_rank1_fails, 2)


def _rank1_fails_and_says_so_late(rank, world):
    """Rank 1 raises while rank 0 waits in an all-reduce, but rank 1's report reaches the parent late: its queue's
    feeder thread (which pickles and writes what ``put`` hands it) is slowed here, as a starved thread is on a
    loaded machine. Rank 1 ends its group meanwhile, rank 0's all-reduce fails ("Connection closed by peer") about
    10 ms later, and rank 0's report of that arrives first."""
    if rank == 1:
        import multiprocessing.queues
        import time

        dumps = multiprocessing.queues._ForkingPickler.dumps
        multiprocessing.queues._ForkingPickler.dumps = staticmethod(
            lambda obj, protocol=None: (time.sleep(1.0), dumps(obj, protocol))[1])
        raise ValueError("boom on rank 1")
    dist.all_reduce(torch.zeros(1))


def test_the_rank_that_failed_first_is_reported():
    """Not a rank that failed because of it: its peer left the collective it waited in (the harness named whichever
    report came first, which on a loaded machine could be rank 0's "Connection closed by peer")."""
    with pytest.raises(RuntimeError, match="rank 1 raised:(.|\n)*boom on rank 1"):
        run_local_ranks(_rank1_fails_and_says_so_late, 2, timeout=120)


def _shut_down_twice(rank, world):
    shutdown_distributed()
    after_first = dist.is_initialized()
    shutdown_distributed()  # without a group: a no-op, not an error
    return after_first


def test_shutdown_distributed_ends_the_group_on_every_rank():
    assert run_local_ranks(_shut_down_twice, 2) is False


def _group_after_blocks(rank, world):
    """distributed_run on every rank: the group survives a block that raises, and ends after one that returns."""
    try:
        with distributed_run():
            raise ValueError("inside the block")
    except ValueError:
        pass
    after_error = dist.is_initialized()
    with distributed_run():
        dist.all_reduce(torch.ones(1))
    return after_error, dist.is_initialized()


def test_distributed_run_ends_the_group_only_on_a_clean_exit():
    assert run_local_ranks(_group_after_blocks, 2) == (True, False)
