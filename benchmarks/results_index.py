#!/usr/bin/env python
"""Write benchmarks/results/README.md: every committed result report, grouped by benchmark, newest first.

    python benchmarks/results_index.py            # rewrite the index
    python benchmarks/results_index.py --check    # exit 1 if the index is not current (tests/test_results_index.py)

A report is a ``.md`` file in benchmarks/results/ (its ``.json`` / ``.svg`` siblings are linked from the same row);
its title is its first line, its device and date come from its name (``<benchmark>_<device>_<YYYYMMDD>...``), which
is how the benchmarks name what they write (``timing.device_tag``).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
INDEX = RESULTS / "README.md"
# benchmark name -> what it measures (the script that writes it)
FAMILIES = {
    "attention": "block-sparse attention against FlexAttention and SDPA (bench_attention.py)",
    "attn_sass": "the attention kernels' sm_90 tile loops counted in machine code, no GPU (attn_sass.py)",
    "fp169": "1-6-9 encode / decode / fused ops against copy bandwidth, and the underflow table (bench_fp169.py)",
    "adam16": "16-bit Adam moments against fp32 moments on the demo prior",
    "powersgd": "PowerSGD reducer: bytes, orthogonalization, against torch's PowerSGD hook (bench_powersgd.py)",
    "powersgd_reduce": "PowerSGD reducer bytes per path: ZeRO 0-2, 16-bit wire, ZeRO-3 (bench_powersgd.py --parts "
                       "reduce)",
    "powersgd_shapes": "PowerSGD against the stock all-reduce, shapes prior, one seed (powersgd_shapes.sh)",
    "powersgd_seeds": "the same pooled over seeds: mean gap and its interval (powersgd_seeds.py)",
    "precision": "fp16 resblocks with per-resblock scaling against bf16 and fp32 (precision_compare.py)",
    "underflow": "zero activation gradients per resblock, global against per-resblock scaling (bench_underflow.py)",
    "train": "training throughput, MFU and step breakdown (bench_train.py)",
    "sample": "sampling images per second with and without the KV cache (bench_sample.py)",
    "memory_check": "what DeepSpeed holds against the memory estimate (memory_check.py)",
    "dvae_step": "dVAE update time by precision and layout (bench_dvae_step.py)",
    "data": "image pipeline of one data worker: decode and centre or paper crops (bench_data.py)",
    "fidelity": "samples against held-out images per blur radius: FID / IS, or FD-CLIP (launch/evaluate.py)",
}
SESSION = "GPU sessions: what ran on a lent GPU, and what it showed"
# <device>: "cpu", a GPU tag as timing.device_tag writes it ("h100", "b200", "l40s", "a10g": letters and digits), or
# "triton<version>" (machine code compiled on a CPU); the family is the shortest prefix followed by _<device>_<date>
NAME = re.compile(r"^(?P<family>[a-z0-9_.]+?)_(?P<device>[a-z][a-z0-9]{0,11}|triton[0-9.]+)_(?P<date>\d{8})")
SESSION_NAME = re.compile(r"^(?P<device>[a-z][a-z0-9]{0,11})_(?P<date>\d{8})_session")


def _title(md: Path) -> str:
    first = md.read_text().splitlines()[0] if md.stat().st_size else ""
    return first.lstrip("# ").strip().replace("|", "/")


def reports() -> dict[str, list[dict]]:
    """family -> reports (name, device, date, title, sibling files), newest first."""
    out: dict[str, list[dict]] = {}
    for md in sorted(RESULTS.glob("*.md")):
        if md.name == "README.md":  # this index
            continue
        m, s = NAME.match(md.stem), SESSION_NAME.match(md.stem)
        if s:
            family, device, date = SESSION, s["device"], s["date"]
        elif m:
            family, device, date = m["family"], m["device"], m["date"]
            if device.startswith("triton"):  # attn_sass_triton3.6.0_...: compiled on a CPU for sm_90
                device = f"sm_90 code, {device.replace('triton', 'triton ')}"
        else:
            raise SystemExit(f"results_index: {md.name} is not named <benchmark>_<device>_<YYYYMMDD>...")
        siblings = sorted(p.name for p in RESULTS.glob(md.stem + ".*") if p.suffix in (".json", ".svg", ".png"))
        out.setdefault(family, []).append({"name": md.name, "device": device, "title": _title(md),
                                          "date": f"{date[:4]}-{date[4:6]}-{date[6:]}", "siblings": siblings})
    for rows in out.values():
        rows.sort(key=lambda r: (r["date"], r["name"]), reverse=True)
    return out


def render() -> str:
    groups = reports()
    lines = ["# Benchmark results", "",
             "Every report committed here, by benchmark, newest first; each names its command, device and date at its "
             "top. Written by `python benchmarks/results_index.py` (a test fails when this file is not current). "
             "GPU numbers come only from a lent GPU (`benchmarks/device_session.sh`), CPU ones from the 2-core "
             "development machine.", ""]
    order = [SESSION, *FAMILIES, *sorted(set(groups) - set(FAMILIES) - {SESSION})]
    for family in order:
        rows = groups.get(family)
        if not rows:
            continue
        heading = family if family == SESSION else f"`{family}`: {FAMILIES.get(family, 'results')}"
        lines += [f"## {heading}", "", f"{len(rows)} report(s).", "",
                  "| date | device | report | title |", "|---|---|---|---|"]
        for r in rows:
            extra = "".join(f" · [{Path(s).suffix[1:]}]({s})" for s in r["siblings"])
            lines.append(f"| {r['date']} | {r['device']} | [{r['name']}]({r['name']}){extra} | {r['title']} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the index is not current; write nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    text = render()
    if args.check:
        if not INDEX.is_file() or INDEX.read_text() != text:
            print("benchmarks/results/README.md is not current: run python benchmarks/results_index.py",
                  file=sys.stderr)
            return 1
        return 0
    INDEX.write_text(text)
    print(f"wrote {INDEX} ({sum(len(r) for r in reports().values())} reports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
