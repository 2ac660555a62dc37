"""The hierarchical PowerSGD reducer on 4 real gloo processes emulating 2 machines x 2 GPUs (local size 2).

Every rank regenerates every rank's gradients from the seed, so it can compute the exact average locally. Checked:
a rank large enough to be lossless gives the plain average (to 1-6-9 rounding) identically on every rank; the
error-feedback invariant (sum over machines of the new error buffers + what was reduced = old buffers + what went in),
also when the buffers are re-centered over machines; the rounding diagnostics;
an injected Inf skips the step and follows the buffer rules; an overflowing buffer is zeroed; checkpoints of the
buffers (the paper's sum over machines, and exact per-rank codes) restore them; the compression accounting.
"""
import math

import pytest
import torch
import torch.distributed as dist

from dalle_ds.ops import fp169
from dalle_ds.dist.local_ranks import run_local_ranks

pytestmark = pytest.mark.distributed

SHAPES = {"a.weight": (8, 6), "b.weight": (6, 12), "c.weight": (10, 4), "odd.weight": (5, 3), "a.bias": (8,)}
ROUNDING = 2.0 ** -9  # 1-6-9 relative spacing


def _grads(seed: int, rank: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return {k: torch.randn(*s, generator=g) * scale for k, s in SHAPES.items()}


def _reducer(rank_total: int, **kw):
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings
    from dalle_ds.dist.topology import Topology
    topo = Topology.build(local_size=2)
    red = HierarchicalPowerSGD(topo, PowerSGDSettings(rank=rank_total, seed=3, **kw))
    for k, s in SHAPES.items():
        red.register(k, s)
    return red


def _mean(seed, world, **kw):
    per = [_grads(seed, r, **kw) for r in range(world)]
    return {k: sum(p[k] for p in per) / world for k in SHAPES}


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return all(torch.equal(o, out[0]) for o in out)


def _lossless(rank, world):
    red = _reducer(rank_total=64)  # per-GPU rank 32 >= every shard dimension
    assert set(red.shards) == {"a.weight", "b.weight", "c.weight"}  # 1-D and odd rows stay fp32
    assert red.shards["b.weight"].transposed and not red.shards["a.weight"].transposed
    for step, seed in enumerate((1, 2)):
        grads = _grads(seed, rank)
        rep = red.reduce_(list(grads.items()), step=step)
        want = _mean(seed, world)
        assert rep.compressed and not rep.skip
        for k in SHAPES:
            err = (grads[k] - want[k]).abs().max() / want[k].abs().max()
            tol = 1e-6 if k in ("odd.weight", "a.bias") else 8 * ROUNDING
            assert err < tol, (k, float(err))
            assert _same_on_all_ranks(grads[k]), k
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        assert abs(math.sqrt(rep.sq_norm) - norm) < 1e-2 * norm



def _global_sum(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _invariant(rank, world, rounding=ROUNDING, **kw):
    red = _reducer(rank_total=2, **kw)  # per-GPU rank 1: lossy, leaves error behind
    topo = red.topo
    for step, seed in enumerate((4, 5, 6)):
        old = {k: _global_sum(e, topo.global_group) for k, e in red.error_buffers().items()}
        grads = _grads(seed, rank)
        want = _mean(seed, world)  # the global average = sum over machines of the shards that went in
        rep = red.reduce_(list(grads.items()), step=step)
        assert not rep.skip and rep.factor_elements < rep.shard_elements
        new = {k: _global_sum(e, topo.global_group) for k, e in red.error_buffers().items()}
        for k, sh in red.shards.items():
            rows = slice(topo.local_rank * sh.shard_rows, (topo.local_rank + 1) * sh.shard_rows)
            mat = (lambda t: t.t() if sh.transposed else t)
            went_in, reduced = mat(want[k])[rows], mat(grads[k])[rows]
            lhs, rhs = new[k] + reduced, old[k] + went_in
            scale = float(max(old[k].abs().max(), went_in.abs().max(), reduced.abs().max()))
            assert float((lhs - rhs).abs().max()) < 16 * rounding * scale, (k, step)
            assert float(new[k].abs().max()) > 0  # rank 1 is lossy: something is left behind
    return red



def _nonfinite(rank, world):
    red = _reducer(rank_total=2)
    topo = red.topo
    red.reduce_(list(_grads(7, rank).items()), step=0)  # some error in the buffers
    before = red.error_buffers()
    grads = _grads(8, rank)
    if rank == 1:  # machine 0, local rank 1: an Inf in the second row block of a.weight
        grads["a.weight"][6, 2] = math.inf
    rep = red.reduce_(list(grads.items()), step=1)
    assert rep.skip and math.isinf(rep.sq_norm)
    # the optimizer's own overflow check must see it (the engine-level skip is in test_powersgd_deepspeed.py)
    assert not all(bool(torch.isfinite(g).all()) for g in grads.values())
    # Buffer rules: rank 1's a.weight shard was nonfinite -> nothing added to it; every other shard added its
    # gradient; P and Q' were finite, so every buffer had the same reconstruction / machines subtracted. Hence, per
    # ordinal: new(machine 1) - new(machine 0) = old(1) - old(0) + in(1) - in(0), with in = 0 for the bad shard.
    after = red.error_buffers()
    assert all(bool(torch.isfinite(e).all()) for e in after.values())
    per = [_grads(8, r) for r in range(world)]
    for k, sh in red.shards.items():
        rows = slice(topo.local_rank * sh.shard_rows, (topo.local_rank + 1) * sh.shard_rows)
        mat = (lambda t: t.t() if sh.transposed else t)
        went_in = []
        for machine in range(topo.machines):
            bad = k == "a.weight" and machine == 0 and topo.local_rank == 1
            s = sum(mat(per[machine * 2 + j][k])[rows] for j in range(2)) / world
            went_in.append(torch.zeros_like(s) if bad else s)
        old, new = _by_machine(before[k], topo), _by_machine(after[k], topo)
        lhs = new[1] - new[0]
        rhs = old[1] - old[0] + went_in[1] - went_in[0]
        scale = float(max(t.abs().max() for t in (*old, *new, *went_in)))
        assert float((lhs - rhs).abs().max()) < 16 * ROUNDING * scale, (k, topo.rank)


def _fp32_buffers_and_diagnostics(rank, world):
    """error_dtype="fp32" (the ablation): the invariant holds to fp32 rounding, which 1-6-9 buffers cannot; the
    diagnostics equal the delayed / machine-specific split computed here from the buffers themselves."""
    red = _invariant(rank, world, rounding=2.0 ** -20, error_dtype="fp32")
    assert all(sh.err.dtype == torch.float32 for sh in red.shards.values())
    topo, diag = red.topo, red.diagnostics()
    delayed = spread = 0.0
    for e in red.error_buffers().values():
        mine = [x.double() for x in _by_machine(e, topo)]
        total = sum(mine)
        delayed += float(total.pow(2).sum())
        spread += sum(float((x - total / topo.machines).pow(2).sum()) for x in mine)
    both = torch.tensor([delayed, spread], dtype=torch.float64)
    dist.all_reduce(both)  # every ordinal once per machine: divide by the machine count
    delayed, spread = (math.sqrt(float(v) / topo.machines) for v in both)
    assert abs(diag["delayed_norm"] - delayed) <= 1e-6 * delayed and abs(diag["spread_norm"] - spread) <= 1e-6 * spread
    assert 0.0 < diag["sent_fraction"] < 1.0  # per-GPU rank 1 sends part of the delayed gradient
    lossless = _reducer(rank_total=64, error_dtype="fp32")
    lossless.reduce_(list(_grads(14, rank).items()), step=0)
    assert lossless.diagnostics()["sent_fraction"] > 1 - 1e-4  # everything sent, up to P and Q' rounding
    with pytest.raises(ValueError, match="saved as torch.int16"):
        red.load_state_dict(_reducer(rank_total=2).state_dict("per_rank"))


def _recentering(rank, world):
    """recenter_every: the error-feedback invariant still holds with a re-centering at every step, after which every
    machine holds the same buffer (no machine-specific part); the buffers' 16-bit all-reduce is counted in the bytes;
    recenter_every=2 re-centers at steps 1, 3, ..."""
    from dalle_ds.dist.fp169_allreduce import allreduce_bytes
    red = _invariant(rank, world, recenter_every=1)
    topo = red.topo
    for k, e in red.error_buffers().items():
        on_machines = _by_machine(e, topo)
        assert all(torch.equal(x, on_machines[0]) for x in on_machines), k
    assert red.diagnostics()["spread_norm"] == 0.0
    numel = sum(sh.err.numel() for sh in red.shards.values())
    plain, every2 = _reducer(rank_total=2), _reducer(rank_total=2, recenter_every=2)
    for step in (0, 1):
        grads = _grads(20 + step, rank)
        a = plain.reduce_([(k, g.clone()) for k, g in grads.items()], step=step)
        b = every2.reduce_([(k, g.clone()) for k, g in grads.items()], step=step)
        assert b.recentered_elements == (numel if step == 1 else 0)
        assert b.bytes_inter - a.bytes_inter == (allreduce_bytes(numel, topo.machines) if step == 1 else 0)
    d_plain, d_every2 = plain.diagnostics(), every2.diagnostics()
    assert d_every2["spread_norm"] == 0.0 < d_plain["spread_norm"]
    # same gradients, same Q: what step 1's re-centering removed is what the plain reducer still holds
    assert abs(d_every2["spread_recentered"] - d_plain["spread_norm"]) < 1e-2 * d_plain["spread_norm"]
    assert "spread_recentered" not in d_plain
    again = every2.reduce_(list(_grads(22, rank).items()), step=1)  # another micro-batch of step 1 (ZeRO-2)
    assert again.recentered_elements == 0  # once per step
    # ZeRO-1/2 hand the reducer one bucket at a time: the removed spread of a step sums over its buckets
    split, whole = _reducer(rank_total=2, recenter_every=1), _reducer(rank_total=2, recenter_every=1)
    grads = _grads(23, rank)
    whole.reduce_([(k, g.clone()) for k, g in grads.items()], step=0)
    split.reduce_([(k, grads[k].clone()) for k in ("a.weight", "a.bias")], step=0)
    split.reduce_([(k, grads[k].clone()) for k in ("b.weight", "c.weight", "odd.weight")], step=0)
    assert split.diagnostics()["spread_recentered"] == pytest.approx(whole.diagnostics()["spread_recentered"])


def _rounding_diagnostics(rank, world):
    """track_rounding: gradients far below half the 1-6-9 spacing of the buffer's values are all swamped (lost);
    added to empty buffers none is; fp32 buffers round ~2^-24."""
    swamp = _reducer(rank_total=2, track_rounding=True)
    for sh in swamp.shards.values():
        sh.err.copy_(fp169.encode(torch.ones(sh.shard_rows, sh.cols)))  # spacing 2^-9 around 1
    swamp.reduce_(list(_grads(15, rank, scale=1e-6).items()), step=0)
    d = swamp.diagnostics()
    assert d["swamped_fraction"] == 1.0 and d["rounding_ratio"] >= 1.0
    assert "swamped_fraction" not in swamp.diagnostics()  # counts restart at every diagnostics() call
    fresh = _reducer(rank_total=2, track_rounding=True)
    fresh.reduce_(list(_grads(15, rank).items()), step=0)
    d = fresh.diagnostics()
    assert d["swamped_fraction"] == 0.0 and 0.0 < d["rounding_ratio"] < 4 * ROUNDING
    exact = _reducer(rank_total=2, track_rounding=True, error_dtype="fp32")
    for step in (0, 1):
        exact.reduce_(list(_grads(16 + step, rank).items()), step=step)
    d = exact.diagnostics()
    assert d["swamped_fraction"] == 0.0 and d["rounding_ratio"] < 2.0 ** -20


def _by_machine(t: torch.Tensor, topo) -> list[torch.Tensor]:
    """This ordinal's tensor on every machine (an all-gather over the ordinal's group)."""
    out = [torch.empty_like(t) for _ in range(topo.machines)]
    dist.all_gather(out, t.contiguous(), group=topo.global_group)
    return out


def _overflowing_buffer(rank, world):
    red = _reducer(rank_total=2)
    grads = _grads(9, rank)
    grads["c.weight"] *= 1e8  # finite, but the shard average ~1e5 overflows the 1-6-9 buffer (max ~16)
    rep = red.reduce_(list(grads.items()), step=0)
    assert rep.skip and rep.zeroed_buffers == 1  # this rank's c.weight buffer became Inf: zeroed
    bufs = red.error_buffers()
    assert float(bufs["c.weight"].abs().max()) == 0.0
    assert float(bufs["a.weight"].abs().max()) > 0  # untouched parameters keep their error



def _checkpoint(rank, world):
    red = _reducer(rank_total=2)
    for step, seed in enumerate((10, 11)):
        red.reduce_(list(_grads(seed, rank).items()), step=step)
    bufs = red.error_buffers()
    exact = red.state_dict("per_rank")
    summed = red.state_dict("sum")
    assert (summed["err_sum"] is None) == (red.topo.machine != 0)
    fresh = _reducer(rank_total=2)
    fresh.load_state_dict(exact)
    assert all(torch.equal(fresh.shards[k].err, red.shards[k].err) for k in red.shards)
    fresh = _reducer(rank_total=2)
    fresh.load_state_dict(summed)
    loaded = fresh.error_buffers()
    for k in bufs:  # each machine now holds the mean; the sum over machines is what error feedback needs
        want = _global_sum(bufs[k], red.topo.global_group)
        got = _global_sum(loaded[k], red.topo.global_group)
        assert float((got - want).abs().max()) <= 4 * ROUNDING * float(want.abs().max())
        other = loaded[k].clone()
        dist.broadcast(other, src=red.topo.global_rank_of(1), group=red.topo.global_group)
        assert torch.equal(other, loaded[k])  # same on both machines
    bad = dict(summed, machines=4, local_size=1)
    with pytest.raises(ValueError, match="same topology"):
        fresh.load_state_dict(bad)



def _warm_start(rank, world):
    """Not the paper's fixed Q: Q follows Q' (unit columns) and is checkpointed; error feedback is unchanged."""
    red = _reducer(rank_total=2, warm_start=True)
    q0 = {k: sh.q.clone() for k, sh in red.shards.items()}
    for step, seed in enumerate((12, 13)):
        red.reduce_(list(_grads(seed, rank).items()), step=step)
    for k, sh in red.shards.items():
        q = fp169.decode(sh.q)
        assert not torch.equal(sh.q, q0[k])
        assert torch.allclose(torch.linalg.vector_norm(q, dim=0), torch.ones(sh.k), atol=4 * ROUNDING)
        on_machines = _by_machine(q, red.topo)  # one Q per ordinal: the same on every machine
        assert all(torch.equal(x, on_machines[0]) for x in on_machines)
    for mode in ("sum", "per_rank"):
        fresh = _reducer(rank_total=2, warm_start=True)
        fresh.load_state_dict(red.state_dict(mode))
        assert all(torch.equal(fresh.shards[k].q, red.shards[k].q) for k in red.shards), mode
    with pytest.raises(ValueError, match="warm_start"):
        _reducer(rank_total=2).load_state_dict(red.state_dict("per_rank"))


def _accounting(rank, world, d, r):
    from dalle_ds.config import DALLE_PRESETS
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings
    from dalle_ds.dist.topology import Topology
    from dalle_ds.models.dalle import DALLE
    import dataclasses
    torch.manual_seed(0)
    model = DALLE(dataclasses.replace(DALLE_PRESETS["tiny"], d_model=d, n_layers=2, n_heads=2))
    topo = Topology.build(local_size=2)
    red = HierarchicalPowerSGD(topo, PowerSGDSettings(rank=r))
    grads = []
    for name, p in model.named_parameters():
        if name.startswith("layers.") and ".fn." in name and name.endswith(".weight"):
            assert red.register(name, p.shape)
        grads.append((name, torch.randn_like(p) * 1e-3))
    rep = red.reduce_(grads, step=0)
    m = topo.local_size
    # qkv [3d, d], attention out [d, d], fc [4d, d], mlp out [d, 4d] (sharded along 4d): per GPU rank r/m gives
    # P + Q' = (12 d / m + 4 d) r / m elements against 12 d^2 / m in the shards: ratio r (m + 3) / (3 d m).
    formula = 1 - r * (m + 3) / (3 * d * m)
    measured = 1 - rep.factor_elements / rep.shard_elements
    assert abs(measured - formula) < 0.01 * formula, (measured, formula)


# ZeRO-3 partitions: untransposed and transposed matrices whose partitions start mid-row, partitions that are short
# or empty (numel 2 over 4 ranks), and a vector.
Z3_SHAPES = {"a.weight": (8, 6), "b.weight": (6, 12), "t.weight": (6, 16), "n.weight": (16, 5),
             "tiny.weight": (1, 2), "a.bias": (8,)}


def _zero3_partitions(rank, world):
    """reduce_partitions_ returns exactly the ZeRO-3 slices of what reduce_ writes back for the compressed matrices,
    step after step (the error buffers evolve the same), with fewer bytes inside the machine; the uncompressed rest
    (and an uncompressed warm-up step) is reduce-scattered, half the all-reduce's bytes, equal up to the order of the
    sum; a skipped step puts an Inf in the first non-empty partition."""
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings, _partition_range
    from dalle_ds.dist.topology import Topology
    topo = Topology.build(local_size=2)
    reds = [HierarchicalPowerSGD(topo, PowerSGDSettings(rank=4, seed=3)) for _ in range(2)]
    for red in reds:
        assert [red.register(k, s) for k, s in Z3_SHAPES.items()] == [True] * 5 + [False]
    assert reds[0].shards["t.weight"].transposed and not reds[0].shards["n.weight"].transposed
    for step in range(3):
        g = torch.Generator().manual_seed(50 + 10 * step + rank)
        grads = {k: torch.randn(*s, generator=g) * 1e-3 for k, s in Z3_SHAPES.items()}
        if step == 2 and rank == 1:
            grads["n.weight"][3, 1] = math.inf
        full = {k: v.clone() for k, v in grads.items()}
        rep_full = reds[0].reduce_(list(full.items()), step=step)
        rep, parts = reds[1].reduce_partitions_([(k, v.clone()) for k, v in grads.items()], step=step)
        assert rep.skip == rep_full.skip == (step == 2)
        assert rep.bytes_intra < rep_full.bytes_intra and rep.bytes_inter == rep_full.bytes_inter
        assert rep.bytes_uncompressed == rep_full.bytes_uncompressed // 2  # a reduce-scatter, not an all-reduce
        assert rep.sq_norm == pytest.approx(rep_full.sq_norm, rel=1e-12), (rep.sq_norm, rep_full.sq_norm)
        for (k, v), part in zip(full.items(), parts):
            start, end = _partition_range(v.numel(), rank, world)
            want = v.reshape(-1)[start:end]
            assert part.dtype == torch.float32 and part.shape == want.shape, (k, part.shape, want.shape)
            if rep.skip:
                continue
            if k in reds[0].shards:
                assert torch.equal(part, want), (k, step)
            else:  # reduce-scattered instead of all-reduced: the sum over ranks may round in another order
                torch.testing.assert_close(part, want, rtol=1e-6, atol=1e-12)
        if rep.skip:
            first = next(p for p in parts if p.numel())
            assert math.isinf(first[0]) and all(torch.isfinite(p).all() for p in parts if p is not first)
        for k in reds[0].shards:  # the same error buffers either way
            assert torch.equal(reds[0].shards[k].err, reds[1].shards[k].err), (k, step)
    assert _partition_range(2, 3, 4) == (2, 2) and _partition_range(96, 1, 4) == (24, 48)
    warm = [HierarchicalPowerSGD(topo, PowerSGDSettings(rank=4, seed=3, start_step=5)) for _ in range(2)]
    g = torch.Generator().manual_seed(90 + rank)  # an uncompressed warm-up step: reduce-scattered all of it
    grads = {k: torch.randn(*s, generator=g) for k, s in Z3_SHAPES.items()}
    full = {k: v.clone() for k, v in grads.items()}
    warm[0].reduce_(list(full.items()), step=0)
    _, parts = warm[1].reduce_partitions_([(k, v.clone()) for k, v in grads.items()], step=0)
    for (k, v), part in zip(full.items(), parts):
        start, end = _partition_range(v.numel(), rank, world)
        torch.testing.assert_close(part, v.reshape(-1)[start:end], rtol=1e-5, atol=1e-6)


def _16bit_wire(rank, world):
    """bf16 / fp16 gradients travel inside the machine in their own dtype: the result is bit for bit the fp32-wire
    result rounded to that dtype, the error buffers evolve identically, and the intra-machine bytes halve."""
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings
    from dalle_ds.dist.topology import Topology
    topo = Topology.build(local_size=2)
    for dtype in (torch.bfloat16, torch.float16):
        reds = [HierarchicalPowerSGD(topo, PowerSGDSettings(rank=4, seed=3)) for _ in range(2)]
        for red in reds:
            for k, s in SHAPES.items():
                red.register(k, s)
        for step in range(3):
            g = torch.Generator().manual_seed(70 + 10 * step + rank)
            low = [(k, (torch.randn(*s, generator=g) * 1e-3).to(dtype)) for k, s in SHAPES.items()]
            wide = [(k, t.float()) for k, t in low]
            rep16 = reds[0].reduce_(low, step=step)
            rep32 = reds[1].reduce_(wide, step=step)
            for (k, a), (_, b) in zip(low, wide):
                assert torch.equal(a, b.to(dtype)), (dtype, k, step)
            for k in reds[0].shards:
                assert torch.equal(reds[0].shards[k].err, reds[1].shards[k].err), (dtype, k, step)
            assert rep16.bytes_intra * 2 == rep32.bytes_intra and rep16.bytes_inter == rep32.bytes_inter


def _all_checks(rank, world):
    # One set of 4 processes for every check (each spawn costs ~15 s of start-up on 2 cores); a failure's traceback
    # names the check.
    _lossless(rank, world)
    _invariant(rank, world)
    _fp32_buffers_and_diagnostics(rank, world)
    _recentering(rank, world)
    _rounding_diagnostics(rank, world)
    _nonfinite(rank, world)
    _overflowing_buffer(rank, world)
    _checkpoint(rank, world)
    _warm_start(rank, world)
    _zero3_partitions(rank, world)
    _16bit_wire(rank, world)
    for d, r in ((64, 16), (128, 32)):
        _accounting(rank, world, d, r)


def test_reducer_on_2_machines_x_2_gpus():
    """lossless rank = plain average; error-feedback invariant (1-6-9 and fp32 buffers, with re-centering);
    diagnostics (split, rounding); Inf -> skip +
    buffer rules; overflowing buffer
    zeroed; checkpoint round trips; compression rate = r (m + 3) / (3 d m) accounting within 1%."""
    run_local_ranks(_all_checks, 4)
