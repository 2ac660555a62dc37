"""The 16-bit all-reduce of 1-6-9 codes on gloo: 4 real processes (torch.multiprocessing), reducing over the
4-rank world group and over two 2-rank subgroups (any process group works).

Every rank regenerates every rank's input from the seeds, so it can compute the expected result locally: the
reference decode -> fp32 sum in rank order -> clamp -> encode, which the all-reduce must match bit for bit, and the
exact float64 sum, which it must match to the format's precision. The byte counter is checked against the sizes of
the tensors actually handed to the collectives (recorded by wrapping them) and against the ring formula.
"""
import math

import pytest
import torch
import torch.distributed as dist

from dalle_ds.dist.local_ranks import run_local_ranks

pytestmark = pytest.mark.distributed


def _inputs(seed: int, rank: int, shapes, scale_exp=(-20, 1)):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    out = []
    for shape in shapes:
        n = math.prod(shape)
        v = torch.randn(n, generator=g) * 10.0 ** torch.randint(*scale_exp, (n,), generator=g).float()
        out.append(v.reshape(shape))
    return out


def _rank_main(rank: int, world: int, backend: str, seed: int) -> None:
    _wrap_collectives()
    _checks(None, backend, seed)
    sub, _ = dist.new_subgroups(group_size=2)  # ranks {0, 1} and {2, 3}
    _checks(sub, backend, seed + 7)


HANDED = []  # (collective, bytes of the input it was handed)


def _wrap_collectives() -> None:
    """Record what reaches the collectives, to check the byte counter independently of its formula."""

    def recording(kind, real):
        def wrapper(out, inp, *a, **k):
            HANDED.append((kind, inp.numel() * inp.element_size()))
            return real(out, inp, *a, **k)

        return wrapper

    dist.all_to_all_single = recording("a2a", dist.all_to_all_single)
    for name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, recording("ag", getattr(dist, name)))


def _checks(group, backend: str, seed: int) -> None:
    from dalle_ds.dist import fp169_allreduce as ar
    from dalle_ds.ops import fp169
    from dalle_ds.ops.fp169 import reference as ref

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    handed = HANDED

    def expected(all_vals, average):
        codes = torch.stack([ref.encode(torch.cat([v.reshape(-1) for v in vals])) for vals in all_vals])
        return ref.reduce_rows(codes, divisor=float(world) if average else 1.0, saturate=True), codes

    cases = [
        ("single", [(1001,)], False),
        ("grouped-average", [(3, 5), (7,), (2, 2, 2), (1,)], True),
        ("aligned", [(8 * world * 16,)], False),
    ]
    for name, shapes, average in cases:
        all_vals = [_inputs(seed, r, shapes) for r in range(world)]
        mine = [ref.encode(v) for v in all_vals[rank]]
        counter = ar.CommCounter()
        handed.clear()
        arg = mine[0] if len(mine) == 1 else mine
        ret = ar.all_reduce_fp169_(arg, group, average=average, counter=counter, backend=backend)
        assert ret is arg, name
        want, codes = expected(all_vals, average)
        got = torch.cat([m.reshape(-1) for m in mine])
        assert torch.equal(got, want), f"{name}: {(got != want).sum()} codes differ from the reference"
        # Close to the exact sum (no overflow in these inputs): within the format's rounding.
        exact = ref.decode(codes).double().sum(0) / (world if average else 1)
        approx = ref.decode(got).double()
        tol = exact.abs() * 2.0**-10 + 2.0**-68 * world
        assert bool(((approx - exact).abs() <= tol).all()), name
        # Bytes: what the collectives were handed, minus the chunk each rank keeps.
        n = got.numel()
        chunk = ar.padded_chunk(n, world)
        a2a_bytes = sum(b for k, b in handed if k == "a2a")
        ag_bytes = sum(b for k, b in handed if k == "ag")
        sent = a2a_bytes * (world - 1) // world + ag_bytes * (world - 1)
        assert counter.bytes_sent == sent == 2 * (world - 1) * chunk * 2 == ar.allreduce_bytes(n, world), name
        assert counter.calls == 1 and counter.elements == n and counter.padded_elements == world * chunk
        if n % (8 * world) == 0:
            assert counter.bytes_sent == ar.ring_allreduce_bytes(n, world), name
        assert counter.bytes_sent - ar.ring_allreduce_bytes(n, world) <= 2 * (world - 1) * 8 * 2

    # Clamping: overflowing sums and infinities become +-max with their sign; NaN stays NaN.
    vals = torch.tensor([10.0, -10.0, math.inf, -math.inf, 1.0, 15.984375])
    if rank == 0:
        vals[4] = math.nan
    codes = ref.encode(vals)
    ar.all_reduce_fp169_(codes, group, backend=backend)
    got = [int(c) & 0xFFFF for c in codes]
    assert got[:4] == [0x7DFF, 0xFDFF, 0x7DFF, 0xFDFF], [hex(c) for c in got]
    assert (got[4] >> 9) & 63 == 63 and got[4] & 0x1FF != 0  # NaN
    assert got[5] == 0x7DFF

    # Results are identical on all ranks.
    x = ref.encode(_inputs(seed + 1, rank, [(777,)])[0])
    ar.all_reduce_fp169_(x, group, backend=backend)
    gathered = [torch.empty_like(x).view(torch.uint8) for _ in range(world)]
    dist.all_gather(gathered, x.view(torch.uint8), group=group)  # gloo has no int16: move bytes
    assert all(torch.equal(gathered[0], t) for t in gathered)

    # Empty input and the module-wide counter.
    before = ar.COUNTER.bytes_sent
    ar.all_reduce_fp169_(torch.empty(0, dtype=torch.int16), group, backend=backend)
    assert ar.COUNTER.bytes_sent == before and ar.COUNTER.calls >= 5
    with pytest.raises(TypeError):
        ar.all_reduce_fp169_(torch.zeros(4), backend=backend)
    assert fp169.resolve_backend(torch.device("cpu"), backend) in ("cpp", "reference")


def test_fp169_allreduce_gloo_world_of_4_and_subgroups_of_2():
    from dalle_ds.ops.fp169 import _ext

    backend = "auto" if _ext.load()["cpu"] else "reference"  # build once here, not in every rank
    seed = int(torch.randint(0, 10_000, ()).item())  # fresh inputs each run
    print("seed", seed)
    run_local_ranks(_rank_main, 4, backend, seed)
