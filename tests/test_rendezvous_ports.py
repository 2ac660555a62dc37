"""Rendezvous ports of the multi-rank tests: none may be found free and bound only later, when the kernel may have
given it to another socket meanwhile (CI: 2 xdist workers, one's ranks binding listeners while the other's launcher
starts). run_local_ranks keeps its rendezvous store in the parent, on a port picked as it is bound; the launcher
tests take ports below the kernel's ephemeral range, a block per xdist worker (launch_utils.free_port)."""
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import launch_utils
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


def test_launcher_ports_are_outside_the_ephemeral_range_and_per_worker(monkeypatch):
    """The kernel hands out the ports of ip_local_port_range to every socket bound to port 0: a launcher's port
    from that range could be taken before its rank 0 binds it. Each xdist worker has its own block below it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range")
    if low < 10200:  # launch_utils.LOWEST_PORT and room above it
        pytest.skip(f"no room below the ephemeral range (from {low})")
    ports = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        ports[worker] = {launch_utils.free_port() for _ in range(20)}
        assert max(ports[worker]) < low, ports[worker]
    assert max(ports["gw0"]) < min(ports["gw1"]), ports  # the two workers never share one
    with socket.socket() as s:  # what it returns can be bound
        s.bind(("", ports["gw1"].pop()))
