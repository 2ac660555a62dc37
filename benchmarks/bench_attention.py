"""Benchmark the block-sparse row / column / conv attention against dense and FlexAttention baselines.

For each case (default: the paper's shape T = 256, W = 32 -> 1280 tokens, d = 64, bf16; and W = 64 -> 4352 tokens)
it times forward, backward and forward+backward of

* ``triton``: dalle_ds's block-sparse kernels (``attention(..., backend="triton")``);
* ``flex``: compiled FlexAttention with the same mask (column attention transposed, the gathers included);
* ``sdpa_causal``: ``F.scaled_dot_product_attention(is_causal=True)`` (FlashAttention; does the full causal work);
* ``sdpa_mask``: SDPA with the dense boolean mask;

for each mask and for the paper's layer mix (the schedule of ``layer_schedule(64)``: 47 row, 16 column, 1 conv
layers; mix time = per-layer average). All providers run in one process, on the same inputs.

FLOPs are counted on the elements the mask keeps (FlashAttention's convention restricted to the mask):
forward = 4 * D * kept * B * H, backward = 2.5 x forward, forward+backward = 3.5 x forward. TFLOP/s use those
counts for every provider, so they are comparable "useful work" rates. The floor is the kept FLOPs divided by the
bf16 matmul rate measured in the same run; "% floor" = floor time / measured time.

Prints a markdown table last; ``--out PREFIX`` writes PREFIX.json and PREFIX.md (the JSON has the device,
versions, command, shapes, times, TFLOP/s, floors and speedups). ``--quick`` runs tiny shapes in fp32 on CPU so
the harness itself is tested (the triton provider then needs ``TRITON_INTERPRET=1``).

    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100_$(date +%Y%m%d)
    python benchmarks/bench_attention.py --quick --out /tmp/attn_quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle_ds.ops.attention import MaskSpec, attention, dense_mask, kept_elements, layer_schedule  # noqa: E402
from dalle_ds.ops.attention import triton_backend  # noqa: E402
from dalle_ds.ops.attention.flex import flex_sparse_attention  # noqa: E402

MASKS = ("row", "column", "conv")
PROVIDERS = ("triton", "flex", "sdpa_causal", "sdpa_mask")
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


# ------------------------------------------------------------------------------------------------------------------
# FLOP counting
# ------------------------------------------------------------------------------------------------------------------
def attention_flops(kept: int, batch: int, heads: int, head_dim: int, mode: str) -> float:
    """FLOPs of masked attention counted on kept (query, key) pairs: two matmuls of 2 FLOPs per multiply-add
    (QK^T and PV) in the forward, 2.5x that in the backward (5 matmuls, 2 of them recomputation-free)."""
    return 4.0 * head_dim * kept * batch * heads * MODE_FACTOR[mode]


def mix_counts(num_layers: int) -> dict[str, int]:
    sched = layer_schedule(num_layers)
    return {kind: sched.count(kind) for kind in MASKS}


# ------------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------------
def bench_ms(fn, device: str, grad_to_none=None, reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` (triton.testing.do_bench on GPU; a plain loop on CPU)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_tflops(device: str, dtype: torch.dtype, quick: bool) -> float:
    n = 256 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b, device)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------------------------
def make_provider(name: str, spec: MaskSpec, device: str):
    """A callable (q, k, v) -> out for ``name``, or raise with the reason it cannot run."""
    if name == "triton":
        return lambda q, k, v: attention(q, k, v, spec, backend="triton")
    if name == "flex":
        compile_ = device == "cuda"
        return lambda q, k, v: flex_sparse_attention(q, k, v, spec, compile=compile_)
    if name == "sdpa_causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "sdpa_mask":
        mask = dense_mask(spec, device)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name == "dense":
        return lambda q, k, v: attention(q, k, v, spec, backend="dense")
    raise ValueError(name)


def time_provider(fn, q, k, v, device: str, reps: int) -> dict:
    """fwd / bwd / fwd_bwd milliseconds; 'bwd_error' when the provider has no backward here."""
    res = {}
    with torch.no_grad():
        res["fwd_ms"] = bench_ms(lambda: fn(q, k, v), device, reps=reps)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    try:
        out = fn(*leaves)
        dout = torch.randn_like(out)
        res["bwd_ms"] = bench_ms(lambda: out.backward(dout, retain_graph=True), device, grad_to_none=leaves,
                                 reps=reps)

        def fwd_bwd():
            fn(*leaves).backward(dout)

        res["fwd_bwd_ms"] = bench_ms(fwd_bwd, device, grad_to_none=leaves, reps=reps)
    except Exception as e:  # e.g. FlexAttention has no CPU backward
        res["bwd_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


def measure(prov: str, spec: MaskSpec, q, k, v, device: str, reps: int) -> dict:
    """Check one provider's forward against fp32 masked SDPA, then time it; errors are recorded, not raised."""
    try:
        fn = make_provider(prov, spec, device)
        with torch.no_grad():
            out = fn(q, k, v).float()
        err = None
        if prov != "sdpa_causal":
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense_mask(spec, device))
            err = (out - ref).abs().max().item()
        res = time_provider(fn, q, k, v, device, reps)
        res["max_abs_err_vs_fp32_masked"] = err
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
    return res


def run_case(name: str, T: int, W: int, B: int, H: int, D: int, dtype, device: str, providers, reps: int,
             layers: int, matmul_rate: float, extra_masks=()) -> dict:
    """Time every provider on every mask of one shape; derive TFLOP/s, floors, the layer mix and speedups."""
    N = T + W * W
    case = {"name": name, "T": T, "W": W, "N": N, "B": B, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""),
            "masks": {}}
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    sdpa_causal_cache = None
    for kind in (*MASKS, *extra_masks):  # extra kinds (e.g. causal) are timed but not part of the layer mix
        spec = MaskSpec(kind, T, W)
        kept = kept_elements(spec)
        flops = {m: attention_flops(kept, B, H, D, m) for m in MODES}
        entry = {
            "mask": spec.name, "kept_elements": kept,
            "kept_of_causal": kept / (N * (N + 1) / 2),
            "flops": flops,
            "floor_ms": {m: flops[m] / (matmul_rate * 1e12) * 1e3 for m in MODES},
            "providers": {},
        }
        for prov in providers:
            if prov == "sdpa_causal" and sdpa_causal_cache is not None:  # mask-independent: time it once
                res = {key: val for key, val in sdpa_causal_cache.items() if key not in ("tflops", "pct_floor")}
            else:
                res = measure(prov, spec, q, k, v, device, reps)
            for m in MODES:
                if f"{m}_ms" in res:
                    res.setdefault("tflops", {})[m] = flops[m] / (res[f"{m}_ms"] * 1e-3) / 1e12
                    res.setdefault("pct_floor", {})[m] = 100.0 * entry["floor_ms"][m] / res[f"{m}_ms"]
            entry["providers"][prov] = res
            if prov == "sdpa_causal" and "error" not in res:
                sdpa_causal_cache = res
        case["masks"][kind] = entry
        if device == "cuda":
            torch.cuda.empty_cache()

    # -- the paper's layer mix: per-layer average over the schedule
    counts = mix_counts(layers)
    mix = {"layers": layers, "counts": counts, "providers": {}}
    mix_flops = {m: sum(counts[kd] * case["masks"][kd]["flops"][m] for kd in MASKS) / layers for m in MODES}
    mix["flops"] = mix_flops
    mix["floor_ms"] = {m: mix_flops[m] / (matmul_rate * 1e12) * 1e3 for m in MODES}
    for prov in providers:
        res = {}
        for m in MODES:
            per = [case["masks"][kd]["providers"].get(prov, {}).get(f"{m}_ms") for kd in MASKS]
            if all(x is not None for x in per):
                ms = sum(counts[kd] * t for kd, t in zip(MASKS, per)) / layers
                res[f"{m}_ms"] = ms
                res.setdefault("tflops", {})[m] = mix_flops[m] / (ms * 1e-3) / 1e12
                res.setdefault("pct_floor", {})[m] = 100.0 * mix["floor_ms"][m] / ms
        mix["providers"][prov] = res
    case["mix"] = mix

    # -- speedups of triton over each baseline, per mask and for the mix
    for entry in list(case["masks"].values()) + [mix]:
        tri = entry["providers"].get("triton", {})
        sp = {}
        for prov in providers:
            if prov == "triton":
                continue
            other = entry["providers"].get(prov, {})
            sp[prov] = {m: other[f"{m}_ms"] / tri[f"{m}_ms"] for m in MODES
                        if f"{m}_ms" in other and f"{m}_ms" in tri}
        entry["triton_speedup"] = sp
    return case


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------
def fmt(x, spec=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(report: dict) -> str:
    lines = [
        f"# bench_attention: {report['device']} ({report['date']})",
        "",
        f"`{report['command']}`  ",
        f"torch {report['versions']['torch']}, triton {report['versions']['triton']}; "
        f"matmul {report['matmul_dtype']} {fmt(report['matmul_tflops'], '.4g')} TFLOP/s (floor reference)",
        "",
        "TFLOP/s and % floor count only the FLOPs on elements the mask keeps (fwd+bwd = 3.5 x fwd). "
        "Speedup = provider time / triton time.",
        "",
        "| case | mask | provider | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | % floor | triton speedup |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in report["cases"]:
        label = f"{case['name']} N={case['N']} B={case['B']} H={case['H']} d={case['D']} {case['dtype']}"
        for kind, entry in list(case["masks"].items()) + [("mix", case["mix"])]:
            for prov, res in entry["providers"].items():
                if "error" in res:
                    lines.append(f"| {label} | {kind} | {prov} | error: {res['error'][:60]} | | | | | |")
                    continue
                sp = entry["triton_speedup"].get(prov, {}).get("fwd_bwd") if prov != "triton" else None
                lines.append(
                    f"| {label} | {kind} | {prov} | {fmt(res.get('fwd_ms'))} | {fmt(res.get('bwd_ms'))} | "
                    f"{fmt(res.get('fwd_bwd_ms'))} | {fmt(res.get('tflops', {}).get('fwd_bwd'), '.1f')} | "
                    f"{fmt(res.get('pct_floor', {}).get('fwd_bwd'), '.1f')} | {fmt(sp, '.2f')} |"
                )
    lines += ["", "Targets on the layer mix (fwd+bwd): >= 1.5x compiled FlexAttention, >= 2x SDPA dense causal, "
              ">= 50% of the floor.", ""]
    for case in report["cases"]:
        mix = case["mix"]
        sp = mix["triton_speedup"]
        pct = mix["providers"].get("triton", {}).get("pct_floor", {}).get("fwd_bwd")
        lines.append(
            f"- {case['name']}: vs flex {fmt(sp.get('flex', {}).get('fwd_bwd'), '.2f')}x, "
            f"vs sdpa_causal {fmt(sp.get('sdpa_causal', {}).get('fwd_bwd'), '.2f')}x, "
            f"floor {fmt(pct, '.1f')}%"
        )
    return "\n".join(lines)


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception:
        ds_version = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        name, cc = f"CPU ({platform.processor() or platform.machine()})", None
    return {
        "device": name,
        "compute_capability": cc,
        "versions": {"torch": torch.__version__, "triton": triton_version, "deepspeed": ds_version,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny fp32 shapes on CPU (tests the harness)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=None, help="batch for the 1280-token case (default 8)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=64, help="layer count for the schedule mix (paper: 64)")
    p.add_argument("--providers", default=None, help="comma list, default: " + ",".join(PROVIDERS))
    p.add_argument("--no-large", action="store_true", help="skip the W = 64 case")
    p.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    p.add_argument("--cases", default=None, help="comma list of case names to run (default: all)")
    p.add_argument("--extra-masks", default="", help="comma list of extra mask kinds to time outside the layer mix; "
                   "'causal' compares the kernels with SDPA causal on the same tiles (diagnostic)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    # Compiled FlexAttention recompiles per mask (each has its own mask_mod) and per grad mode: 2 x 3 masks x 2
    # cases exceeds dynamo's default limit of 8, after which it would silently fall back to unfused eager flex.
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    if args.quick:
        dtype = torch.float32
        cases = [("tiny", 3, 4, 1, 2, 16), ("tiny_w8", 5, 8, 1, 1, 16)]
        providers = ["triton", "flex", "sdpa_causal", "sdpa_mask", "dense"]
    else:
        dtype = getattr(torch, args.dtype or "bfloat16")
        B = args.batch or 8
        cases = [("paper", 256, 32, B, args.heads, args.head_dim)]
        if not args.no_large:
            cases.append(("large_w64", 256, 64, max(1, B // 4), args.heads, args.head_dim))
        providers = list(PROVIDERS)
    if args.providers:
        providers = args.providers.split(",")
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c[0] in wanted]

    extra_masks = [m for m in args.extra_masks.split(",") if m]
    bad = [m for m in extra_masks if m != "causal"]
    if bad:
        p.error(f"--extra-masks: {bad} (allowed: causal; row/column/conv are always timed)")
    env = environment(device)
    rate = matmul_tflops(device, dtype if device == "cuda" else torch.float32, args.quick)
    report = {
        **env,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "matmul_tflops": rate,
        "matmul_dtype": str(dtype if device == "cuda" else torch.float32).replace("torch.", ""),
        "flop_convention": "fwd = 4*D*kept*B*H; bwd = 2.5*fwd; fwd_bwd = 3.5*fwd (kept = visible query-key pairs)",
        "providers": providers,
        "cases": [],
    }
    for name, T, W, B, H, D in cases:
        print(f"# case {name}: T={T} W={W} B={B} H={H} D={D} {dtype} on {env['device']}", file=sys.stderr)
        report["cases"].append(run_case(name, T, W, B, H, D, dtype, device, providers, args.reps, args.layers, rate,
                                        extra_masks))
    report["triton_configs"] = {k: vars(v) for k, v in triton_backend.tuned_configs().items()}
    md = markdown(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md + "\n")
    print(md)
    return report


if __name__ == "__main__":
    main()
