"""Which process of a job reports what every rank finds alike, also before torch.distributed starts."""
from __future__ import annotations

import os


def is_job_rank0() -> bool:
    """Rank 0 of the job: the process group's rank once it exists, else the ``RANK`` the launcher (``deepspeed``,
    torchrun) set before starting the process; a plain process is rank 0. For messages that every rank would print
    alike, e.g. a bad command line, found before the process group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def let_rank0_speak_first(seconds: float = 30.0) -> None:
    """On a rank other than 0, before any process group, wait up to ``seconds`` before exiting on an error every rank
    finds alike. The ``deepspeed`` launcher (and torchrun) kill all ranks as soon as one exits non-zero: a quiet rank
    that left first could take rank 0 down before it printed the reason (seen in CI: the job ended with exit 2 and no
    message). Rank 0 returns at once; the launcher stops this rank when rank 0 exits."""
    import time

    if not is_job_rank0():
        time.sleep(seconds)
