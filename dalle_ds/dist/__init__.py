"""Distributed pieces of dalle_ds: process-group topology, the PowerSGD reducer and 16-bit collectives.

``fp169_allreduce``: all-reduce of 1-6-9 codes over any process group (gloo or NCCL) with byte counting.
"""
from .fp169_allreduce import (
    COUNTER,
    CommCounter,
    all_reduce_fp169_,
    allreduce_bytes,
    padded_chunk,
    ring_allreduce_bytes,
)

__all__ = ["COUNTER", "CommCounter", "all_reduce_fp169_", "allreduce_bytes", "padded_chunk", "ring_allreduce_bytes"]
