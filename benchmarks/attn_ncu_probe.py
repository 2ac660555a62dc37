"""One forward+backward of the Triton block-sparse attention inside a CUDA profiler range, for Nsight Compute.

    ncu --clock-control none --profile-from-start off -k regex:_attn --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python3 benchmarks/attn_ncu_probe.py --kind row

The tiles are pinned (no tuning: the tuner's many timing launches would be profiled too) to the ones the tuner chose
on the H200 at the paper's shape (2026-12-04: forward 64x64, dK/dV 32x64, dQ 64x64, 4 warps, 3 stages; the fused
dK/dV/dQ kernel, not yet timed, 64x64), or to ``--fwd/--dkdv/--dq/--dkdv_dq BMxBN:WARPS:STAGES``. ``--backward``
picks the backward path profiled: split, fused, or both (default: one forward+backward with each). A warm-up call
compiles the kernels outside the range; in it each forward+backward launches each kernel once (forward, the
backward's delta pre-pass, then dK/dV and dQ, or the fused dK/dV/dQ). Without CUDA (tests) it runs the same code
under the Triton interpreter on a tiny shape and skips the profiler range.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle_ds.ops.attention import MaskSpec, attention  # noqa: E402
from dalle_ds.ops.attention import triton_backend as tb  # noqa: E402

H200_TUNED = {"fwd": "64x64:4:3", "dkdv": "32x64:4:3", "dq": "64x64:4:3", "dkdv_dq": "64x64:4:3"}


def parse_config(text: str) -> tb.Config:
    """'BMxBN:WARPS:STAGES' -> Config."""
    try:
        tiles, warps, stages = text.split(":")
        bm, bn = tiles.split("x")
        return tb.Config(int(bm), int(bn), int(warps), int(stages))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BMxBN:WARPS:STAGES (e.g. 64x64:4:3), got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="row", choices=["row", "column", "conv", "causal"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    for name, default in H200_TUNED.items():
        ap.add_argument(f"--{name}", type=parse_config, default=parse_config(default))
    ap.add_argument("--backward", default="both", choices=[*tb.BACKWARD_PATHS, "both"])
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    paths = tb.BACKWARD_PATHS if args.backward == "both" else (args.backward,)
    cuda = torch.cuda.is_available()
    if cuda:
        spec, shape, dtype, device = MaskSpec(args.kind, 256, 32), (args.batch, args.heads), torch.bfloat16, "cuda"
        cfgs = {name: getattr(args, name) for name in H200_TUNED}
    else:  # the interpreter: tiny shape, tiles that fit it
        spec, shape, dtype, device = MaskSpec(args.kind, 3, 4), (1, 2), torch.float32, "cpu"
        cfgs = {name: tb.Config(16, 16, 4, 1) for name in H200_TUNED}
    n = spec.seq_len
    q, k, v = (torch.randn(*shape, n, args.head_dim if cuda else 16, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def step(path):
        with tb.kernel_config(**cfgs, backward=path):
            out = attention(q, k, v, spec, backend="triton")
            out.backward(dout)
        return bool(torch.isfinite(out).all() and torch.isfinite(q.grad).all())

    for path in paths:
        step(path)  # compile outside the profiled range
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    finite = [step(path) for path in paths]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    summary = {"mask": spec.name, "shape": [*shape, n, q.shape[-1]], "dtype": str(dtype), "backward": list(paths),
               "configs": {name: vars(c) for name, c in cfgs.items()}, "finite": all(finite)}
    print(summary)
    return summary


if __name__ == "__main__":
    main()
