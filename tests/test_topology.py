"""Machines from hostnames (dalle_ds.dist.topology): the launcher's LOCAL_WORLD_SIZE / LOCAL_SIZE is missing under
DeepSpeed's OpenMPI, Slurm and MVAPICH runners, so the ranks' hostnames decide. Machine-major layouts give the right
groups with or without the variable; uneven machines, a cyclic (not machine-major) layout and a variable that
disagrees with the hostnames raise the same error on every rank before any new_group (no rank is left waiting);
one hostname (the CPU CI case) and an explicit ``powersgd.local_size`` behave as before.

The multi-rank test runs 4 gloo ranks whose hostnames are faked per rank (``socket.gethostname`` patched in each).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist

from dalle_ds.dist.local_ranks import run_local_ranks
from dalle_ds.dist.topology import local_size_from_hosts


def test_local_size_from_hosts():
    assert local_size_from_hosts(["a", "a", "b", "b"]) == 2
    assert local_size_from_hosts(["a", "a", "b", "b"], [2, 2, 2, 2]) == 2
    assert local_size_from_hosts(["a", "a", "b", "b"], [0, 0, 2, 0]) == 2  # unset (0) on some ranks: not checked
    assert local_size_from_hosts(["x"] * 4, [4] * 4) == 4  # one machine
    assert local_size_from_hosts(["b", "b", "a", "a"]) == 2  # machines in rank order, whatever the names
    assert local_size_from_hosts(["a", "b", "c"]) == 1
    with pytest.raises(ValueError, match=r"different numbers of ranks \(a: 3 \(ranks 0-2\); b: 1 \(rank 3\)\)"):
        local_size_from_hosts(["a", "a", "a", "b"])
    with pytest.raises(ValueError, match=r"not one contiguous block(.|\n)*a: 2 \(ranks 0, 2\); b: 2 \(ranks 1, 3\)"
                                         r"(.|\n)*--distribution=block"):
        local_size_from_hosts(["a", "b", "a", "b"])
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE / LOCAL_SIZE is 4 on rank 0 \(and 3 other rank\(s\)\), "
                                         r"but the hostnames give 2 rank\(s\) on each of 2 machine\(s\)"
                                         r"(.|\n)*powersgd\.local_size"):
        local_size_from_hosts(["a", "a", "b", "b"], [4, 4, 4, 4])


def _as_host(name: str, env: dict[str, str]) -> None:
    socket.gethostname = lambda: name
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        os.environ.pop(var, None)
    os.environ.update(env)


def _layout(topo) -> tuple:
    """(machines, local size, ranks summed over this rank's local group, over its global group)."""
    local, glob = torch.tensor(float(topo.rank)), torch.tensor(float(topo.rank))
    dist.all_reduce(local, group=topo.local_group)
    dist.all_reduce(glob, group=topo.global_group)
    return topo.machines, topo.local_size, float(local), float(glob)


def _build(rank, hosts, env, local_size=0):
    """``Topology.build`` as rank ``rank`` of ``hosts``; the layout, or the error's message."""
    from dalle_ds.dist.topology import Topology
    _as_host(hosts[rank], env)
    try:
        return _layout(Topology.build(local_size))
    except ValueError as e:
        return f"ValueError: {e}"


CASES = {  # name: (hostnames of ranks 0-3, the launcher's variables, powersgd.local_size)
    "machine-major, no variable (OpenMPI / Slurm runners)": (["n0", "n0", "n1", "n1"], {}, 0),
    "machine-major, LOCAL_SIZE=2 (pdsh runner)": (["n0", "n0", "n1", "n1"], {"LOCAL_SIZE": "2"}, 0),
    "one machine, LOCAL_WORLD_SIZE=4 (the CPU CI case)": (["box"] * 4, {"LOCAL_WORLD_SIZE": "4"}, 0),
    "one machine, no variable": (["box"] * 4, {}, 0),
    "one machine, local_size=2 (emulation)": (["box"] * 4, {"LOCAL_WORLD_SIZE": "4"}, 2),
    "uneven machines, local_size=1 (override)": (["n0", "n0", "n0", "n1"], {}, 1),
    "uneven machines": (["n0", "n0", "n0", "n1"], {}, 0),
    "uneven machines, LOCAL_WORLD_SIZE per node": (["n0", "n0", "n0", "n1"], {}, 0),
    "cyclic layout": (["n0", "n1", "n0", "n1"], {"LOCAL_WORLD_SIZE": "2"}, 0),
    "variable disagrees": (["n0", "n0", "n1", "n1"], {"LOCAL_WORLD_SIZE": "4"}, 0),
}


def _all_cases(rank, world):
    out = {}
    for name, (hosts, env, local_size) in CASES.items():
        if name == "uneven machines, LOCAL_WORLD_SIZE per node":
            env = {"LOCAL_WORLD_SIZE": "3" if hosts[rank] == "n0" else "1"}
        mine = _build(rank, hosts, env, local_size)
        every = [None] * world
        dist.all_gather_object(every, mine)  # the default group still works after a refused layout
        out[name] = every
    return out


def test_machines_from_hostnames_on_4_ranks():
    got = run_local_ranks(_all_cases, 4, timeout=120)
    rank_sums = {(2, 2): [(2, 2, 1.0, 2.0), (2, 2, 1.0, 4.0), (2, 2, 5.0, 2.0), (2, 2, 5.0, 4.0)],
                 (1, 4): [(1, 4, 6.0, 0.0), (1, 4, 6.0, 1.0), (1, 4, 6.0, 2.0), (1, 4, 6.0, 3.0)],
                 (4, 1): [(4, 1, 0.0, 6.0), (4, 1, 1.0, 6.0), (4, 1, 2.0, 6.0), (4, 1, 3.0, 6.0)]}
    assert got["machine-major, no variable (OpenMPI / Slurm runners)"] == rank_sums[(2, 2)]
    assert got["machine-major, LOCAL_SIZE=2 (pdsh runner)"] == rank_sums[(2, 2)]
    assert got["one machine, LOCAL_WORLD_SIZE=4 (the CPU CI case)"] == rank_sums[(1, 4)]
    assert got["one machine, no variable"] == rank_sums[(1, 4)]
    assert got["one machine, local_size=2 (emulation)"] == rank_sums[(2, 2)]
    assert got["uneven machines, local_size=1 (override)"] == rank_sums[(4, 1)]
    for name, pattern in (("uneven machines", "different numbers of ranks"),
                          ("uneven machines, LOCAL_WORLD_SIZE per node", "different numbers of ranks"),
                          ("cyclic layout", "not one contiguous block"),
                          ("variable disagrees", "LOCAL_WORLD_SIZE / LOCAL_SIZE is 4 on rank 0")):
        messages = got[name]
        assert len(set(messages)) == 1, (name, messages)  # the same error on every rank
        assert messages[0].startswith("ValueError: PowerSGD topology") and pattern in messages[0], (name, messages)
