"""Timing shared by the benchmarks: the median of repeated calls after warm-up (CUDA events on GPU)."""
from __future__ import annotations

import statistics
import time

import torch


def time_fn(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def emit(result: dict, md: str, out: "str | None") -> dict:
    """Print a benchmark's markdown and, with ``out``, write ``out.json`` (the result) and ``out.md``."""
    import json
    from pathlib import Path
    print(md)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(str(out) + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(str(out) + ".md").write_text(md)
    return result
