"""What the attention kernels' loops cost per tile, read from their sm_90 machine code, compiled on a CPU (no GPU).

Each kernel (forward, dK/dV, dQ, fused dK/dV/dQ) is compiled ahead of time for an H100 (``triton.compile`` with
``GPUTarget("cuda", 90, 32)``, the wheel's ptxas), disassembled with the wheel's ``cuobjdump``, and its tile loop
(the backward branch's span) counted: instructions per thread per visited tile, split into the path every tile runs
and the block only PARTIAL tiles enter (the in-tile mask), with the instructions that set the pace (HGMMA: Hopper
tensor-core matmuls; MUFU: exp2 on the special-function units; BAR / DEPBAR: barriers and waits on async copies).

Beside them, the same counts for a minimal causal FlashAttention-2 forward written here (full tiles, no visit list,
no mask), compiled with the same tiles: the cost of the loop with nothing specific to this project. If the
project's forward pays per FULL tile what the minimal loop pays, its distance from SDPA causal on a GPU is not in the
loop body (it is in the number of tiles per program, occupancy, load latency, launch costs: a profile tells).

    python benchmarks/attn_sass.py                       # the paper's geometry (T 256, W 32), 64x64 tiles, bf16
    python benchmarks/attn_sass.py --kernels fwd --masks row,conv --tiles 128x64x8x2 --out /tmp/sass

Counts are static (one pass through the loop body), not timings; they depend on the triton version (printed).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_ds.ops.attention import MaskSpec  # noqa: E402
from dalle_ds.ops.attention import triton_backend as tb  # noqa: E402
from dalle_ds.ops.attention.layouts import block_layout  # noqa: E402
from dalle_ds.ops.attention.triton_backend import Config  # noqa: E402
from timing import comma_list, emit, out_prefix  # noqa: E402  (benchmarks/timing.py)

KERNELS = ("fwd", "dkdv", "dq", "dkdv_dq")
MASKS = ("causal", "row", "column", "conv")
PACE = ("HGMMA", "MUFU", "BAR", "DEPBAR", "LDGSTS", "SHFL")


# ---- ahead-of-time compilation ---------------------------------------------------------------------------------
def compile_sm90(fn, constexprs: dict, dtype: str = "bf16", num_warps: int = 4, num_stages: int = 3):
    """``triton.compile`` of ``fn`` for sm_90 with the argument types the launchers pass (pointers and strides
    16-divisible, as on a GPU, so loads vectorize); raises TypeError/KeyError/AttributeError when this triton's
    ahead-of-time API differs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "position" and constexprs.get("POSITION_IN_MEMORY"):  # read from a one-element tensor
            sig[name] = "*i64"
        elif name.startswith("stride") or name in ("H", "position"):
            sig[name] = "i32"
        elif name in ("Lse", "Delta") or (name == "DQ" and "FUSE_DQ" in constexprs):  # the fused path's dQ: fp32
            sig[name] = "*fp32"
        elif name.endswith(("Index", "Full", "Count", "Table")):
            sig[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:  # Q, K, V, Out, DO, DK, DV, DQ
            sig[name] = "*" + dtype
        if sig[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})


def _cuobjdump(compiled, flag: str) -> str | None:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _res_usage(compiled, field: str) -> int | None:
    m = re.search(field + r":(\d+)", _cuobjdump(compiled, "-res-usage") or "")
    return int(m.group(1)) if m else None


def spill_bytes(compiled) -> int | None:
    """Stack bytes from ``cuobjdump -res-usage`` (0 = no register spills); None without cuobjdump."""
    return _res_usage(compiled, "STACK")


def registers(compiled) -> int | None:
    """Registers per thread from ``cuobjdump -res-usage``; None without cuobjdump."""
    return _res_usage(compiled, "REG")


def kernel_constexprs(name: str, spec: MaskSpec, cfg: Config, head_dim: int = 64) -> dict:
    """The constexprs the launcher passes to kernel ``name`` for ``spec`` at tiles ``cfg`` (bf16)."""
    lay = block_layout(spec, cfg.block_m, cfg.block_n, "kernel", "cpu")
    by_key_block = name in ("dkdv", "dkdv_dq")
    out = dict(tb._geometry(spec, torch.bfloat16, head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
               SLOTS=tb._slots(lay.q_index if by_key_block else lay.kv_index))
    if by_key_block:
        out["FUSE_DQ"] = name == "dkdv_dq"
    return out


def kernel_fn(name: str):
    k = tb._kernels()
    return {"fwd": k._attn_fwd, "dkdv": k._attn_bwd_dkdv, "dkdv_dq": k._attn_bwd_dkdv, "dq": k._attn_bwd_dq}[name]


# ---- the loop in the machine code ------------------------------------------------------------------------------
def _instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without predicate) of every instruction in a cuobjdump -sass listing."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def loop_counts(compiled) -> dict | None:
    """The longest loop (a backward branch's span) of the kernel: instructions, those in its largest forward-branch
    block (the PARTIAL-only mask code in these kernels), and the pace-setting opcodes; also the instructions outside
    that loop (set-up before it, including the software pipeline's first loads, and the epilogue after it: paid once
    per program, however few tiles it visits); None without cuobjdump."""
    sass = _cuobjdump(compiled, "-sass")
    if sass is None:
        return None
    ins = _instructions(sass)
    while ins and _opcode(ins[-1][1]) in ("NOP", "BRA"):  # the padding after the final EXIT
        ins.pop()
    at = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in at:
            lo = at[int(m.group(1), 16)]
            if best is None or i - lo > best[1] - best[0]:
                best = (lo, i)
    if best is None:
        return {"loop": 0, "partial_only": 0, "outside_loop": len(ins), **{op: 0 for op in PACE}}
    lo, hi = best
    body = ins[lo:hi + 1]
    block = 0
    for j, (addr, text) in enumerate(body):  # forward branches inside the loop: the block each one skips
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and addr < int(m.group(1), 16) <= body[-1][0] and text.startswith("@"):
            target = at[int(m.group(1), 16)]
            block = max(block, target - (lo + j) - 1)
    ops = Counter(_opcode(t) for _, t in body)
    return {"loop": len(body), "partial_only": block, "outside_loop": len(ins) - len(body),
            **{op: ops[op] for op in PACE}}


# ---- a minimal FlashAttention-2 forward, the yardstick ---------------------------------------------------------
def _plain_forward():
    import triton
    import triton.language as tl

    @triton.jit
    def _plain_fa2_fwd(Q, K, V, Out, Lse, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, H, qk_scale,
                       N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Causal attention over the key tiles strictly below the diagonal (full tiles only: the yardstick's loop
        has no mask code), online softmax in base 2, the scale folded into exp2's argument."""
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :])
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        K_base = K + b * stride_kb + h * stride_kh
        V_base = V + b * stride_vb + h * stride_vh
        for start_n in range(0, pid_m * BLOCK_M, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_d[None, :])
            s = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                 out.to(Out.dtype.element_ty))
        tl.store(Lse + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i))

    return _plain_fa2_fwd


# ---- the report ------------------------------------------------------------------------------------------------
def _row(kernel: str, mask: str, cfg: Config, compiled) -> dict:
    counts = loop_counts(compiled) or {}
    meta = compiled.metadata
    return {"kernel": kernel, "mask": mask, "tiles": f"{cfg.block_m}x{cfg.block_n}", "warps": cfg.num_warps,
            "stages": cfg.num_stages, "registers": registers(compiled),
            "shared_kb": round(getattr(meta, "shared", 0) / 1024, 1), "spill_bytes": spill_bytes(compiled),
            "full_path": counts.get("loop", 0) - counts.get("partial_only", 0), **counts}


def run(kernels=KERNELS, masks=MASKS, tiles: Config = Config(64, 64, 4, 3), text_len: int = 256,
        grid: int = 32, head_dim: int = 64) -> dict:
    import triton

    rows = []
    for kernel in kernels:
        for mask in masks:
            spec = MaskSpec(mask, text_len, grid)
            compiled = compile_sm90(kernel_fn(kernel), kernel_constexprs(kernel, spec, tiles, head_dim),
                                    num_warps=tiles.num_warps, num_stages=tiles.num_stages)
            rows.append(_row(kernel, mask, tiles, compiled))
    n = text_len + grid * grid
    plain = compile_sm90(_plain_forward(), dict(N=n, HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n),
                         num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    rows.append(_row("minimal FA2 fwd", "causal, full tiles", tiles, plain))
    return {"triton": triton.__version__, "target": "sm_90", "text_len": text_len, "grid": grid,
            "head_dim": head_dim, "date": datetime.date.today().isoformat(), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# Attention kernel loops in sm_90 machine code (triton {result['triton']}, T {result['text_len']}, "
             f"W {result['grid']}, head dim {result['head_dim']}, bf16)", "",
             "Per thread, one pass through the tile loop: `full path` is what a FULL tile runs, `partial only` the "
             "in-tile mask block that PARTIAL tiles add; `outside loop` the instructions a program runs once (set-up, "
             "the pipeline's first loads, epilogue). Compiled on a CPU, no GPU: static counts, not timings."
             + (f" {result['date']}, `{result['command']}`." if "command" in result else ""), "",
             "| kernel | mask | tiles | warps | stages | regs | shared KB | spills B | loop | full path | partial only "
             "| outside loop | " + " | ".join(PACE) + " |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(PACE)]
    for r in result["rows"]:
        lines.append(f"| {r['kernel']} | {r['mask']} | {r['tiles']} | {r['warps']} | {r['stages']} | {r['registers']} "
                     f"| {r['shared_kb']} | {r['spill_bytes']} | {r.get('loop', '-')} | {r['full_path']} "
                     f"| {r.get('partial_only', '-')} | {r.get('outside_loop', '-')} | "
                     + " | ".join(str(r.get(op, "-")) for op in PACE) + " |")
    return "\n".join(lines) + "\n"


def _tiles(text: str) -> Config:
    try:
        m, n, w, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tiles are BLOCK_MxBLOCK_NxWARPSxSTAGES, e.g. 64x64x4x3; got {text!r}")
    if min(m, n, w, s) < 1:
        raise argparse.ArgumentTypeError(f"every tile number must be >= 1, got {text!r}")
    return Config(m, n, w, s)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", type=comma_list(KERNELS), default=list(KERNELS), help=f"comma list of {KERNELS}")
    p.add_argument("--masks", type=comma_list(MASKS), default=list(MASKS), help=f"comma list of {MASKS}")
    p.add_argument("--tiles", type=_tiles, default=Config(64, 64, 4, 3), help="BLOCK_MxBLOCK_NxWARPSxSTAGES")
    p.add_argument("--out", type=out_prefix, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if tb.interpreted():
        p.error("unset TRITON_INTERPRET: the interpreter cannot compile for sm_90")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args.kernels, args.masks, args.tiles)
    result["command"] = " ".join(["python", "benchmarks/attn_sass.py", *(argv if argv is not None else sys.argv[1:])])
    return emit(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
