"""Host reads of the reducer. On a GPU each read (``bool(t)``, ``float(t)``, ``.item()``, ``.tolist()``) waits for
the device, and the reducer runs inside DeepSpeed's gradient hooks, so a read there would hold the host until the
bucket's collectives finish. Counted here on CPU tensors, where the same calls mark where a GPU would wait; 2 gloo
ranks as 2 machines x 1 GPU, so that every collective runs. ``reduce_`` called directly reads once, at its end (its
report's host fields); the extension's hook path (``resolve=False``) reads nothing, writes the skipping Inf on the
device and counts skipped steps on the device. ``track_rounding`` (diagnostics) is allowed more. Bit-for-bit
equality with the per-matrix-read version was checked when the reads were merged (docs/powersgd.md); the numeric
tests are in tests/test_powersgd.py."""
import math

import pytest
import torch

from dalle_ds.dist.local_ranks import run_local_ranks

pytestmark = pytest.mark.distributed

SHAPES = {"a.weight": (8, 6), "b.weight": (6, 12), "c.weight": (10, 4), "odd.weight": (5, 3), "a.bias": (8,)}
_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


class _ReadCounter:
    """Counts host reads of tensors, except fp169's check of a Python scale (a host scalar made on the spot)."""

    def __init__(self):
        self.count, self._inside_scale_check = 0, False

    def install(self):
        from dalle_ds.ops import fp169
        for name in _READS:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **kw):
                if not self._inside_scale_check:
                    self.count += 1
                return _real(t, *a, **kw)
            setattr(torch.Tensor, name, counted)
        real_check = fp169._check_scale

        def check_scale(*a, **kw):
            self._inside_scale_check = True
            try:
                return real_check(*a, **kw)
            finally:
                self._inside_scale_check = False
        fp169._check_scale = check_scale


def _reads(rank, world):
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings
    from dalle_ds.dist.topology import Topology
    topo = Topology.build(local_size=1)
    counter = _ReadCounter()
    counter.install()
    out = {}
    for name, kw in {"default": {}, "fp32 buffers": {"error_dtype": "fp32"}, "warm start": {"warm_start": True},
                     "re-centering step": {"recenter_every": 1}, "start_step": {"start_step": 5}}.items():
        red = HierarchicalPowerSGD(topo, PowerSGDSettings(rank=2, seed=1, **kw))
        for k, s in SHAPES.items():
            red.register(k, s)
        for step, poison in ((0, False), (1, True)):  # a clean step and one where rank 1 has an Inf
            g = torch.Generator().manual_seed(10 * step + rank)
            grads = [(k, torch.randn(*s, generator=g) * 1e-3) for k, s in SHAPES.items()]
            if poison and rank == 1:
                grads[0][1][0, 0] = math.inf
            counter.count = 0
            rep = red.reduce_(grads, step=step)
            out[(name, step)] = (counter.count, rep.skip)
    out.update(_hook_path_reads(counter, rank, topo))
    return out


def _hook_path_reads(counter, rank, topo):
    """The DeepSpeed hook path: the extension's reductions (``reduce``, ZeRO-1/2; ``reduce_partitions_``, ZeRO-3)
    read nothing back; the Inf that makes DeepSpeed skip is written on the device; the skip is counted once per step
    (both buckets of the poisoned step skip) when a log step reads it."""
    import types

    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings
    ext = PowerSGDExtension(PowerSGDConfig(enabled=True))
    ext.reducer = HierarchicalPowerSGD(topo, PowerSGDSettings(rank=2, seed=1))
    for k, s in SHAPES.items():
        ext.reducer.register(k, s)
    ext.engine = types.SimpleNamespace(global_steps=0)
    out = {}
    for step, poison in ((0, False), (1, True), (2, False)):
        ext.engine.global_steps = step
        counter.count = 0
        firsts = []
        for bucket in (("a.weight", "a.bias"), ("b.weight", "c.weight", "odd.weight")):
            g = torch.Generator().manual_seed(10 * step + rank)
            grads = [(k, torch.randn(*SHAPES[k], generator=g) * 1e-3) for k in bucket]
            if poison and rank == 1:
                grads[0][1][0, 0] = math.inf
            if "b.weight" in bucket:  # as ZeRO-3's hook does (ext.reduce_partitions): this rank's partitions back
                rep, parts = ext.reducer.reduce_partitions_(grads, step=step, resolve=False)
                ext._account(rep)
                firsts.append(parts[0][0])
            else:
                ext.reduce(grads)
                firsts.append(grads[0][1].view(-1)[0])
        reads = counter.count
        out[("hook", step)] = (reads, [math.isinf(float(f)) for f in firsts])
    out[("hook", "skipped")] = (0, ext.stats()["powersgd/skipped_steps"])
    return out


def test_one_host_read_per_reduce_call():
    got = run_local_ranks(_reads, 2, timeout=300)
    for step in range(3):
        reads, infs = got.pop(("hook", step))
        assert reads == 0, (step, reads)  # inside DeepSpeed's hooks: no host read at all
        assert infs == [step == 1] * 2, (step, infs)  # the skipping Inf, written on the device, on every rank
    assert got.pop(("hook", "skipped"))[1] == 1
    for (name, step), (reads, skip) in got.items():
        # the uncompressed warm-up (start_step) too: its flag reaches the caller, ZeRO-0's skip depends on it
        assert reads == 1, (name, step, reads)
        assert skip == (step == 1), (name, step)  # the Inf on rank 1 reached rank 0 through that one read
