"""Distributed pieces of dalle_ds (docs/powersgd.md):

``topology``: machines and ordinals (local and global process groups, emulable on one box);
``powersgd``: the hierarchical PowerSGD reducer with 1-6-9 error buffers (paper §2.5, Appendix E);
``orthogonalize``: Householder / QR / Gram-Schmidt for its P matrices;
``deepspeed_powersgd``: the reducer inside a DeepSpeed engine (ZeRO 0, 1, 2, 3) as a trainer extension;
``fp169_allreduce``: all-reduce of 1-6-9 codes over any process group (gloo or NCCL) with byte counting;
``collectives``: an all-reduce and an all-gather of small host tensors on any backend.
"""
from .fp169_allreduce import (
    COUNTER,
    CommCounter,
    all_reduce_fp169_,
    allreduce_bytes,
    padded_chunk,
    ring_allreduce_bytes,
)
from .powersgd import HierarchicalPowerSGD, PowerSGDSettings, ReduceReport
from .topology import Topology

__all__ = ["COUNTER", "CommCounter", "all_reduce_fp169_", "allreduce_bytes", "padded_chunk", "ring_allreduce_bytes",
           "HierarchicalPowerSGD", "PowerSGDSettings", "ReduceReport", "Topology"]
