"""The machine topology of a data-parallel job: which ranks share a machine, which ranks share an ordinal.

DALL-E (arXiv 2102.12092, E.2) reduces gradients in two levels: a reduce-scatter among the GPUs of one machine (fast
NVLink), then all-reduces of the compressed PowerSGD factors among the GPUs with the *same ordinal* on every machine
(slow network). The groups are the ones DeepSpeed builds in ``deepspeed.utils.groups._get_local_all_to_all_group``
(``local_{node}`` and ``global_{ordinal}``), built here the same way but with a local size that can be set, so that
one box can emulate several machines (4 CPU ranks with ``local_size=2`` are 2 machines x 2 GPUs).

Ranks must be laid out machine-major: rank = machine * local_size + local_rank. Without an explicit local size the
machines are read from the ranks' hostnames (all-gathered before any group is made), not from the launcher's
environment: ``LOCAL_WORLD_SIZE`` (torchrun) and ``LOCAL_SIZE`` (DeepSpeed's pdsh, Intel MPI and MPICH runners) are
not exported by its OpenMPI, Slurm or MVAPICH runners (deepspeed/launcher/multinode_runner.py, 0.19.8), where the
whole job would silently have been one machine. The hostnames also show what would otherwise go wrong silently or
hang: machines with different numbers of ranks (ranks would create different ``new_group`` sequences) and machines
whose ranks are not one contiguous block (Slurm's cyclic distribution: the groups would span machines). Both are
refused with the same error on every rank.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .collectives import all_gather_anywhere

__all__ = ["Topology", "resolve_local_size", "local_size_from_hosts"]

_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
_NAME_BYTES = 255  # a DNS name's limit (Linux's HOST_NAME_MAX is 64); longer names are replaced by their SHA-256


def resolve_local_size(local_size: int, world_size: int) -> int:
    """An explicit local size (``powersgd.local_size`` > 0), capped at ``world_size``. Raises ValueError if it does
    not divide ``world_size``."""
    local_size = min(local_size, world_size)
    if local_size < 1 or world_size % local_size:
        raise ValueError(f"local size {local_size} (GPUs per machine) must divide the world size {world_size}")
    return local_size


def _ranks_text(ranks: Sequence[int]) -> str:
    if list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0]}"
    shown = ", ".join(str(r) for r in ranks[:8])
    return f"ranks {shown}{', ...' if len(ranks) > 8 else ''}"


def _machines_text(machines: dict[str, list[int]]) -> str:
    items = [f"{host}: {len(ranks)} ({_ranks_text(ranks)})" for host, ranks in list(machines.items())[:8]]
    more = f"; ... {len(machines) - 8} more" if len(machines) > 8 else ""
    return "; ".join(items) + more


def local_size_from_hosts(hosts: Sequence[str], env_sizes: Sequence[int] = ()) -> int:
    """Ranks per machine from every rank's hostname (``hosts[r]`` of rank r); ``env_sizes[r]``: rank r's launcher
    ``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE`` (0: unset), checked against it. Raises ValueError when the machines hold
    different numbers of ranks, when a machine's ranks are not a contiguous machine-major block, or when a set
    variable disagrees with the hostnames. A pure function of its arguments: given the all-gathered lists every
    rank reaches the same result, or the same error."""
    machines: dict[str, list[int]] = {}
    for r, host in enumerate(hosts):
        machines.setdefault(host, []).append(r)
    override = "set powersgd.local_size to the ranks per machine to group them yourself"
    sizes = {len(ranks) for ranks in machines.values()}
    if len(sizes) > 1:
        raise ValueError(f"PowerSGD topology: the machines (hostnames) hold different numbers of ranks "
                         f"({_machines_text(machines)}); hierarchical PowerSGD needs the same number on every "
                         f"machine: launch as many ranks on each node, or {override} (it must divide every "
                         f"machine's count)")
    m = sizes.pop()
    for i, (host, ranks) in enumerate(machines.items()):
        if ranks != list(range(i * m, (i + 1) * m)):
            raise ValueError(f"PowerSGD topology: the ranks of a machine are not one contiguous block "
                             f"(rank = machine x {m} + local rank): {_machines_text(machines)}; launch ranks "
                             f"node by node (Slurm: --distribution=block, not cyclic; OpenMPI: --map-by node is "
                             f"cyclic, use --map-by slot), or {override}")
    disagree = [(r, e) for r, e in enumerate(env_sizes) if e and e != m]
    if disagree:
        r, e = disagree[0]
        raise ValueError(f"PowerSGD topology: the launcher's {' / '.join(_LOCAL_SIZE_VARS)} is {e} on rank {r}"
                         f"{f' (and {len(disagree) - 1} other rank(s))' if len(disagree) > 1 else ''}, but the "
                         f"hostnames give {m} rank(s) on each of {len(machines)} machine(s) "
                         f"({_machines_text(machines)}); if ranks of one machine see different hostnames "
                         f"(containers), {override}; otherwise fix the launcher's environment")
    return m


def _env_local_size() -> int:
    for var in _LOCAL_SIZE_VARS:
        value = os.environ.get(var)
        if value:
            try:
                return max(0, int(value))
            except ValueError:
                return 0  # not a number: ignored here as before (the hostnames decide)
    return 0


def _gather_hosts(group: Any) -> tuple[list[str], list[int]]:
    """Every rank's hostname and launcher local size, in one all-gather of a fixed-size int32 row per rank (on any
    backend: on NCCL the row makes a round trip through the current CUDA device, set by the trainers before this)."""
    name = socket.gethostname().encode()
    if len(name) > _NAME_BYTES:
        name = hashlib.sha256(name).hexdigest().encode()
    row = torch.zeros(2 + _NAME_BYTES, dtype=torch.int32)
    row[0], row[1] = _env_local_size(), len(name)
    row[2:2 + len(name)] = torch.tensor(list(name), dtype=torch.int32)
    rows = all_gather_anywhere(row, group).tolist()
    return [bytes(r[2:2 + r[1]]).decode(errors="replace") for r in rows], [r[0] for r in rows]


@dataclass
class Topology:
    world_size: int
    rank: int
    local_size: int
    local_group: Any
    """The ranks of this machine (``local_{machine}``)."""
    global_group: Any
    """The ranks with this rank's local ordinal on every machine (``global_{local_rank}``)."""
    world_group: Any = None

    @property
    def machines(self) -> int:
        return self.world_size // self.local_size

    @property
    def machine(self) -> int:
        return self.rank // self.local_size

    @property
    def local_rank(self) -> int:
        return self.rank % self.local_size

    def global_rank_of(self, machine: int) -> int:
        """The rank on ``machine`` with this rank's local ordinal (a member of :attr:`global_group`)."""
        return machine * self.local_size + self.local_rank

    @classmethod
    def build(cls, local_size: int = 0, group: Any = None) -> "Topology":
        """Create the groups. A collective: every rank of ``group`` (default: the world) must call it, in the same
        order relative to other ``new_group`` calls. ``local_size`` > 0 sets the ranks per machine (emulation, or an
        override); 0 reads the machines from the hostnames (see the module doc), which are all-gathered first, so
        that a layout it refuses raises the same error on every rank before any rank calls ``new_group``."""
        if not dist.is_initialized():
            raise RuntimeError("Topology.build needs torch.distributed to be initialized")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if group is not None and world != dist.get_world_size():
            raise NotImplementedError("topologies over a sub-group of the world are not supported")
        m = resolve_local_size(local_size, world) if local_size > 0 else local_size_from_hosts(*_gather_hosts(group))
        local_group = global_group = None
        for machine in range(world // m):  # every rank creates every group (new_group is collective)
            g = dist.new_group(list(range(machine * m, (machine + 1) * m)))
            if machine == rank // m:
                local_group = g
        for ordinal in range(m):
            g = dist.new_group(list(range(ordinal, world, m)))
            if ordinal == rank % m:
                global_group = g
        return cls(world_size=world, rank=rank, local_size=m, local_group=local_group, global_group=global_group,
                   world_group=group)

    def describe(self) -> str:
        return (f"{self.machines} machine(s) x {self.local_size} rank(s); this is rank {self.rank} = machine "
                f"{self.machine}, local rank {self.local_rank}")
