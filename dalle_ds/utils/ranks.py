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
