"""Run a test body on N real gloo processes (torch.multiprocessing): ``run_on_ranks(fn, world, *args)`` calls
``fn(rank, world, *args)`` in each process after ``init_process_group``; an assertion in any rank fails the test."""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch_utils import free_port


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # what a launcher would export (DeepSpeed's engine insists on LOCAL_RANK)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    init_gloo(rank, world, port)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable, world: int, *args) -> None:
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
