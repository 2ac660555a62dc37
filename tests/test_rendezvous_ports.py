"""Rendezvous ports of the multi-rank tests: none may be found free and bound only later, when the kernel may have
given it to another socket meanwhile (CI: 2 xdist workers, one's ranks binding listeners while the other's launcher
starts). run_local_ranks keeps its rendezvous store in the parent, on a port picked as it is bound."""
import socket

import pytest
import torch
import torch.distributed as dist

from dalle_ds.dist import local_ranks
from dalle_ds.dist.local_ranks import run_local_ranks
from dalle_ds.train import distributed


def _world_sum(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t)


@pytest.mark.distributed
def test_run_local_ranks_does_not_rendezvous_on_a_port_found_free_before(monkeypatch):
    """The harness used to pick a free port, release it and let rank 0 bind it after its start-up: a port taken in
    between (here: before the ranks start) made rank 0 fail with EADDRINUSE."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(distributed, "free_port", lambda: port)
        monkeypatch.setattr(local_ranks, "free_port", lambda: port, raising=False)
        assert run_local_ranks(_world_sum, 2, timeout=120) == 3.0
