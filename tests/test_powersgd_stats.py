"""``PowerSGDExtension.stats()``'s error norm, in one process (no collective is involved): the value is the one the
old all-buffers-at-once sum gave, bit for bit, while at most one buffer is decoded at a time (at the 12B scale the
decoded copies of all of them are ~6 GB per rank) and the host waits for the device once, not once per buffer."""
import functools
import operator
import types
import weakref

import pytest
import torch


SHAPES = {"a.weight": (8, 6), "b.weight": (6, 12), "c.weight": (10, 4)}


def _reducer(error_dtype: str):
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings
    from dalle_ds.dist.topology import Topology
    topo = Topology(world_size=1, rank=0, local_size=1, local_group=None, global_group=None)
    red = HierarchicalPowerSGD(topo, PowerSGDSettings(rank=2, error_dtype=error_dtype))
    g = torch.Generator().manual_seed(5)
    for k, shape in SHAPES.items():
        assert red.register(k, shape)
        sh = red.shards[k]
        sh.err_set_(torch.randn(sh.shard_rows, sh.cols, generator=g) * 10.0 ** -(len(k) % 3))
    return red


def _extension(red):
    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    ext = PowerSGDExtension(PowerSGDConfig(enabled=True))
    ext.reducer, ext.engine = red, types.SimpleNamespace(global_steps=0)
    return ext


@pytest.mark.parametrize("error_dtype", ["fp169", "fp32"])
def test_error_norm_is_unchanged_and_decodes_one_buffer_at_a_time(monkeypatch, error_dtype):
    from dalle_ds.dist import powersgd
    red = _reducer(error_dtype)
    # the old formula, summed in buffer order (a running sum: Python 3.12's sum() compensates, another last bit)
    before = functools.reduce(operator.add, (float(e.double().pow(2).sum()) for e in red.error_buffers().values()))
    before = before ** 0.5
    assert before > 0

    alive: list[weakref.ref] = []
    real_value, real_float = powersgd._Shard.err_value, torch.Tensor.__float__
    syncs = []

    def err_value(sh):
        held = [r for r in alive if r() is not None]
        assert not held, f"{len(held)} decoded buffer(s) still alive while decoding {sh.key}"
        out = real_value(sh)
        alive.append(weakref.ref(out))
        return out

    def to_float(t):
        if t.dtype == torch.float64:  # the norm's reads (fp169's scale check reads a host float32 scalar: no sync)
            syncs.append(t.numel())
        return real_float(t)

    monkeypatch.setattr(powersgd._Shard, "err_value", err_value)
    monkeypatch.setattr(torch.Tensor, "__float__", to_float)
    monkeypatch.setattr(red, "error_buffers", lambda: pytest.fail("stats() decoded every buffer at once"))
    stats = _extension(red).stats()
    assert stats["powersgd/error_norm"] == before  # bit for bit
    assert len(alive) == len(SHAPES) and len(syncs) == 1, syncs  # every buffer decoded once; one host sync
