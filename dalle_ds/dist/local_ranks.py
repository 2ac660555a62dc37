"""Run a function on N gloo processes of this machine: the harness behind the multi-rank tests and benchmarks.

``run_local_ranks(fn, world, *args)`` starts ``world`` spawned processes, exports in each what a launcher would
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``PORT``: DeepSpeed's engine insists
on ``LOCAL_RANK``), pins one thread per process, initializes a gloo process group, calls ``fn(rank, world, *args)``
and returns rank 0's return value. If a rank raises, the others are terminated (they may be blocked in a collective
the failed rank will never join) and a RuntimeError carries the traceback of the rank that raised first. With
``timeout=`` seconds, ranks still running then are terminated too and a RuntimeError names them (a test of code that
could leave ranks waiting on each other fails instead of hanging).
"""
from __future__ import annotations

import os
import queue
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.constants import default_pg_timeout

__all__ = ["run_local_ranks"]

#: after a rank's failure, how long to wait for the other ranks' reports still on their way
_REPORT_GRACE_S = 5.0


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results, backend: str = "gloo") -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":  # one GPU per rank (NCCL refuses two ranks on one device)
        torch.cuda.set_device(rank)
    # the rendezvous store is the parent's (run_local_ranks): every rank, rank 0 included, is a client of it
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=default_pg_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
        results.put((rank, True, out if rank == 0 else None, time.monotonic()))
    except BaseException:
        results.put((rank, False, traceback.format_exc(), time.monotonic()))  # when: see run_local_ranks
    finally:
        if dist.is_initialized():  # fn may have ended the group itself (shutdown_distributed)
            dist.destroy_process_group()


def run_local_ranks(fn: Callable, world: int, *args, timeout: float | None = None, backend: str = "gloo") -> Any:
    """``fn(rank, world, *args)`` on ``world`` local gloo ranks; returns rank 0's result (see the module doc).
    ``timeout``: seconds from the start after which unfinished ranks are terminated and a RuntimeError is raised.
    ``backend="nccl"``: rank r on CUDA device r (GPU tests)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # The rendezvous store lives here, on a port the kernel picks as it binds it. A port found free here and bound by
    # rank 0 only once it had started (seconds of imports on a loaded machine) could be taken meanwhile, by a gloo
    # listener of another test's ranks say: rank 0 then failed with EADDRINUSE. MASTER_PORT (exported for DeepSpeed)
    # names this store, so a rank that ends the group must not start another through env:// on it.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=default_pg_timeout, wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, results, backend)) for r in range(world)]
    deadline = None if timeout is None else time.monotonic() + timeout
    for p in procs:
        p.start()
    done, failure, value, finished = 0, None, None, set()
    raised: list[tuple[float, int, str]] = []  # (when, rank, traceback) of the ranks that raised
    while done < world and failure is None and not raised:
        try:
            rank, ok, payload, when = results.get(timeout=1.0)
        except queue.Empty:
            crashed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if crashed:  # died without reporting (e.g. killed by a signal)
                failure = f"rank {crashed[0]} exited with code {procs[crashed[0]].exitcode}"
            elif deadline is not None and time.monotonic() > deadline:
                waiting = [r for r in range(world) if r not in finished]
                failure = (f"timed out after {timeout} s: rank(s) {', '.join(map(str, waiting))} did not finish "
                           "(waiting in a collective that other ranks never joined?)")
            continue
        done += 1
        finished.add(rank)
        if not ok:
            raised.append((when, rank, payload))
        elif rank == 0:
            value = payload
    if raised:
        # A rank that raised ends its group, and the ranks waiting in a collective with it fail about 10 ms later
        # ("Connection closed by peer"): their reports may reach this queue first (a report is written by the
        # rank's feeder thread, late when that thread is starved, as on a loaded 2-core machine). Collect the
        # reports still on their way, for a few seconds at most, and name the rank that raised first (the ranks'
        # time.monotonic() is the machine's one clock).
        grace = time.monotonic() + _REPORT_GRACE_S
        while done < world and time.monotonic() < grace:
            try:
                rank, ok, payload, when = results.get(timeout=0.1)
            except queue.Empty:
                if all(r in finished or procs[r].exitcode is not None for r in range(world)) and results.empty():
                    break
                continue
            done += 1
            finished.add(rank)
            if not ok:
                raised.append((when, rank, payload))
        _, rank, payload = min(raised)
        failure = f"rank {rank} raised:\n{payload}"
    if failure is not None:
        for p in procs:
            if p.is_alive():
                p.terminate()
    for p in procs:
        p.join()
    del store  # every rank has left: the server stops
    if failure is not None:
        raise RuntimeError(failure)
    return value
