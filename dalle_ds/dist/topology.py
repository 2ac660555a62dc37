"""The machine topology of a data-parallel job: which ranks share a machine, which ranks share an ordinal.

DALL-E (arXiv 2102.12092, E.2) reduces gradients in two levels: a reduce-scatter among the GPUs of one machine (fast
NVLink), then all-reduces of the compressed PowerSGD factors among the GPUs with the *same ordinal* on every machine
(slow network). The groups are the ones DeepSpeed builds in ``deepspeed.utils.groups._get_local_all_to_all_group``
(``local_{node}`` and ``global_{ordinal}``), built here the same way but with a local size that can be set, so that
one box can emulate several machines (4 CPU ranks with ``local_size=2`` are 2 machines x 2 GPUs).

Ranks are laid out machine-major, as every launcher does: rank = machine * local_size + local_rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["Topology", "resolve_local_size"]


def resolve_local_size(local_size: int, world_size: int) -> int:
    """``local_size`` if > 0, else the launcher's ``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE``, else the whole world (one
    machine). Raises ValueError if it does not divide ``world_size``."""
    if local_size <= 0:
        env = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
        local_size = int(env) if env else world_size
    local_size = min(local_size, world_size)
    if local_size < 1 or world_size % local_size:
        raise ValueError(f"local size {local_size} (GPUs per machine) must divide the world size {world_size}")
    return local_size


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
        order relative to other ``new_group`` calls."""
        if not dist.is_initialized():
            raise RuntimeError("Topology.build needs torch.distributed to be initialized")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if group is not None and world != dist.get_world_size():
            raise NotImplementedError("topologies over a sub-group of the world are not supported")
        m = resolve_local_size(local_size, world)
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
