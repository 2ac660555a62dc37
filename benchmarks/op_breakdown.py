"""Where a profiled step's time goes: the top time sinks by name and a coarse split by category.

On a GPU the basis is the **device kernels** the profiler recorded (CUPTI): each kernel's duration, summed per
kernel name, plus the time the device was busy at all (the union of the kernel spans) against the step time, so a
launch-bound step (the GPU idle between small kernels) shows as a large ``idle_ms``. On a CPU the basis is the
**self CPU time of each operator** (time in an op minus the time in the ops it called, so nothing is counted
twice); the self time of the benchmark's own ``bench/*`` ranges (Python and framework work between the ops) and of
the autograd engine's nodes is host overhead.

Categories come from the name alone, first match wins (:data:`CATEGORIES`): cuBLAS / CUTLASS GEMM kernels and
``aten::mm``-like ops are "matmul"; this project's Triton attention kernels (``_attn_*``), FlashAttention and
FlexAttention ones are "attention"; NCCL kernels and c10d / gloo ops "communication"; and so on. The top list keeps
the full name, which tells more than the category (for example a cuBLAS ``sgemm`` kernel is an fp32 matmul on the
CUDA cores, a ``bf16`` one a tensor-core matmul).
"""
from __future__ import annotations

import re

CATEGORIES: tuple[tuple[str, re.Pattern], ...] = tuple((c, re.compile(p, re.IGNORECASE)) for c, p in (
    ("communication", r"nccl|c10d::|gloo|all_?reduce|reduce_scatter|all_?gather|broadcast"),
    ("attention", r"_attn|flash|fmha|flex_attention|scaled_dot_product|efficient_attention"),
    ("matmul", r"gemm|gemv|cutlass|xmma|aten::(mm|addmm|bmm|baddbmm|matmul|linear)$"),
    ("optimizer", r"adam|multi_tensor|_foreach"),
    # PowerSGD's own work (bench_train --powersgd): the 1-6-9 ops (CPU operators dalle_ds_fp169::*, CUDA kernels in
    # dalle_ds::fp169; the 16-bit Adam step matched "optimizer" above) and the QR of the P matrices
    ("compression (PowerSGD, 1-6-9)", r"fp169|linalg_qr|geqrf|orgqr|ormqr|householder_product"),
    ("normalization", r"layer_?norm"),
    ("softmax / loss", r"softmax|cross_entropy|nll_loss"),
    ("copies / casts", r"memcpy|memset|copy|contiguous|aten::cat$|fill_|aten::to$"),
    ("host (Python, framework)", r"^bench/|^autograd::|AccumulateGrad|Backward\d*$"),
))
OTHER = "elementwise / other"


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if pattern.search(name):
            return cat
    return OTHER


def union_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _is_kernel(event) -> bool:
    """A device-side event that is work: not the GPU copy of a ``record_function`` range (a user annotation, which
    spans the kernels it contains and would count them twice)."""
    return ("cuda" in str(event.device_type).lower() and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith(("bench/", "ProfilerStep")))


def op_breakdown(events, steps: int, step_ms: float, top: int = 12) -> dict:
    """Per-step milliseconds by name and by category from a profiler's ``events()``.

    ``step_ms`` is the profiled step time (the ``bench/step`` range), against which shares are given."""
    events = list(events)
    device = [e for e in events if _is_kernel(e)]
    per_name: dict[str, list[float]] = {}  # name -> [total us, calls]
    spans = []
    if device:
        basis = "device kernels (duration per kernel name, CUPTI)"
        for e in device:
            tr = e.time_range
            spans.append((float(tr.start), float(tr.end)))
            acc = per_name.setdefault(e.name, [0.0, 0])
            acc[0] += tr.elapsed_us()
            acc[1] += 1
    else:
        basis = "CPU operators (self CPU time)"
        for e in events:
            if e.name == "bench/step" or e.name.startswith("ProfilerStep"):
                continue  # the outer range: its self time is the loop around the phases
            acc = per_name.setdefault(e.name, [0.0, 0])
            acc[0] += e.self_cpu_time_total
            acc[1] += 1
    total_ms = sum(v[0] for v in per_name.values()) / 1e3 / steps
    busy_ms = union_us(spans) / 1e3 / steps if device else None  # CPU: other threads' ops overlap the step
    categories: dict[str, float] = {}
    for name, (us, _) in per_name.items():
        cat = category(name)
        categories[cat] = categories.get(cat, 0.0) + us / 1e3 / steps
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "basis": basis, "step_ms": step_ms, "total_ms": total_ms, "busy_ms": busy_ms,
        "idle_ms": max(step_ms - busy_ms, 0.0) if device else None,
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "top": [{"name": name, "category": category(name), "ms": us / 1e3 / steps, "calls_per_step": n / steps,
                 "share_of_step": us / 1e3 / steps / step_ms if step_ms > 0 else None}
                for name, (us, n) in ranked],
    }


def _short(name: str, width: int = 90) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 1] + "…"


def markdown(case: str, b: dict, top: int = 6) -> list[str]:
    """A few markdown lines: the category split and the top ``top`` names of one case."""
    pct = (lambda ms: f"{100 * ms / b['step_ms']:.0f}%") if b["step_ms"] > 0 else (lambda ms: "n/a")
    split = ", ".join(f"{cat} {ms:.3g} ms ({pct(ms)})" for cat, ms in b["categories"].items())
    busy = (f"device busy {b['busy_ms']:.4g} ms, idle {b['idle_ms']:.3g} ms" if b["busy_ms"] is not None
            else f"self times sum to {b['total_ms']:.4g} ms")
    lines = [f"**{case}**: {b['basis']}; step {b['step_ms']:.4g} ms, {busy}. By category: {split}.",
             "", "| time sink | category | ms/step | calls/step | share of step |", "| --- | --- | ---: | ---: | ---: |"]
    for t in b["top"][:top]:
        share = "n/a" if t["share_of_step"] is None else f"{100 * t['share_of_step']:.1f}%"
        lines.append(f"| `{_short(t['name'])}` | {t['category']} | {t['ms']:.3g} | {t['calls_per_step']:.3g} | "
                     f"{share} |")
    return lines + [""]
