"""The PowerSGD reducer on CUDA tensors (one process, NCCL, world of one: NCCL takes one rank per GPU, so the
machine-to-machine collectives have no peer here; the multi-rank logic is tested on gloo in tests/test_powersgd.py).
Every device op of a reduction runs on the GPU: the 1-6-9 CUDA op, the QR, the flags, the device-side Inf. Checked:
a lossless rank keeps the gradients (world average of one = itself) to 1-6-9 precision; a low rank gives what the
same reducer gives on CPU tensors, up to rounding; ZeRO-3 partitions equal the slices of the full result bit for
bit; the hook path (``resolve=False``) reads nothing back and still marks a nonfinite step with an Inf."""
import math

import pytest
import torch

from dalle_ds.dist.local_ranks import run_local_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = {"a.weight": (64, 48), "b.weight": (48, 96), "c.weight": (40, 32), "a.bias": (64,)}


def _reducer(device, rank_total, **kw):
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings
    from dalle_ds.dist.topology import Topology
    red = HierarchicalPowerSGD(Topology.build(local_size=1), PowerSGDSettings(rank=rank_total, seed=7, **kw),
                               device=device)
    for k, s in SHAPES.items():
        red.register(k, s)
    return red


def _grads(step, device):
    g = torch.Generator().manual_seed(step)
    return [(k, (torch.randn(*s, generator=g) * 1e-3).to(device)) for k, s in SHAPES.items()]


def _on_gpu(rank, world):
    out = {}
    lossless = _reducer("cuda", rank_total=128)
    for step in range(2):
        grads = _grads(step, "cuda")
        want = [g.clone() for _, g in grads]
        rep = lossless.reduce_(grads, step=step)
        assert not rep.skip
        out[f"lossless{step}"] = max(float((g - w).abs().max() / w.abs().max()) for (_, g), w in zip(grads, want))
    cpu, gpu, part = (_reducer(d, rank_total=4) for d in ("cpu", "cuda", "cuda"))
    for step in range(3):
        a, b = _grads(step, "cpu"), _grads(step, "cuda")
        cpu.reduce_(a, step=step)
        gpu.reduce_(b, step=step)
        out[f"cpu_gpu{step}"] = max(float((x.cuda() - y).norm() / x.norm()) for (_, x), (_, y) in zip(a, b))
        c = _grads(step, "cuda")
        _, parts = part.reduce_partitions_(c, step=step)
        assert all(torch.equal(p, g.reshape(-1).float()) for p, (_, g) in zip(parts, b)), step  # one rank: all
    reads = []
    real = torch.Tensor.tolist
    torch.Tensor.tolist = lambda t, *a, **k: (reads.append(1), real(t, *a, **k))[1]
    try:
        grads = _grads(9, "cuda")
        grads[1][1][0, 0] = math.inf
        rep = gpu.reduce_(grads, step=3, resolve=False)
        first = grads[0][1].view(-1)[0]
        n_reads = len(reads)
    finally:
        torch.Tensor.tolist = real
    out["hook_reads"] = n_reads
    out["inf_written"] = math.isinf(float(first))
    out["resolved_skip"] = rep.resolve().skip
    return out


def test_reducer_on_cuda():
    got = run_local_ranks(_on_gpu, 1, backend="nccl", timeout=300)
    assert got["lossless0"] < 8 * 2.0 ** -9 and got["lossless1"] < 8 * 2.0 ** -9, got
    assert all(got[f"cpu_gpu{s}"] < 2e-2 for s in range(3)), got  # QR and matmul rounding differ by device
    assert got["hook_reads"] == 0 and got["inf_written"] and got["resolved_skip"], got
