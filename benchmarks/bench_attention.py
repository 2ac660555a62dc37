"""Benchmark the block-sparse row / column / conv attention against dense and FlexAttention baselines.

For each case (default: the paper's shape T = 256, W = 32 -> 1280 tokens, d = 64, bf16; and W = 64 -> 4352 tokens)
it times forward, backward and forward+backward of

* ``triton``: dalle_ds's block-sparse kernels (``attention(..., backend="triton")``);
* ``flex``: compiled FlexAttention with the same mask (column attention transposed, the gathers included);
* ``sdpa_causal``: ``F.scaled_dot_product_attention(is_causal=True)`` (FlashAttention; does the full causal work);
* ``sdpa_mask``: SDPA with the dense boolean mask;
* on request (``--providers``): ``triton_split`` / ``triton_fused``, the Triton kernels with the backward path pinned
  (``triton`` times both paths on its first backward and keeps the faster; the report names the one it kept);

for each mask and for the paper's layer mix (the schedule of ``layer_schedule(64)``: 47 row, 16 column, 1 conv
layers; mix time = per-layer average). All providers run in one process, on the same inputs. Before timing, each
provider's output and gradients are checked against fp32 masked attention (``CHECK_TOL``): a provider that computes
the wrong thing is marked FAIL in the table and named in the summary, so a fast wrong kernel cannot pass unseen.

FLOPs are counted on the elements the mask keeps (FlashAttention's convention restricted to the mask):
forward = 4 * D * kept * B * H, backward = 2.5 x forward, forward+backward = 3.5 x forward. TFLOP/s use those
counts for every provider, so they are comparable "useful work" rates. The floor is the kept FLOPs divided by the
bf16 matmul rate measured in the same run; "% floor" = floor time / measured time.

Two timings. *Eager* (``triton.testing.do_bench``, L2 flushed between calls) is what a caller sees, host launch
gaps included: kernels of 0.1-1 ms launched from Python leave the GPU idle while the host enqueues them. *Graph
replay* (``--graphs``, default on a GPU: ``do_bench_cudagraph``) is the GPU time alone; next to it the host
microseconds to enqueue one forward+backward. ``--profile`` (default on a GPU) adds torch.profiler's time per
kernel for each forward+backward, so a slow provider's time can be placed (which kernel, how many launches).

Prints a markdown table last; ``--out PREFIX`` writes PREFIX.json and PREFIX.md (the JSON has the device,
versions, command, shapes, times, TFLOP/s, floors and speedups) and a bar chart per case, PREFIX.<case>.svg
(forward+backward time per mask and provider); ``--plot RUN.json`` redraws the charts of an earlier run. ``--quick`` runs tiny shapes in fp32 on CPU so
the harness itself is tested (the triton provider then needs ``TRITON_INTERPRET=1``).

    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100_$(date +%Y%m%d)
    python benchmarks/bench_attention.py --quick --out /tmp/attn_quick
"""
from __future__ import annotations

import argparse
import contextlib
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
from dalle_ds.utils.svg_plot import bar_chart  # noqa: E402
from op_breakdown import op_breakdown  # noqa: E402  (benchmarks/op_breakdown.py, beside this script)
from timing import (comma_list, host_info, host_line, matmul_flops_per_s, out_prefix,  # noqa: E402
                    positive_int)  # (benchmarks/timing.py)

MASKS = ("row", "column", "conv")
PROVIDERS = ("triton", "flex", "sdpa_causal", "sdpa_mask")
#: Optional providers: the Triton kernels with the backward path pinned (``triton`` measures both and keeps one).
PINNED_BACKWARD = {"triton_split": "split", "triton_fused": "fused"}
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
def _drop_grads(tensors) -> None:
    """Set ``.grad`` of each tensor (None: none) to None, so the next backward allocates instead of accumulating."""
    for t in tensors or ():
        t.grad = None


def bench_ms(fn, device: str, grad_to_none=None, reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` (triton.testing.do_bench on GPU; a plain loop on CPU)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        _drop_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds per call replaying ``fn`` captured in a CUDA graph (triton.testing.do_bench_cudagraph):
    the GPU time without the host's launch gaps. No L2 flush between calls (unlike ``bench_ms``)."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def host_us(fn, grad_to_none=None, calls: int = 20) -> float:
    """Host microseconds to enqueue one call (no synchronization inside the loop; 20 calls stay far below the
    launch queue's depth, so the host never waits for the GPU)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        _drop_grads(grad_to_none)
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def summarize_profile(events, iters: int, device: str, top: int = 8) -> dict:
    """Per-call time by kernel (CUDA) or by operator (CPU, self time) from a profiler's ``events()``: the top list of
    :func:`op_breakdown.op_breakdown` (the one per-name account of profiled time, also bench_train's), in this
    report's shape."""
    b = op_breakdown(events, iters, step_ms=0.0, top=top)
    rows = [{"name": t["name"], "ms": t["ms"], "calls": t["calls_per_step"]} for t in b["top"] if t["ms"] > 0]
    return {"total_ms": b["total_ms"], "top": rows, "unit": "kernel" if device == "cuda" else "op"}


def profile_calls(fn, device: str, grad_to_none=None, iters: int = 5) -> dict:
    """torch.profiler over ``iters`` calls after one warm-up: where the time of one call goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        for _ in range(iters):
            _drop_grads(grad_to_none)
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return summarize_profile(prof.events(), iters, device)


def matmul_tflops(device: str, dtype: torch.dtype, quick: bool) -> float:
    """The floor's matmul rate: timing.matmul_flops_per_s (bench_train's and bench_sample's too) in TFLOP/s."""
    return matmul_flops_per_s(torch.device(device), dtype, 256 if quick else 8192) / 1e12


# ------------------------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------------------------
def make_provider(name: str, spec: MaskSpec, device: str):
    """A callable (q, k, v) -> out for ``name``, or raise with the reason it cannot run."""
    if name in ("triton", *PINNED_BACKWARD):  # the backward path is pinned around the whole measurement (measure)
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


def _error(e: Exception, limit: int = 200) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:limit] if str(e) else ''}"


def time_provider(fn, q, k, v, device: str, reps: int, graphs: bool = False, profile: bool = False) -> dict:
    """fwd / bwd / fwd_bwd milliseconds (eager, L2 flushed: what a caller sees, host launch gaps included);
    'bwd_error' when the provider has no backward here. ``graphs`` (CUDA): the forward and the forward+backward
    replayed from a CUDA graph (``graph_<mode>_ms``: GPU time without host gaps; ``graph_bwd_ms`` is their
    difference) and the host time to enqueue one forward+backward (``host_fwd_bwd_us``). ``profile``: the forward+backward's time per kernel (``profile``)."""
    res = {}
    with torch.no_grad():
        fwd = lambda: fn(q, k, v)  # noqa: E731
        res["fwd_ms"] = bench_ms(fwd, device, reps=reps)
        if graphs:
            try:
                res["graph_fwd_ms"] = graph_ms(fwd)
            except Exception as e:  # a provider that cannot be captured: say so, keep the eager numbers
                res["graph_error"] = _error(e)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    try:
        out = fn(*leaves)
        dout = torch.randn_like(out)
        bwd = lambda: out.backward(dout, retain_graph=True)  # noqa: E731
        res["bwd_ms"] = bench_ms(bwd, device, grad_to_none=leaves, reps=reps)

        def fwd_bwd():
            fn(*leaves).backward(dout)

        res["fwd_bwd_ms"] = bench_ms(fwd_bwd, device, grad_to_none=leaves, reps=reps)
    except Exception as e:  # e.g. FlexAttention has no CPU backward
        res["bwd_error"] = _error(e)
        return res
    if graphs and "graph_error" not in res:
        try:
            res["host_fwd_bwd_us"] = host_us(fwd_bwd, leaves)
            res["graph_fwd_bwd_ms"] = graph_ms(fwd_bwd, leaves)
            # Not captured alone: ``bwd`` replays the backward of an eager forward, whose ops autograd runs on the
            # forward's (default) stream, not the capture stream. The difference of the two captured graphs instead.
            res["graph_bwd_ms"] = res["graph_fwd_bwd_ms"] - res["graph_fwd_ms"]
        except Exception as e:
            res["graph_error"] = _error(e)
    if profile:
        try:
            res["profile"] = profile_calls(fwd_bwd, device, leaves)
        except Exception as e:
            res["profile_error"] = _error(e)
    return res


#: Largest max|x - ref| / max|ref| (output and each gradient) that passes the check, per input dtype. Rounding in
#: 16-bit inputs stays well below this; a wrong mask or a missed tile gives errors of order 1.
CHECK_TOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
CHECKED = ("out", "dq", "dk", "dv")


def reference(spec: MaskSpec, q, k, v, dout) -> dict:
    """Output and gradients of masked attention in fp32 (SDPA with the dense mask): what every provider is checked
    against, computed once per mask."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=dense_mask(spec, q.device))
    out.backward(dout.float())
    return {"out": out.detach(), **{n: t.grad for n, t in zip(CHECKED[1:], leaves)}}


def check(fn, q, k, v, dout, ref: dict) -> dict:
    """One forward (and backward where the provider has one) of ``fn`` against ``ref``: the max error of each of
    out, dq, dk, dv relative to the reference's largest magnitude, and whether all pass ``CHECK_TOL``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    try:
        out = fn(*leaves)
        out.backward(dout)
        got = {"out": out.detach(), **{n: t.grad for n, t in zip(CHECKED[1:], leaves)}}
    except Exception:  # no backward here (FlexAttention on CPU refuses inputs that need grad): check the forward
        with torch.no_grad():
            got = {"out": fn(q, k, v)}
    rel = {n: ((got[n].float() - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item()
           for n in CHECKED if n in got}
    tol = CHECK_TOL[q.dtype]
    return {"max_rel_err": rel, "tol": tol, "ok": all(math.isfinite(e) and e <= tol for e in rel.values())}


def measure(prov: str, spec: MaskSpec, q, k, v, dout, ref: dict, device: str, reps: int, graphs: bool = False,
            profile: bool = False) -> dict:
    """Check one provider's forward and backward against ``ref`` (fp32 masked attention; not for sdpa_causal,
    which computes another mask), then time it; errors are recorded, not raised."""
    pinned = PINNED_BACKWARD.get(prov)
    try:
        fn = make_provider(prov, spec, device)
        with triton_backend.kernel_config(backward=pinned) if pinned else contextlib.nullcontext():
            checked = check(fn, q, k, v, dout, ref) if prov != "sdpa_causal" else None
            res = time_provider(fn, q, k, v, device, reps, graphs, profile)
        if checked is not None:
            res["check"] = checked
    except Exception as e:
        res = {"error": _error(e, 300)}
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
    return res


TIMINGS = ("", "graph_")  # eager (bench_ms, L2 flushed) and CUDA-graph replay: keys "<timing><mode>_ms"


def _add_rates(res: dict, flops: dict, floor_ms: dict) -> None:
    """TFLOP/s and % of floor for every timing/mode ``res`` has (keys ``<timing>tflops`` / ``<timing>pct_floor``)."""
    for timing in TIMINGS:
        for m in MODES:
            ms = res.get(f"{timing}{m}_ms")
            if ms is not None:
                res.setdefault(f"{timing}tflops", {})[m] = flops[m] / (ms * 1e-3) / 1e12
                res.setdefault(f"{timing}pct_floor", {})[m] = 100.0 * floor_ms[m] / ms


def run_case(name: str, T: int, W: int, B: int, H: int, D: int, dtype, device: str, providers, reps: int,
             layers: int, matmul_rate: float, extra_masks=(), graphs: bool = False, profile: bool = False,
             progress=None) -> dict:
    """Time every provider on every mask of one shape; derive TFLOP/s, floors, the layer mix and speedups.
    ``progress(case)``, if given, is called with the case so far after each mask (to save partial results)."""
    N = T + W * W
    case = {"name": name, "T": T, "W": W, "N": N, "B": B, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""),
            "masks": {}}
    q, k, v, dout = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(4))
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
        ref = reference(spec, q, k, v, dout)
        for prov in providers:
            if prov == "sdpa_causal" and sdpa_causal_cache is not None:  # mask-independent: time it once
                res = {key: val for key, val in sdpa_causal_cache.items()
                       if not key.endswith(("tflops", "pct_floor", "profile"))}  # rates redone; profile shown once
            else:
                print(f"#   {kind} {prov}", file=sys.stderr)
                res = measure(prov, spec, q, k, v, dout, ref, device, reps, graphs, profile)
            _add_rates(res, flops, entry["floor_ms"])
            entry["providers"][prov] = res
            if prov == "sdpa_causal" and "error" not in res:
                sdpa_causal_cache = res
        case["masks"][kind] = entry
        if progress is not None:
            progress(case)
        del ref
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
        for key in (f"{timing}{m}_ms" for timing in TIMINGS for m in MODES):
            per = [case["masks"][kd]["providers"].get(prov, {}).get(key) for kd in MASKS]
            if all(x is not None for x in per):
                res[key] = sum(counts[kd] * t for kd, t in zip(MASKS, per)) / layers
        _add_rates(res, mix_flops, mix["floor_ms"])
        mix["providers"][prov] = res
    case["mix"] = mix

    # -- speedups of triton over each baseline, per mask and for the mix ("graph_<mode>" keys: graph replay)
    for entry in list(case["masks"].values()) + [mix]:
        tri = entry["providers"].get("triton", {})
        sp = {}
        for prov in providers:
            if prov == "triton":
                continue
            other = entry["providers"].get(prov, {})
            sp[prov] = {f"{timing}{m}": other[f"{timing}{m}_ms"] / tri[f"{timing}{m}_ms"]
                        for timing in TIMINGS for m in MODES
                        if f"{timing}{m}_ms" in other and f"{timing}{m}_ms" in tri}
        entry["triton_speedup"] = sp
    return case


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------
def fmt(x, spec=".3f", unit=""):
    """``x`` formatted, with ``unit`` after it; "n/a" (no unit) when there is no number."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec) + unit


def _results(report: dict):
    """(case, mask kind or "mix", entry, provider, result) for every timed result, masks first, then the mix."""
    for case in report["cases"]:
        for kind, entry in list(case["masks"].items()) + [("mix", case["mix"])]:
            for prov, res in entry["providers"].items():
                yield case, kind, entry, prov, res


def markdown(report: dict) -> str:
    lines = [
        f"# bench_attention: {report['device']} ({report['date']})",
        "",
        f"`{report['command']}`  ",
        f"torch {report['versions']['torch']}, triton {report['versions']['triton']}; "
        f"matmul {report['matmul_dtype']} {fmt(report['matmul_tflops'], '.4g')} TFLOP/s (floor reference)",
        *(["", host_line(report["host"], report.get("host_end"))] if "host" in report else []),
        "",
        "TFLOP/s and % floor count only the FLOPs on elements the mask keeps (fwd+bwd = 3.5 x fwd). "
        "Speedup = provider time / triton time.",
        "",
        "| case | mask | provider | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | % floor | triton speedup | "
        "check: max rel err (out, dq, dk, dv) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case, kind, entry, prov, res in _results(report):
        label = f"{case['name']} N={case['N']} B={case['B']} H={case['H']} d={case['D']} {case['dtype']}"
        if "error" in res:
            lines.append(f"| {label} | {kind} | {prov} | error: {res['error'][:60]} | | | | | | |")
            continue
        sp = entry["triton_speedup"].get(prov, {}).get("fwd_bwd") if prov != "triton" else None
        lines.append(
            f"| {label} | {kind} | {prov} | {fmt(res.get('fwd_ms'))} | {fmt(res.get('bwd_ms'))} | "
            f"{fmt(res.get('fwd_bwd_ms'))} | {fmt(res.get('tflops', {}).get('fwd_bwd'), '.3g')} | "
            f"{fmt(res.get('pct_floor', {}).get('fwd_bwd'), '.3g')} | {fmt(sp, '.2f')} | {check_cell(res)} |"
        )
    lines += graph_table(report) + profile_tables(report)
    paths = report.get("triton_backward_paths")
    if paths:
        lines += ["", "Backward path the triton provider kept (split: dK/dV then dQ kernels; fused: dQ added "
                  "atomically in the dK/dV kernel): " + ", ".join(f"{k} {v}" for k, v in paths.items()) + "."]
    failed = failed_checks(report)
    lines += ["", "Each provider's output and gradients were checked against fp32 masked attention before timing "
              "(sdpa_causal computes another mask and is not checked): "
              + ("**FAILED: " + "; ".join(failed) + "**" if failed else "all within tolerance") + "."]
    lines += ["", "Targets on the layer mix (fwd+bwd): >= 1.5x compiled FlexAttention, >= 2x SDPA dense causal, "
              ">= 50% of the floor.", ""]
    for case in report["cases"]:
        mix = case["mix"]
        sp = mix["triton_speedup"]
        tri = mix["providers"].get("triton", {})
        for timing, label in (("", "eager"), ("graph_", "graph replay")):
            if f"{timing}fwd_bwd_ms" not in tri:
                continue
            pct = tri.get(f"{timing}pct_floor", {}).get("fwd_bwd")
            lines.append(
                f"- {case['name']}, {label}: vs flex {fmt(sp.get('flex', {}).get(f'{timing}fwd_bwd'), '.2f', 'x')}, "
                f"vs sdpa_causal {fmt(sp.get('sdpa_causal', {}).get(f'{timing}fwd_bwd'), '.2f', 'x')}, "
                f"floor {fmt(pct, '.1f', '%')}"
            )
    return "\n".join(lines)


def check_cell(res: dict) -> str:
    chk = res.get("check")
    if chk is None:
        return ""
    errs = ", ".join(fmt(chk["max_rel_err"].get(n), ".1e") for n in CHECKED)
    return errs + ("" if chk["ok"] else f" **FAIL** (tol {chk['tol']:.0e})")


def failed_checks(report: dict) -> list[str]:
    """'case mask provider' for every result whose check failed (masks only: the mix is not recomputed)."""
    return [f"{case['name']} {kind} {prov}" for case, kind, _, prov, res in _results(report)
            if not res.get("check", {}).get("ok", True)]


def graph_table(report: dict) -> list[str]:
    """GPU time from CUDA-graph replay next to the host time per call: how much of the eager time is launch gaps."""
    rows = []
    for case, kind, entry, prov, res in _results(report):
        if "graph_error" in res:
            rows.append(f"| {case['name']} | {kind} | {prov} | error: {res['graph_error'][:60]} | | | | | |")
        elif "graph_fwd_bwd_ms" in res:
            sp = entry["triton_speedup"].get(prov, {}).get("graph_fwd_bwd") if prov != "triton" else None
            rows.append(
                f"| {case['name']} | {kind} | {prov} | {fmt(res.get('graph_fwd_ms'))} | "
                f"{fmt(res.get('graph_bwd_ms'))} | {fmt(res.get('graph_fwd_bwd_ms'))} | "
                f"{fmt(res.get('graph_pct_floor', {}).get('fwd_bwd'), '.1f')} | "
                f"{fmt(res.get('host_fwd_bwd_us'), '.0f')} | {fmt(sp, '.2f')} |"
            )
    if not rows:
        return []
    return ["", "CUDA-graph replay (GPU time without host launch gaps; no L2 flush) and the host time to enqueue one "
            "eager forward+backward:", "",
            "| case | mask | provider | fwd ms | bwd ms (fwd+bwd − fwd) | fwd+bwd ms | % floor | host us / fwd+bwd | "
            "triton speedup |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|", *rows]


def profile_tables(report: dict) -> list[str]:
    """torch.profiler: per call of forward+backward, the time of each kernel (top entries)."""
    out = []
    for case, kind, _, prov, res in _results(report):
        prof = res.get("profile")
        if not prof:  # (the mix has no profile of its own)
            continue
        out += ["", f"Profile, {case['name']} {kind} {prov}, forward+backward: {fmt(prof['total_ms'])} ms of "
                f"{prof['unit']} time per call", "", f"| {prof['unit']} | ms / call | calls |", "|---|---:|---:|"]
        out += [f"| `{r['name'][:90]}` | {fmt(r['ms'], '.4f')} | {fmt(r['calls'], '.0f')} |" for r in prof["top"]]
    return out


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


#: Every provider ``--providers`` accepts (``make_provider``).
ALL_PROVIDERS = (*PROVIDERS, *PINNED_BACKWARD, "dense")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked and resolved: ``device``, ``dtype`` (a torch dtype), ``cases`` (tuples
    (name, T, W, B, H, D)), ``providers`` and ``extra_masks`` (lists), ``graphs`` and ``profile`` (bools); with
    ``--plot``, ``plot_report`` (the loaded JSON) and nothing else resolved."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny fp32 shapes on CPU (tests the harness)")
    p.add_argument("--out", type=out_prefix, default=None, help="write OUT.json and OUT.md")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=positive_int, default=None, help="batch for the 1280-token case (default 8)")
    p.add_argument("--heads", type=positive_int, default=None, help="default 16")
    p.add_argument("--head-dim", type=positive_int, default=None, help="default 64")
    p.add_argument("--layers", type=positive_int, default=64, help="layer count for the schedule mix (paper: 64)")
    p.add_argument("--providers", type=comma_list(ALL_PROVIDERS), default=None, help="comma list, default: " + ",".join(PROVIDERS)
                   + "; also " + ",".join(x for x in ALL_PROVIDERS if x not in PROVIDERS))
    p.add_argument("--no-large", action="store_true", help="skip the W = 64 case")
    p.add_argument("--reps", type=positive_int, default=5, help="CPU timing repetitions")
    p.add_argument("--cases", type=comma_list(), default=None, help="comma list of case names to run (default: all)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also time CUDA-graph replays and the host time per call (default: on with a GPU)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.profiler breakdown of each forward+backward by kernel (default: on with a GPU)")
    p.add_argument("--extra-masks", type=comma_list(("causal",)), default=[], help="comma list of extra mask kinds to time outside the layer mix; "
                   "'causal' compares the kernels with SDPA causal on the same tiles (diagnostic)")
    p.add_argument("--plot", default=None, metavar="JSON", help="only draw the charts of an earlier run's JSON "
                   "(written beside it as <JSON without .json>.<case>.svg)")
    args = p.parse_args(argv)
    if args.plot:
        try:
            with open(args.plot) as f:
                args.plot_report = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--plot: cannot read {args.plot!r} as an earlier run's JSON ({_error(e)})")
        if not isinstance(args.plot_report, dict) or not isinstance(args.plot_report.get("cases"), list):
            p.error(f"--plot: {args.plot!r} is not a bench_attention JSON (no list of 'cases')")
        return args

    args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        if args.dtype not in (None, "float32"):
            print(f"bench_attention: --quick runs float32 (the CPU's interpreter and reference); --dtype "
                  f"{args.dtype} is not used", file=sys.stderr)
        args.dtype = torch.float32
        cases = [("tiny", 3, 4, 1, 2, 16), ("tiny_w8", 5, 8, 1, 1, 16)]
        cases = [(n, T, W, args.batch or B, args.heads or H, args.head_dim or D) for n, T, W, B, H, D in cases]
        providers = ["triton", "triton_fused", "flex", "sdpa_causal", "sdpa_mask", "dense"]  # triton: split on CPU
    else:
        args.dtype = getattr(torch, args.dtype or "bfloat16")
        B, H, D = args.batch or 8, args.heads or 16, args.head_dim or 64
        cases = [("paper", 256, 32, B, H, D)]
        if not args.no_large:
            cases.append(("large_w64", 256, 64, max(1, B // 4), H, D))
        providers = list(PROVIDERS)
    if args.providers:
        providers = args.providers
    if args.cases:
        wanted = args.cases
        names = [c[0] for c in cases]
        bad = [x for x in wanted if x not in names]
        if bad:
            p.error(f"--cases: unknown {','.join(bad)!r} (allowed{' with --quick' if args.quick else ''}: "
                    f"{', '.join(names)})")
        cases = [c for c in cases if c[0] in wanted]
    args.cases, args.providers = cases, providers

    args.graphs = args.device == "cuda" if args.graphs is None else args.graphs
    if args.graphs and args.device != "cuda":
        p.error("--graphs needs a CUDA device")
    args.profile = args.device == "cuda" if args.profile is None else args.profile
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot:
        paths = write_charts(args.plot_report, args.plot.removesuffix(".json"))
        print("\n".join(paths))
        return {"charts": paths}

    device, dtype, cases, providers = args.device, args.dtype, args.cases, args.providers
    extra_masks, graphs, profile = args.extra_masks, args.graphs, args.profile
    # Compiled FlexAttention recompiles per mask (each has its own mask_mod) and per grad mode: 2 x 3 masks x 2
    # cases exceeds dynamo's default limit of 8, after which it would silently fall back to unfused eager flex.
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    env = environment(device)
    env["host"] = host_info()  # eager timings include the host's launch path: how busy were the CPUs?
    rate = matmul_tflops(device, dtype if device == "cuda" else torch.float32, args.quick)
    report = {
        **env,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join((["TRITON_INTERPRET=1"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
                            + [os.path.basename(sys.executable)] + sys.argv),
        "matmul_tflops": rate,
        "matmul_dtype": str(dtype if device == "cuda" else torch.float32).replace("torch.", ""),
        "flop_convention": "fwd = 4*D*kept*B*H; bwd = 2.5*fwd; fwd_bwd = 3.5*fwd (kept = visible query-key pairs)",
        "providers": providers,
        "cases": [],
    }
    def save_partial(case: dict) -> None:
        """The JSON so far, rewritten after every mask: a run stopped by a time limit or a GPU fault keeps what it
        measured (the final write replaces it, with the markdown and the charts)."""
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".json", "w") as f:
                json.dump({**report, "cases": [*report["cases"], case], "partial": True}, f, indent=1)

    for name, T, W, B, H, D in cases:
        print(f"# case {name}: T={T} W={W} B={B} H={H} D={D} {dtype} on {env['device']}", file=sys.stderr)
        report["cases"].append(run_case(name, T, W, B, H, D, dtype, device, providers, args.reps, args.layers, rate,
                                        extra_masks, graphs, profile, progress=save_partial))
    report["host_end"] = host_info()
    report["triton_configs"] = {k: vars(v) for k, v in triton_backend.tuned_configs().items()}
    report["triton_backward_paths"] = triton_backend.tuned_backward_paths()
    md = markdown(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md + "\n")
        write_charts(report, args.out)
    print(md)
    return report


def charts(report: dict) -> dict[str, str]:
    """One SVG per case: forward+backward milliseconds (eager) per mask and for the layer mix, a bar per provider."""
    out = {}
    for case in report["cases"]:
        groups = [*case["masks"], "mix"]
        entries = [*case["masks"].values(), case["mix"]]
        providers = list(dict.fromkeys(p for e in entries for p in e["providers"]))
        series = {p: [e["providers"].get(p, {}).get("fwd_bwd_ms") for e in entries] for p in providers}
        title = (f"{case['name']}: N={case['N']} B={case['B']} H={case['H']} d={case['D']} {case['dtype']}, "
                 f"{report['device']}, {report['date'][:10]}: forward+backward (lower is better)")
        out[case["name"]] = bar_chart(groups, series, title, "ms (eager)", xlabel="mask")
    return out


def write_charts(report: dict, prefix: str) -> list[str]:
    """PREFIX.<case>.svg for each case; returns the paths."""
    paths = []
    for name, svg in charts(report).items():
        paths.append(f"{prefix}.{name}.svg")
        with open(paths[-1], "w") as f:
            f.write(svg)
    return paths


if __name__ == "__main__":
    main()
