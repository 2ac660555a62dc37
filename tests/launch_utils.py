"""Helpers for tests that run entry points under the real `deepspeed` launcher (gloo on CPU)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dalle_ds.train.distributed import SHM_ALLREDUCE_PREFIX, free_port  # noqa: F401  (free_port re-exported)

ROOT = Path(__file__).resolve().parents[1]


def single_process_env(**extra: str) -> dict[str, str]:
    """The environment for an entry point run as one plain process (no launcher): the repository on PYTHONPATH,
    one OpenMP thread, ``extra``, and no rank variables inherited from a launcher around pytest."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def deepspeed_launch(script: str, args: list[str], num_procs: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the deepspeed launcher is not on PATH"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    port = free_port()
    cmd = [exe, "--num_gpus", str(num_procs), "--master_port", str(port), str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    # DeepSpeed's CPU shm all-reduce workspaces (66 MiB per rank) must not outlive the run (distributed.py).
    left = glob.glob(f"{SHM_ALLREDUCE_PREFIX}_*_{port}_*")
    assert not left, f"{script} left shared memory behind: {left}"
    return proc
