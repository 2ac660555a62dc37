"""Timing shared by the benchmarks: the median of repeated calls after warm-up (CUDA events on GPU); and argparse
types for their command lines."""
from __future__ import annotations

import argparse
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


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n×n×n ``torch.matmul`` in ``dtype`` on ``device`` (median of ``repeats``): the compute ceiling
    benchmarks compare with (MFU, floors)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    return 2 * n**3 / time_fn(lambda: a @ b, device, repeats, warmup=2)


def copy_bytes_per_s(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by ``dst.copy_(src)`` of ``nbytes``: the memory ceiling."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / time_fn(lambda: dst.copy_(src), device, repeats, warmup=2)


def device_tag(name: str) -> str:
    """A short lower-case tag for a device name in result file names: the model number ("NVIDIA H100 80GB HBM3" ->
    "h100", "NVIDIA A100-SXM4-80GB" -> "a100"), else the name's letters and digits (at most 12)."""
    import re

    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "", name.lower().replace("nvidia", ""))[:12]


def host_info() -> dict:
    """The host CPU and how busy it is now: eager GPU timings include the host's launch path (Python, the
    launcher), so another process competing for the cores (a compile, a test run left behind) slows them. The
    1-minute load average lags (it decays over minutes after the load is gone); ``procs_running`` (/proc/stat) is
    the count of runnable threads at this instant, this process's included."""
    import os
    import platform
    from pathlib import Path

    model = platform.processor() or platform.machine()
    running = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                running = int(line.split()[1])
    except OSError:
        pass
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"host_cpu": model, "cpu_count": os.cpu_count(), "load_avg_1min": load, "procs_running": running}


def host_line(start: dict, end: "dict | None" = None) -> str:
    """One markdown line for :func:`host_info` readings taken at a run's start (and end)."""
    def busy(h: dict) -> str:
        return f"1-min load {h['load_avg_1min']}, {h['procs_running']} runnable"
    line = f"Host: {start['host_cpu']}, {start['cpu_count']} CPUs; at the start {busy(start)}"
    return line + (f"; at the end {busy(end)}." if end else ".")


def emit(result: dict, md: str, out: "str | None", show: bool = True) -> dict:
    """Print a benchmark's markdown (``show``) and, with ``out``, write ``out.json`` (the result) and ``out.md``."""
    import json
    from pathlib import Path
    if show:
        print(md)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(str(out) + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(str(out) + ".md").write_text(md)
    return result


def md_table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    """A markdown table's lines: ``header`` cells, then one line per row (cells formatted with ``str``);
    ``align``: one character per column, "l" or "r" (default: all left)."""
    marks = ["---:" if a == "r" else "---" for a in (align or "l" * len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def int_at_least(low: int):
    """An argparse ``type``: an integer ≥ ``low``; anything else is a usage error naming the flag (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {low}, got {text!r}")
        return value
    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def out_prefix(text: str) -> str:
    """An argparse ``type`` for ``--out PREFIX`` (a report goes to PREFIX.json and PREFIX.md): PREFIX's folder is
    created now and must take a file, so that a run cannot measure for minutes and then fail to write its report;
    anything else is a usage error naming the flag (exit 2)."""
    import os
    import tempfile
    from pathlib import Path

    if not text or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"expected a file prefix (PREFIX.json and PREFIX.md are written), got "
                                         f"{text!r}")
    folder = Path(text).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write a report in {str(folder)!r}: {e.strerror or e}") from None
    return text


def comma_list(choices=None, item=str, what: str | None = None):
    """An argparse ``type``: a comma-separated list (blank entries dropped, at least one left), each entry converted
    by ``item`` (a callable or another argparse type) and, given ``choices``, one of them; anything else is a usage
    error naming the flag (exit 2), saying what was expected (``what``, else the choices). String defaults go through it too (argparse converts them)."""
    def parse(text: str) -> list:
        try:
            items = [item(x.strip()) for x in text.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            items = None
        if not items or (choices is not None and any(x not in choices for x in items)):
            want = what or (", ".join(map(str, choices)) if choices is not None else "values")
            raise argparse.ArgumentTypeError(f"expected a comma list of {want}; got {text!r}")
        return items
    parse.__name__ = "comma_list"
    return parse


def torch_device(text: str) -> str:
    """An argparse ``type``: a torch device string (cpu, cuda, cuda:N) that this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device on this machine (allowed: cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s) (cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    return text
