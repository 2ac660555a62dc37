"""Process-group helpers shared by the launch scripts (they all run under the ``deepspeed`` launcher)."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Mapping

import torch
import torch.distributed as dist


#: Variables an MPI launcher sets in every process it starts, with the job's process count: OpenMPI (DeepSpeed's
#: ``--launcher openmpi``, and the AzureML / SageMaker set-ups ``deepspeed.comm`` patches from them), MPICH / Intel
#: MPI (Hydra's PMI) and MVAPICH2 (``--launcher mvapich``).
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def multi_process_launch(env: Mapping[str, str]) -> str | None:
    """What in ``env`` says that this process is one of several started by MPI or Slurm without the torch-style
    ``RANK``/``WORLD_SIZE`` variables, e.g. ``"OMPI_COMM_WORLD_SIZE=8"``; None when nothing does.

    DeepSpeed's openmpi, mvapich and slurm runners (``deepspeed/launcher/multinode_runner.py``) start the script
    directly (``mpirun ... python train.py``, ``srun ... python train.py``) and leave the ranks to
    ``deepspeed.init_distributed``: when any of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK is missing
    it runs its MPI discovery (``deepspeed/comm/comm.py``: ``mpi_discovery``, mpi4py's COMM_WORLD; the OMPI_*
    variables under AzureML / SageMaker). A count of 1 is a single process (``mpirun -n 1``). Under Slurm: a task
    (``SLURM_PROCID``) of a step of several, counted by the step's ``SLURM_STEP_NUM_TASKS`` (srun sets it) or else
    the job's ``SLURM_NTASKS``.
    """
    for name in MPI_SIZE_VARIABLES:
        if _count(env.get(name)) > 1:
            return f"{name}={env[name]}"
    if "SLURM_PROCID" in env:
        name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        if _count(env.get(name)) > 1:
            return f"{name}={env[name]} (SLURM_PROCID={env['SLURM_PROCID']})"
    return None


def _count(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def single_process_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """The variables to add for a plain ``python script.py`` (a world of one on device 0), or None when a launcher
    set the rank (torch-style RANK, as the ``deepspeed`` launcher and torchrun do) or DeepSpeed must discover it
    (:func:`multi_process_launch`). Filling RANK=0 / WORLD_SIZE=1 in an MPI or Slurm job would skip that discovery
    and make every process a world of one on the same GPU, all writing the same run folder."""
    if "RANK" in env or multi_process_launch(env) is not None:
        return None
    out = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    out = {k: v for k, v in out.items() if k not in env}
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(free_port())
    return out


class _KnownDeepSpeedNoise(logging.Filter):
    """DeepSpeed warnings that report nothing wrong, dropped unless DALLE_DS_VERBOSE=1: WarmupLR and WarmupDecayLR
    (deepspeed/runtime/lr_schedules.py, 0.19.8) call their own ``get_lr`` in their constructor, before the first step,
    and warn about it, on every rank of every run that uses them."""

    NOISE = ("Attempting to get learning rate from scheduler before it has started",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU); a no-op when already set up.

    Works without a launcher too: a single process gets a world of one (:func:`single_process_env`). Under MPI or
    Slurm without RANK (DeepSpeed's openmpi / mvapich / slurm runners, a bare ``mpirun`` / ``srun``) DeepSpeed's MPI
    discovery finds the ranks; it needs mpi4py.
    """
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    # DeepSpeed logs every engine detail at INFO on every rank; keep warnings unless DALLE_DS_VERBOSE=1.
    if os.environ.get("DALLE_DS_VERBOSE", "0") in ("", "0"):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not any(isinstance(f, _KnownDeepSpeedNoise) for f in logging.getLogger("DeepSpeed").filters):
            logging.getLogger("DeepSpeed").addFilter(_KnownDeepSpeedNoise())
        # torch 2.13 renamed two collectives; DeepSpeed 0.19.8 (deepspeed/comm/torch.py) still calls the old names,
        # which warn once per rank in every run (this project's own calls use the new ones: dist/collectives.py)
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                                        r"deprecated")
    single = single_process_env(os.environ)
    if single is not None:
        os.environ.update(single)
    try:
        deepspeed.init_distributed(dist_init_required=True)
    except ImportError as e:
        launch = multi_process_launch(os.environ)
        if launch is None or getattr(e, "name", None) != "mpi4py":
            raise
        raise RuntimeError(f"started as one of several processes ({launch}) without RANK/WORLD_SIZE, so DeepSpeed "
                           "discovers the ranks through MPI, which needs mpi4py: pip install mpi4py (built against "
                           "this MPI), or start with the deepspeed launcher (its default pdsh/local runner) or "
                           "torchrun, which set RANK") from e
    _unlink_shm_allreduce_buffer()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the machine: without this each rank would start one thread per core.
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_size, 1)))


def shutdown_distributed() -> None:
    """End a script's distributed run on every rank together: a barrier, then ``destroy_process_group``.

    Without it each rank tears its process group down whenever its interpreter exits; a rank that finishes early
    (rank 1 of ``bench_train.py`` returns while rank 0 still writes the report) then dies in the C++ teardown now
    and then (``terminate called without an active exception``, exit -6: 2 of 15 two-rank ``bench_train --quick``
    runs on CPU/gloo before this, 0 of 40 after). A no-op without a process group. Call it on the normal path only:
    after an exception the other ranks may sit in a collective, and a barrier would hang instead of failing.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_run():
    """``with distributed_run(): ...`` — :func:`init_distributed` on entry, :func:`shutdown_distributed` when the
    block ends normally (``return`` included) and not when it raises: the launcher then stops the other ranks, and a
    barrier here would hang instead. The entry points (training CLI, tokenizer, sampler, bench_train) use it."""
    init_distributed()
    yield
    shutdown_distributed()


#: DeepSpeed's name prefix for the CPU shm all-reduce workspaces (``SHM_BUFFER_NAME`` in shm.cpp).
SHM_ALLREDUCE_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"


def shm_allreduce_buffer_path() -> str:
    """Where DeepSpeed's CPU backend puts this rank's shared-memory all-reduce workspace (~66 MiB).

    DeepSpeed 0.19.8 (``ops/csrc/cpu/comm/shm.cpp``) creates one ``/dev/shm`` object per rank when all ranks are on
    one machine (``LOCAL_SIZE`` == world size), named from the uid, ``MASTER_ADDR``, ``MASTER_PORT`` and the rank,
    and unlinks it only in ``shared_close``, which nothing calls: every run left ranks x 66 MiB of RAM behind.
    """
    r = int(os.environ.get("RANK", "0"))
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"{SHM_ALLREDUCE_PREFIX}_{os.getuid()}_{addr}_{port}_{r}"


def _unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's shm name once every rank has mapped every peer's workspace.

    ``shm_initialize`` runs inside ``init_distributed`` and maps all peers before it returns, so after a barrier
    the names are no longer needed; the mappings stay valid until the processes exit (POSIX ``shm_unlink``), and
    the memory goes back to the system then instead of staying in ``/dev/shm``.
    """
    # The same test shm_interface.cpp makes; every rank sees the same values, so all or none reach the barrier.
    if torch.cuda.is_available() or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    dist.barrier()
    try:
        os.unlink(shm_allreduce_buffer_path())
    except FileNotFoundError:
        pass


def check_same_on_every_rank(what: str, value: Any, hint: str = "") -> None:
    """Raise the same RuntimeError on every rank when ranks hold different ``value``s (small and picklable) for
    something each rank works out on its own but all must share (the dataset's length, the checkpoint to resume).
    A collective: every rank calls it. On one rank, or without a process group, it checks nothing."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    ranks: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        ranks.setdefault(repr(v), []).append(r)
    if len(ranks) > 1:
        seen = "; ".join(f"{v} on rank(s) {', '.join(map(str, rs[:8]))}{', ...' if len(rs) > 8 else ''}"
                         for v, rs in ranks.items())
        raise RuntimeError(f"the ranks disagree on {what}: {seen}{'; ' + hint if hint else ''}")


def failures_on_any_rank(error: str | None) -> list[tuple[int, str]]:
    """(rank, message) for every rank whose ``error`` is not None: a collective (every rank calls it, each with its
    own error or None), so that a failure only some ranks see -- a damaged file that only one rank reads -- ends every
    rank alike instead of leaving the others waiting in the next collective. On one rank, or without a process
    group, the local error alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [] if error is None else [(rank(), error)]
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [(r, e) for r, e in enumerate(errors) if e is not None]


def free_port() -> int:
    """A free TCP port on the loopback interface (for a local rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(f"{name}:{local_rank()}") if name == "cuda" else torch.device(name)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a few Python scalars across ranks (for logging)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    t /= world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own rows: what every rank's
    loss sent them. Written on the stable all_gather / all_reduce so it runs on gloo and NCCL alike."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = (dist.get_rank() * x.shape[0], x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start, n = ctx.rows
        return grad[start:start + n]


def gather_rows_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``x`` stacked along dim 0 in rank order (all ranks must pass the same shape), differentiable,
    and the offset of this rank's rows; ``(x, 0)`` outside a multi-rank process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherRows.apply(x), dist.get_rank() * x.shape[0]
