"""Benchmark of the 1-6-9 codec: throughput against the device's copy bandwidth, and an underflow table.

    python benchmarks/bench_fp169.py                     # GPU if there is one, else CPU
    python benchmarks/bench_fp169.py --device cpu --quick --save

Part 1, throughput. For encode (fp32/bf16 -> codes), decode (codes -> fp32/bf16), the fused error add
(err = Q(D(err) + grad / scale)) and the all-reduce's local step (reduce_rows: 8 rows -> 1), the median time of
each provider (the CUDA op, the C++ CPU op, the pure-torch reference) and its bandwidth in GB/s, counting the bytes a
perfect kernel must move (each input read once, each output written once). "% copy" compares with a plain
``dst.copy_(src)`` of fp32 data measured in the same run (read + write), the practical ceiling of a memory-bound op.
The fused error add reads ``grad`` twice (a finiteness pass first, so that the buffer stays untouched when it is
not finite), so it moves 1.5x (fp32 grad) the counted bytes and tops out near 67% of copy. Torch's own fp32 <-> fp16
casts (the same traffic as encode/decode) and a write-only fill are listed as baselines. Last, one optimizer step
on an fp32 tensor of the same size: ``AdamW16`` (16-bit moments, paper App. B.2; one fused pass,
csrc/fp169/adamw16.h) against torch's AdamW.

Part 2, underflow (device independent). For values spread log-uniformly over [1e-20, 10] with random signs and for
Gaussian data at standard deviations 1e-3 ... 1e-12: the fraction of nonzero inputs flushed to zero, and the mean
relative error |q - x| / |x| (flushed values count 1), for fp16, bf16 and 1-6-9.

Prints markdown tables last; ``--out`` writes JSON (device, versions, date, command, all numbers), ``--save`` writes
``benchmarks/results/fp169_<device>_<yyyymmdd>.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from dalle_ds.ops import fp169  # noqa: E402
from dalle_ds.ops.fp169 import _ext  # noqa: E402
from dalle_ds.precision.adam_moments import AdamW16  # noqa: E402
from timing import (device_tag, host_info, host_line, out_prefix, positive_int, time_fn,  # noqa: E402
                    torch_device)  # (benchmarks/timing.py)




def throughput_rows(device: torch.device, n_op: int, n_ref: int, repeats: int, providers: list[str]) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)

    def add(op: str, provider: str, n: int, nbytes: int, fn, r: int = repeats) -> None:
        sec = time_fn(fn, device, r)
        rows.append({"op": op, "provider": provider, "n": n, "bytes": nbytes, "ms": sec * 1e3,
                     "GB/s": nbytes / sec / 1e9})
        print(f"  {op:<26} {provider:<10} n={n:<11} {sec * 1e3:9.3f} ms {nbytes / sec / 1e9:9.1f} GB/s", flush=True)

    for provider in providers:
        n = n_ref if provider == "reference" else n_op
        r = max(2, repeats // 4) if provider == "reference" else repeats
        x = torch.randn(n, device=device, generator=gen) * 1e-4
        xb = x.to(torch.bfloat16)
        codes = fp169.encode(x, backend=provider)
        out_codes = torch.empty_like(codes)
        out_f32 = torch.empty(n, device=device)
        out_bf16 = torch.empty(n, device=device, dtype=torch.bfloat16)
        grad = torch.randn(n, device=device, generator=gen)
        gradb = grad.to(torch.bfloat16)
        err = codes.clone()
        rows8 = fp169.encode(torch.randn(8, n // 8, device=device, generator=gen), backend=provider)  # n in all
        out_r = torch.empty(rows8.shape[1], dtype=torch.int16, device=device)
        kw = {"backend": provider}
        if provider != "reference":
            add("encode fp32->1-6-9", provider, n, 6 * n, lambda: fp169.encode(x, out=out_codes, **kw), r)
            add("encode bf16->1-6-9", provider, n, 4 * n, lambda: fp169.encode(xb, out=out_codes, **kw), r)
            add("decode 1-6-9->fp32", provider, n, 6 * n, lambda: fp169.decode(codes, out=out_f32, **kw), r)
            add("decode 1-6-9->bf16", provider, n, 4 * n,
                lambda: fp169.decode(codes, dtype=torch.bfloat16, out=out_bf16, **kw), r)
        else:
            add("encode fp32->1-6-9", provider, n, 6 * n, lambda: fp169.encode(x, **kw), r)
            add("decode 1-6-9->fp32", provider, n, 6 * n, lambda: fp169.decode(codes, **kw), r)
        add("error_add_ fp32 grad", provider, n, 8 * n, lambda: fp169.error_add_async_(err, grad, 8192.0, **kw), r)
        if provider != "reference":
            add("error_add_ bf16 grad", provider, n, 6 * n,
                lambda: fp169.error_add_async_(err, gradb, 8192.0, **kw), r)
            add("reduce_rows 8 -> 1", provider, rows8.numel(), 2 * rows8.numel() + 2 * rows8.shape[1],
                lambda: fp169.reduce_rows(rows8, 8.0, out=out_r, **kw), r)
        else:
            add("reduce_rows 8 -> 1", provider, rows8.numel(), 2 * rows8.numel() + 2 * rows8.shape[1],
                lambda: fp169.reduce_rows(rows8, 8.0, **kw), r)
        del x, xb, codes, out_codes, out_f32, out_bf16, grad, gradb, err, rows8, out_r

    # Baselines on the op size: plain copy (the ceiling) and torch's own fp16 casts.
    src = torch.randn(n_op, device=device, generator=gen)
    dst = torch.empty_like(src)
    h = src.to(torch.float16)  # random data: zeros can time faster than real data
    add("copy fp32 (ceiling)", "torch", n_op, 8 * n_op, lambda: dst.copy_(src))
    add("cast fp32->fp16", "torch", n_op, 6 * n_op, lambda: h.copy_(src))
    add("cast fp16->fp32", "torch", n_op, 6 * n_op, lambda: dst.copy_(h))
    # Write-only bandwidth: decode writes twice the bytes it reads, so its ceiling sits between this and the copy.
    add("fill fp32 (write only)", "torch", n_op, 4 * n_op, lambda: dst.fill_(1.0))
    del src, dst, h
    # An optimizer step on one fp32 tensor of n_op elements (a ZeRO partition): AdamW16 with 16-bit moments (the
    # paper's App. B.2; the fused op: one pass over parameter, gradient and codes) against torch's AdamW with fp32
    # moments.
    # Bytes at the floor: parameter read + write, gradient read, both moments read + write (2 or 4 bytes each).
    for moments, label in (("16bit", "AdamW16 step, 16-bit moments"), ("fp32", "torch AdamW step, fp32 moments")):
        param = torch.nn.Parameter(torch.randn(n_op, device=device, generator=gen))
        param.grad = torch.randn(n_op, device=device, generator=gen) * 1e-3
        opt = (AdamW16([param], lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045) if moments == "16bit" else
               torch.optim.AdamW([param], lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045))
        add(label, "adamw16" if moments == "16bit" else "torch", n_op, (20 if moments == "16bit" else 28) * n_op,
            opt.step)
        del param, opt
    copy_gbs = next(r["GB/s"] for r in rows if r["op"] == "copy fp32 (ceiling)")
    for row in rows:
        row["% copy"] = 100.0 * row["GB/s"] / copy_gbs
    return rows


# ---- underflow ------------------------------------------------------------------------------------------------------
def underflow_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    datasets = []
    mags = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-20), math.log(10.0), generator=g))
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    datasets.append(("log-uniform 1e-20..10", (mags * signs).float()))
    for std in (1e-3, 1e-6, 1e-9, 1e-12):
        datasets.append((f"gaussian std {std:g}", (torch.randn(n, dtype=torch.float64, generator=g) * std).float()))
    rows = []
    for name, x in datasets:
        x = x[x != 0]
        xd = x.double()
        quantized = {
            "fp16": x.half().double(),
            "bf16": x.bfloat16().double(),
            "1-6-9": fp169.decode(fp169.encode(x)).double(),
        }
        row = {"data": name, "n": x.numel()}
        for fmt, q in quantized.items():
            rel = (q - xd).abs() / xd.abs()
            row[f"{fmt} flushed"] = float((q == 0).double().mean())
            row[f"{fmt} mean rel err"] = float(rel.mean())
            row[f"{fmt} max rel err"] = float(rel.max())
            row[f"{fmt} norm rel err"] = float((q - xd).norm() / xd.norm())
        rows.append(row)
    return rows


# ---- reporting ------------------------------------------------------------------------------------------------------
def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "host": host_info(),
        "ops": fp169.op_status(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    else:
        env["device_name"] = f"CPU: {env['host']['host_cpu']}"
    return env


def render(env: dict, tput: list[dict], under: list[dict]) -> str:
    label = "CPU" if env["device"] == "cpu" else env.get("device_name", env["device"])
    head = (f"fp169 benchmark on {label} ({env['cpu_threads']} CPU threads), torch {env['torch']}, {env['date']}\n"
            f"{host_line(env['host'], env.get('host_end'))}\n"
            f"command: `{env['command']}`")
    t = md_table(
        ["op", "provider", "n", "median ms", "GB/s", "% copy"],
        [[r["op"], r["provider"], f"{r['n']:,}", f"{r['ms']:.3f}", f"{r['GB/s']:.1f}", f"{r['% copy']:.0f}%"]
         for r in tput],
    )
    fmts = ["fp16", "bf16", "1-6-9"]
    u = md_table(
        ["data"] + [f"{f} {k}" for f in fmts for k in ("flushed", "mean rel err")],
        [[r["data"]] + [s for f in fmts for s in (f"{100 * r[f'{f} flushed']:.2f}%", f"{r[f'{f} mean rel err']:.2e}")]
         for r in under],
    )
    above = [r["op"] for r in tput if r["% copy"] > 100]
    if above and env["device"] == "cpu":  # the copy's 2n bytes stream through DRAM; a row above it ran from cache
        head += ("\n\nAbove 100% of the copy (" + ", ".join(above) + "): on a CPU at this size the copy is no ceiling "
                 "(caches hold part of the data).")
    return (f"{head}\n\nThroughput (bytes counted once per input read and output written; "
            f"% of a same-size fp32 copy):\n\n{t}\n\nUnderflow (device independent):\n\n{u}\n")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=torch_device, choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    ap.add_argument("--n", type=positive_int, default=None, help="elements for the ops (default: 2^28 GPU, 2^22 CPU)")
    ap.add_argument("--repeats", type=positive_int, default=None)
    ap.add_argument("--underflow-n", type=positive_int, default=None)
    ap.add_argument("--out", type=out_prefix, default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/fp169_<device>_<date>.{json,md}")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        n_op = args.n or ((1 << 24) if args.quick else (1 << 28))
    else:
        n_op = args.n or ((1 << 20) if args.quick else (1 << 22))
    n_ref = min(n_op, (1 << 22) if gpu else (1 << 18) if args.quick else (1 << 20))
    repeats = args.repeats or (5 if args.quick else 20)
    under_n = args.underflow_n or (200_000 if args.quick else 2_000_000)

    st = _ext.load()
    providers = (["cuda"] if st["cuda"] else []) if gpu else (["cpp"] if st["cpu"] else [])
    providers.append("reference")
    env = environment(device)
    print(f"fp169 bench: device={device} providers={providers} n={n_op} (reference n={n_ref}) repeats={repeats}")
    tput = throughput_rows(device, n_op, n_ref, repeats, providers)
    print("underflow table ...", flush=True)
    env["host_end"] = host_info()
    under = underflow_rows(under_n)
    text = render(env, tput, under)
    result = {"env": env, "throughput": tput, "underflow": under,
              "sizes": {"n_op": n_op, "n_ref": n_ref, "repeats": repeats, "underflow_n": under_n}}
    paths = []
    if args.out:
        paths.append((Path(args.out + ".json"), Path(args.out + ".md")))
    if args.save:
        tag = device_tag(env["device_name"]) if gpu else "cpu"
        stem = Path(__file__).resolve().parent / "results" / f"fp169_{tag}_{_dt.date.today():%Y%m%d}"
        paths.append((stem.with_suffix(".json"), stem.with_suffix(".md")))
    for json_path, md_path in paths:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        md_path.write_text(text)
        print(f"wrote {json_path} and {md_path}")
    print()
    print(text)


if __name__ == "__main__":
    main()
