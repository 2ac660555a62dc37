"""Helpers for tests that run entry points under the real `deepspeed` launcher (gloo on CPU)."""
from __future__ import annotations

import glob
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from dalle_ds.train import distributed
from dalle_ds.train.distributed import SHM_ALLREDUCE_PREFIX

ROOT = Path(__file__).resolve().parents[1]

#: the lowest port the launcher tests take theirs from (up to the kernel's ephemeral range)
LOWEST_PORT = 10000
_ports = random.Random()  # seeded from os.urandom: two pytest sessions on one machine pick apart


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out to sockets bound to port 0 and to outgoing connections (ip_local_port_range)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def worker_port_block(worker: str | None = None, workers: int | None = None) -> range:
    """The ports of xdist worker ``worker`` of ``workers`` (default: ``PYTEST_XDIST_WORKER``, e.g. ``gw1``, and
    ``PYTEST_XDIST_WORKER_COUNT``; without xdist one worker): its share of those between LOWEST_PORT and the
    ephemeral range; empty when there is no room below the range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0") if worker is None else worker
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) if workers is None else workers
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (ephemeral_port_range()[0] - LOWEST_PORT) // max(workers, 1)
    if size < 100:
        return range(0)
    start = LOWEST_PORT + (index % max(workers, 1)) * size
    return range(start, start + size)


def free_port() -> int:
    """A port for a launcher's rendezvous (``--master_port``): free now, and not one the kernel gives to anyone else.

    ``dalle_ds.train.distributed.free_port`` asks the kernel for a free port and lets it go, and the launcher's rank 0
    binds it only once the launcher and the ranks have started: 8-9 s later on the 2-core machine at load 6, longer
    when busier. Meanwhile the kernel could give the same port to any socket bound to port 0 -- a gloo listener of
    the other xdist worker's ranks, its rendezvous -- and rank 0 then failed with EADDRINUSE (or its ranks joined
    another job's rendezvous). The kernel hands out ports of the ephemeral range only: this takes, at random, one of
    this worker's block below it that can be bound now (the kernel's pick where there is no room below the range)."""
    block = worker_port_block()
    for _ in range(100 if block else 0):
        port = _ports.choice(block)
        with socket.socket() as s:
            try:
                s.bind(("", port))  # no SO_REUSEADDR: a port still in TIME_WAIT from an earlier run is skipped too
            except OSError:
                continue
        return port
    return distributed.free_port()


def load_script(path: str, name: str):
    """The module of a script that is not in a package (``launch/*.py``, ``benchmarks/*.py``), loaded from the
    repository under ``name`` so that a test can call its functions and ``main``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_process_env(**extra: str) -> dict[str, str]:
    """The environment for an entry point run as one plain process (no launcher): the repository on PYTHONPATH,
    one OpenMP thread, ``extra``, and no rank variables inherited from a launcher around pytest."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _deepspeed_exe() -> str:
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the deepspeed launcher is not on PATH"
    return exe


def _launcher_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _launch_command(script: str, args: list[str], num_procs: int, port: int) -> list[str]:
    return [_deepspeed_exe(), "--num_gpus", str(num_procs), "--master_port", str(port), str(ROOT / script), *args]


def deepspeed_start(script: str, args: list[str], num_procs: int = 2) -> subprocess.Popen:
    """The launch of :func:`deepspeed_launch`, left running (stdout and stderr merged into ``stdout``): for tests
    that act on the ranks while they train."""
    return subprocess.Popen(_launch_command(script, args, num_procs, free_port()), cwd=ROOT, env=_launcher_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def deepspeed_launch(script: str, args: list[str], num_procs: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    port = free_port()
    cmd = _launch_command(script, args, num_procs, port)
    proc = subprocess.run(cmd, cwd=ROOT, env=_launcher_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    # DeepSpeed's CPU shm all-reduce workspaces (66 MiB per rank) must not outlive the run (distributed.py).
    left = glob.glob(f"{SHM_ALLREDUCE_PREFIX}_*_{port}_*")
    assert not left, f"{script} left shared memory behind: {left}"
    # DeepSpeed's calls of torch's renamed collectives are not the user's to fix: init_distributed silences them
    assert "is deprecated. Please use `torch.distributed." not in proc.stderr, proc.stderr[-2000:]
    assert "before it has started" not in proc.stdout + proc.stderr  # DeepSpeed's scheduler constructor: no news
    return proc


def can_fake_hostnames() -> str | None:
    """Why :func:`deepspeed_launch_nodes` cannot run here (no ``unshare``, or no permission for a UTS namespace), or
    None."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname dalle-ds-probe && hostname"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "dalle-ds-probe":
        return f"cannot make a UTS namespace here: {(probe.stderr or probe.stdout).strip()[:200]}"
    return None


def deepspeed_launch_nodes(script: str, args: list[str], nodes: int = 2, procs_per_node: int = 2,
                           workdir: Path | None = None, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Several "machines" on this one: DeepSpeed's multi-node launch without ssh (``--hostfile`` + ``--no_ssh
    --node_rank i``, the way a cluster without pdsh runs it: one launcher per node), each node's launcher in a UTS
    namespace of its own with the hostname ``node<i>``, all on loopback. What differs from one launcher with
    ``nodes x procs_per_node`` ranks is what a real multi-node job differs in: the ranks' hostnames, the launcher's
    per-node ``LOCAL_SIZE`` and node-major ranks."""
    exe = _deepspeed_exe()
    workdir = workdir or Path(os.environ.get("TMPDIR", "/tmp"))
    hostfile = workdir / "hostfile"
    hostfile.write_text("".join(f"node{i} slots={procs_per_node}\n" for i in range(nodes)))
    env, port = _launcher_env(), free_port()
    procs = []
    for i in range(nodes):
        cmd = [exe, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i), "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(ROOT / script), *args]
        shell = f"hostname node{i} && exec {' '.join(shlex.quote(c) for c in cmd)}"
        procs.append(subprocess.Popen(["unshare", "--uts", "sh", "-c", shell], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, d in enumerate(done):
        if d.returncode != 0:
            raise AssertionError(f"node{i} of {script} failed ({d.returncode}):\n{d.stdout[-4000:]}\n"
                                 f"{d.stderr[-4000:]}")
    return done
