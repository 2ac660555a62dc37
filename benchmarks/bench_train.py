"""Training throughput of the prior on the real DeepSpeed engine: tokens/s, model TFLOP/s, MFU, peak memory and the
split of a step into forward / backward / optimizer / communication.

For every combination of ``--presets``, ``--zero``, ``--precision``, ``--checkpointing``, ``--compile`` (each
resblock under torch.compile, ``DALLE.compile_resblocks``; the warm-up steps then include Inductor's compile time,
so give it a few), ``--logits-matmul`` (the output heads' matmuls in IEEE fp32 or TF32, ``logits_matmul``) and
``--powersgd`` (0: DeepSpeed's own gradient reduction; R > 0: the hierarchical PowerSGD reducer at total rank R per
machine, ``dalle_ds.dist.deepspeed_powersgd``, with the machines from the hostnames or ``--powersgd-local-size``;
its compression rate and bytes per step go in the report) it
builds the DALL-E
prior (random weights, random token batches: throughput does not depend on the data), wraps it with
``deepspeed.initialize`` (AdamW, gradient clipping 4, the given ZeRO stage and precision), runs ``--warmup`` steps,
then times ``--steps`` steps (median step time), then profiles ``--profile-steps`` more under ``torch.profiler``.

* **tokens/s** = train_batch_size × S / step time, S = T + W² positions per sequence (256 + 1024 for the GPT-size
  presets).
* **model TFLOP/s** = useful FLOPs per step / step time, FLOPs from :mod:`dalle_ds.models.flops`:
  6 · Σ(matmul weights × positions they run on) + 12 · d_model · Σ_layers kept mask pairs, per sequence
  (Kaplan et al. 2020 §2.1 / PaLM App. B; attention on the sparse masks' kept (query, key) pairs only;
  activation-checkpointing recomputation not counted as useful: it is reported separately as ``hardware_flops``).
* **MFU** = model FLOP/s per device / the matmul rate measured in the same process: a square ``--matmul-size``
  torch.matmul in the run's dtype (8192 on GPU: the anchor shape; 1024 on CPU, 256 with ``--quick``), median of
  repeated calls, measured once per run and dtype (every case of a run shares it). This is an
  *achieved* peak, not the datasheet one (H100 SXM bf16: ≈ 798 measured vs 989 spec, research/kernel_anchors.md).
  On a CPU without native bf16 the bf16 matmul is emulated and much slower than fp32, so a CPU bf16 MFU says little.
* **peak memory**: ``torch.cuda.max_memory_allocated`` over the timed steps on GPU; on CPU the process's peak RSS
  (``resource.getrusage``: whole process lifetime, including Python, torch and DeepSpeed), labelled as such.
* **phases** from ``torch.profiler`` over the profiled steps: ``record_function`` ranges around the engine's forward,
  ``engine.backward`` and ``engine.step`` (on GPU each range ends with a device synchronize, so its CPU span is the
  device time of its work; the profiled steps are therefore not the timed ones). **communication** = the union of
  the time spans of collective ops seen by the profiler (``c10d::*``, ``gloo:*``/``nccl:*`` ops, NCCL kernels); it
  lies inside the phases (ZeRO-2 gradient reduce in backward, the parameter all-gather in the optimizer step), so it
  is reported beside them with its share in each, not added. One process exchanges nothing (DeepSpeed's
  all-reduces then run over a group of one; their small time is still what is shown).
* **time sinks** (:mod:`op_breakdown`, rank 0, the same profiled steps): the top kernels by device time on a GPU
  (top operators by self CPU time on a CPU), a split by category (matmul, attention, normalization, softmax / loss,
  optimizer, copies, communication, PowerSGD compression, other elementwise) and, on a GPU, how long the device sat
  idle in a step.
* **floors** (``dalle_ds.models.flops.training_step_parts``): the least time each part of a rank's step needs at
  the rates measured in the same process: resblock matmuls and attention at the matmul rate, the output heads at
  the fp32 matmul rate of their setting (IEEE or TF32: on a GPU several times slower than bf16), the optimizer's
  bytes (AdamW on fp32 master weights) at the copy bandwidth; their sum, and the MFU that sum would give. Set beside
  the profiled categories, they say which part is far from its floor.

Why the engine is built here rather than through ``DalleTrainer``: the trainer needs a data set, a tokenizer, a run
folder, an EMA and checkpoints, none of which is step throughput, and its ``train_step`` hides forward / backward /
step inside one call, so the phases could not be ranged without editing it. The model, the engine and the
DeepSpeed config keys are the same ones the trainer uses. Not timed: the EMA update and data loading.

    python benchmarks/bench_train.py --quick                                  # test preset on CPU, seconds
    deepspeed --num_gpus 2 benchmarks/bench_train.py --quick                  # 2 CPU ranks (DS_ACCELERATOR=cpu)
    deepspeed --num_gpus 4 benchmarks/bench_train.py --quick --zero 3 --powersgd 0,4 --powersgd-local-size 2
    deepspeed --num_gpus 1 benchmarks/bench_train.py --presets 125M,350M,1.3B --zero 2 --precision bf16 \
        --attn-backend triton --micro-batch 8 --out benchmarks/results/train_h100_<date> --trace /tmp/train_trace.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import itertools
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from dalle_ds.config import DALLE_PRESETS, ConfigError  # noqa: E402
from dalle_ds.models.dalle import DALLE  # noqa: E402
from dalle_ds.models.flops import count_flops, recompute_flops_per_sequence, training_step_parts  # noqa: E402
from dalle_ds.precision.tf32 import tf32_cuda_matmuls  # noqa: E402
from dalle_ds.train.distributed import (  # noqa: E402
    device as ds_device, distributed_run, rank, world_size)
from dalle_ds.train.ds_config import check_compile_supported  # noqa: E402
from op_breakdown import markdown as op_markdown, op_breakdown, union_us  # noqa: E402
from timing import (comma_list, copy_bytes_per_s, emit, host_info, host_line, int_at_least,  # noqa: E402
                    matmul_flops_per_s, nonnegative_int, out_prefix, positive_int)  # (benchmarks/timing.py)

PHASES = ("forward", "backward", "optimizer")
COMM_PREFIXES = ("c10d::", "gloo:", "nccl:", "record_param_comms")
COMM_KERNEL_MARKERS = ("nccl",)


# -- the engine --------------------------------------------------------------------------------------------------
def ds_config(zero: int, precision: str, micro_batch: int, grad_accum: int, torch_adam: bool,
              bucket: int | None = None) -> dict:
    """The DeepSpeed config of a benchmark case (here and in memory_check.py): the shipped configs' optimizer and
    clipping, no scheduler (a constant learning rate costs the same), no monitors. ``bucket``: ZeRO's reduce /
    all-gather (ZeRO-1/2) or reduce / prefetch (ZeRO-3) bucket in elements (default: 5e7 for ZeRO-1/2, DeepSpeed's
    own for ZeRO-3)."""
    zero_cfg: dict = {"stage": zero}
    if zero in (1, 2):
        zero_cfg.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=bucket or 50_000_000,
                        allgather_bucket_size=bucket or 50_000_000)
    if zero == 3 and bucket:
        zero_cfg.update(reduce_bucket_size=bucket, stage3_prefetch_bucket_size=bucket)
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": 4.0, "steps_per_print": 10**9, "wall_clock_breakdown": False,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.96], "eps": 1e-8,
                                                      "weight_decay": 0.045, "torch_adam": torch_adam}},
            "zero_optimization": zero_cfg, "bf16": {"enabled": precision == "bf16"}}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_step(engine, cfg, micro_batch: int, grad_accum: int, dev: torch.device, after_backward=None):
    g = torch.Generator(device="cpu").manual_seed(1234 + rank())
    batches = [(torch.randint(0, cfg.text_classes, (micro_batch, cfg.text_len), generator=g).to(dev),
                torch.randint(0, cfg.image_vocab_size, (micro_batch, cfg.image_len), generator=g).to(dev))
               for _ in range(grad_accum)]

    def step(sync_phases: bool = False) -> float:
        loss = None
        for text, image in batches:  # DeepSpeed: step() after every backward; it updates at the boundary only
            with record_function("bench/forward"):
                loss = engine(text, image).loss
                if sync_phases:
                    _sync(dev)
            with record_function("bench/backward"):
                engine.backward(loss)
                if after_backward is not None:  # ZeRO-0 PowerSGD reduces here (ZeRO 1-3: in DeepSpeed's hooks)
                    after_backward(None, 0)
                if sync_phases:
                    _sync(dev)
            with record_function("bench/optimizer"):
                engine.step()
                if sync_phases:
                    _sync(dev)
        return loss

    return step


# -- measurements ------------------------------------------------------------------------------------------------
def _overlap_us(spans: list[tuple[float, float]], within: list[tuple[float, float]]) -> float:
    """Time of the union of ``spans`` that lies inside the union of ``within``."""
    clipped = [(max(s, a), min(e, b)) for s, e in spans for a, b in within if min(e, b) > max(s, a)]
    return union_us(clipped)


def phase_split(prof, steps: int) -> dict:
    """Per-step milliseconds of the bench/* ranges and of collectives, from the profiler's events."""
    ranges: dict[str, list[tuple[float, float]]] = {p: [] for p in (*PHASES, "step")}
    comm: list[tuple[float, float]] = []
    comm_names: set[str] = set()
    for e in prof.events():
        name = e.name
        tr = e.time_range
        span = (float(tr.start), float(tr.end))
        is_device = "cuda" in str(e.device_type).lower()
        if name.startswith("bench/") and not is_device:
            key = name[len("bench/"):]
            if key in ranges:
                ranges[key].append(span)
        elif (not is_device and name.startswith(COMM_PREFIXES)) or \
                (is_device and any(m in name.lower() for m in COMM_KERNEL_MARKERS)):
            comm.append(span)
            comm_names.add(name)
    out = {f"{k}_ms": union_us(v) / 1e3 / steps for k, v in ranges.items()}
    out["communication_ms"] = union_us(comm) / 1e3 / steps
    out["communication_in_phase_ms"] = {p: _overlap_us(comm, ranges[p]) / 1e3 / steps for p in PHASES}
    out["other_ms"] = out["step_ms"] - sum(out[f"{p}_ms"] for p in PHASES)
    out["collective_ops"] = sorted(comm_names)
    return out


def peak_memory(dev: torch.device) -> tuple[int, str]:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated (timed steps)"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    return kb * 1024, "peak RSS of the process (ru_maxrss, whole lifetime)"


def trace_path(base: str, case: str, multi_case: bool) -> str:
    p = Path(base)
    stem = p.name[: -len(".json")] if p.name.endswith(".json") else p.name
    if multi_case:
        stem += f".{case}"
    if world_size() > 1:
        stem += f".rank{rank()}"
    return str(p.with_name(stem + ".json"))


_RATES: dict = {}


def _rate(key: tuple, measure) -> float:
    """A ceiling (matmul FLOP/s per dtype, copy bytes/s) measured once per process and ``key`` (the kind, device
    and size), on its first use: every case of a run is then divided by the same number. Measured per case, a small
    CPU matmul's rate moved 1.6x between two cases of one run (0.061 vs 0.096 TFLOP/s), and their MFUs with it."""
    if key not in _RATES:
        _RATES[key] = measure()
    return _RATES[key]


def run_case(preset: str, zero: int, precision: str, ckpt: bool, compiled: bool, logits: str, psgd_rank: int, args,
             dev: torch.device, multi_case: bool) -> dict:
    import types

    import deepspeed

    cfg = dataclasses.replace(DALLE_PRESETS[preset], attn_backend=args.attn_backend, activation_checkpointing=ckpt,
                              dropout=0.0, logits_matmul=logits).validate()
    case = (f"{preset}_z{zero}_{precision}_{'ckpt' if ckpt else 'nockpt'}" + ("_compiled" if compiled else "")
            + ("_tf32logits" if logits == "tf32" else "") + (f"_powersgd{psgd_rank}" if psgd_rank else ""))
    torch.manual_seed(0)  # identical weights on every rank
    with torch.device(dev):  # initialized where it trains: a 1.3B prior takes ~20 s to initialize on 2 CPU cores
        model = DALLE(cfg)
    if compiled:  # ZeRO-3 refused in parse_args
        model.compile_resblocks()
    n_params = sum(p.numel() for p in model.parameters())
    torch_adam = dev.type != "cuda" if args.torch_adam == "auto" else args.torch_adam == "on"
    conf = ds_config(zero, precision, args.micro_batch, args.grad_accum, torch_adam)
    psgd = None
    if psgd_rank:
        from dalle_ds.config import PowerSGDConfig
        from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
        psgd = PowerSGDExtension(PowerSGDConfig(enabled=True, rank=psgd_rank,
                                                local_size=args.powersgd_local_size).validate())
        psgd.before_initialize(model, conf)  # as EngineLoop does: hooks DeepSpeed's ZeRO optimizer class
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=conf)
    except BaseException:  # e.g. out of memory on one GPU: the next case must get DeepSpeed's own optimizer class
        if psgd is not None:
            psgd.restore_deepspeed()
        raise
    if psgd is not None:
        psgd.setup(types.SimpleNamespace(engine=engine, device=dev))
    step = make_step(engine, cfg, args.micro_batch, args.grad_accum, dev,
                     after_backward=psgd.after_backward if psgd is not None and zero == 0 else None)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mm_rate = _rate(("matmul", dtype, dev, args.matmul_size),
                    lambda: matmul_flops_per_s(dev, dtype, args.matmul_size, args.matmul_reps))
    head_kind = torch.float32 if logits == "fp32" else "tf32"  # the heads' fp32 matmuls, IEEE or on tensor cores

    def head_matmul():
        with tf32_cuda_matmuls() if logits == "tf32" else contextlib.nullcontext():
            return matmul_flops_per_s(dev, torch.float32, args.matmul_size, args.matmul_reps)

    head_rate = _rate(("matmul", head_kind, dev, args.matmul_size), head_matmul)
    copy_size = 2**30 if dev.type == "cuda" else 2**24 if args.quick else 2**27
    copy_bw = _rate(("copy", dev, copy_size), lambda: copy_bytes_per_s(dev, copy_size, args.matmul_reps))

    for _ in range(args.warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(args.steps):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    mem, mem_kind = peak_memory(dev)
    psgd_stats = psgd.stats() if psgd is not None else None  # since setup: warm-up and timed steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            with record_function("bench/step"):
                step(sync_phases=True)
                _sync(dev)
    phases = phase_split(prof, args.profile_steps)
    sinks = op_breakdown(prof.events(), args.profile_steps, phases["step_ms"])
    trace = None
    if args.trace:
        trace = trace_path(args.trace, case, multi_case)
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace)

    mine = {"step_s": step_s, "step_times_s": times, "peak_memory_bytes": mem, "matmul_flops_per_s": mm_rate,
            "head_matmul_flops_per_s": head_rate, "copy_bytes_per_s": copy_bw,
            "phases": phases, "time_sinks": sinks, "trace": trace}
    ranks = [None] * world_size()
    if world_size() > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    # DeepSpeed's gradient hooks keep the engine (and its optimizer state) alive after `del`: destroy() releases
    # them, so the next case's peak memory is its own
    engine.destroy()
    del engine, model, step
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    fc = count_flops(cfg)
    W = world_size()
    train_batch = args.micro_batch * args.grad_accum * W
    tokens_per_step = train_batch * cfg.seq_len
    flops_per_step = train_batch * fc.training_flops
    recompute = train_batch * recompute_flops_per_sequence(cfg) if ckpt else 0
    step_s = max(r["step_s"] for r in ranks)  # ranks wait for each other in the collectives: the slowest one
    mm = statistics.mean(r["matmul_flops_per_s"] for r in ranks)
    per_device = flops_per_step / step_s / W
    floor = step_floor(training_step_parts(cfg, args.micro_batch * args.grad_accum, n_params, precision, zero, W),
                       {"resblock matmuls": mm, "attention": mm,
                        "output heads": statistics.mean(r["head_matmul_flops_per_s"] for r in ranks),
                        "optimizer": statistics.mean(r["copy_bytes_per_s"] for r in ranks)})
    floor["mfu_at_floor"] = flops_per_step / W / (floor["step_ms"] / 1e3) / mm
    return {
        "case": case, "preset": preset, "zero": zero, "precision": precision, "activation_checkpointing": ckpt,
        "compiled": compiled, "logits_matmul": logits, "powersgd_rank": psgd_rank, "powersgd": psgd_stats,
        "attn_backend": args.attn_backend, "params": n_params, "seq_len": cfg.seq_len, "text_len": cfg.text_len,
        "image_tokens": cfg.image_len, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "world_size": W,
        "train_batch_size": train_batch, "tokens_per_step": tokens_per_step,
        "flops_per_sequence": fc.training_flops, "matmul_flops_per_sequence": fc.matmul_flops,
        "attention_flops_per_sequence": fc.attention_flops, "flops_per_step": flops_per_step,
        "hardware_flops_per_step": flops_per_step + recompute,
        "warmup_steps": args.warmup, "timed_steps": args.steps, "profiled_steps": args.profile_steps,
        "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
        "model_tflops_per_s": flops_per_step / step_s / 1e12, "model_tflops_per_s_per_device": per_device / 1e12,
        "matmul_tflops_per_s": mm / 1e12, "matmul_size": args.matmul_size, "mfu": per_device / mm,
        "hfu": (flops_per_step + recompute) / step_s / W / mm,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks), "peak_memory_kind": mem_kind,
        "phases": ranks[0]["phases"], "time_sinks": ranks[0]["time_sinks"], "floor": floor, "per_rank": ranks,
    }


def step_floor(parts: dict[str, dict], rates: dict[str, float]) -> dict:
    """Milliseconds each part of a step needs at its rate (FLOP/s for FLOPs, bytes/s for bytes), and their sum."""
    out = {}
    for part, work in parts.items():
        (unit, amount), = work.items()
        out[part] = {"work": amount, "unit": unit, "rate": rates[part], "ms": amount / rates[part] * 1e3}
    return {"parts": out, "step_ms": sum(v["ms"] for v in out.values())}


def floor_markdown(rows: list[dict]) -> list[str]:
    """One line per case: each part's floor, their sum against the measured step, and the profiled categories."""
    lines = ["## Floors: each part of a step at the rates measured in the run", "",
             "Per rank and step: resblock matmuls and attention (kept pairs) at the matmul rate, the output heads at "
             "the fp32 matmul rate of their setting (IEEE or TF32), the optimizer's bytes (AdamW on fp32 master "
             "weights, `dalle_ds.models.flops.training_step_parts`) at the copy bandwidth. Norms, elementwise work, "
             "the loss and communication have no floor here; the profiled columns are the time sinks' categories.",
             "", "| case | resblock matmuls ms | heads ms | attention ms | optimizer ms | floor step ms | step ms "
             "| MFU at the floor | profiled matmul / attention / optimizer ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        f, cats = r["floor"], r["time_sinks"]["categories"]
        ms = [f["parts"][p]["ms"] for p in ("resblock matmuls", "output heads", "attention", "optimizer")]
        prof = " / ".join(f"{cats.get(c, 0.0):.3g}" for c in ("matmul", "attention", "optimizer"))
        lines.append(f"| {r['case']} | " + " | ".join(f"{m:.3g}" for m in ms)
                     + f" | {f['step_ms']:.3g} | {1e3 * r['step_s']:.4g} | {100 * f['mfu_at_floor']:.1f}% | {prof} |")
    return lines + [""]


# -- report ------------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [f"# bench_train on {result['device_name']} ({result['device']}, {result['world_size']} rank(s))", "",
             f"{result['date']}; torch {result['torch']}, deepspeed {result['deepspeed']}; "
             f"{result['threads']} CPU thread(s) per rank. Command: `{result['command']}`", "",
             host_line(result["host"], result.get("host_end")), "",
             *([f"**Note:** {result['note']}", ""] if result.get("note") else []),
             "Model FLOPs = 6·Σ(matmul weights × positions) + 12·d·Σ_layers(kept mask pairs) per sequence "
             "(dalle_ds/models/flops.py; recomputation not counted); MFU against the "
             "matmul rate measured in the same run; HFU counts the checkpointed forward's recomputation too. "
             "Random weights and tokens.", "",
             "| case | params | batch×S | step ms | tokens/s | model TFLOP/s/dev | matmul TFLOP/s | MFU | HFU | "
             f"peak mem GiB ({'allocated' if result['device'] == 'cuda' else 'RSS'}) | fwd ms | bwd ms | opt ms | "
             "comm ms | other ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in result["rows"]:
        ph = r["phases"]
        lines.append(
            f"| {r['case']} | {r['params'] / 1e6:.3g}M | {r['train_batch_size']}×{r['seq_len']} | "
            f"{1e3 * r['step_s']:.4g} | {r['tokens_per_s']:.4g} | {r['model_tflops_per_s_per_device']:.3g} | "
            f"{r['matmul_tflops_per_s']:.3g} | {100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% | "
            f"{r['peak_memory_bytes'] / 2**30:.3g} | "
            f"{ph['forward_ms']:.3g} | {ph['backward_ms']:.3g} | {ph['optimizer_ms']:.3g} | "
            f"{ph['communication_ms']:.3g} | {ph['other_ms']:.3g} |")
    psgd = [r for r in result["rows"] if r.get("powersgd")]
    if psgd:
        lines += ["", "PowerSGD (bytes per step and rank, averaged over the warm-up and timed steps):", "",
                  "| case | compression rate | bytes sent | across machines | fp32 rest | fp32 ring all-reduce of "
                  "everything | skipped steps |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in psgd:
            s = r["powersgd"]
            lines.append(f"| {r['case']} | {s.get('powersgd/compression_rate', float('nan')):.4f} | "
                         f"{s.get('powersgd/bytes_sent', 0):,.0f} | {s.get('powersgd/bytes_inter_machine', 0):,.0f} | "
                         f"{s.get('powersgd/bytes_uncompressed', 0):,.0f} | "
                         f"{s.get('powersgd/bytes_baseline_fp32', 0):,.0f} | {s['powersgd/skipped_steps']:.0f} |")
    lines += ["", "Phases are per step from torch.profiler over the profiled steps (phase-synchronised, so their "
                  "step time differs from the timed one); communication is the union of collective spans and lies "
                  "inside the phases, not beside them. " + result["memory_note"]]
    if result["world_size"] == 1:
        lines.append("One rank: nothing is exchanged; the collectives DeepSpeed still calls (e.g. the gradient-norm "
                     "all-reduce) run over a group of one and are what the comm column shows.")
    lines += ["", *floor_markdown(result["rows"])]
    lines += ["## Time sinks (rank 0, profiled steps)", "",
              "Operators by self time (time in an op minus the ops it called): the communication here is the "
              "collectives' own time, while the phase table's comm column is the wall-clock union of their spans.", ""]
    for r in result["rows"]:
        lines += op_markdown(r["case"], r["time_sinks"])
    if result.get("errors"):
        lines += ["## Failed cases", ""] + [f"- {e['case']}: {e['error']}" for e in result["errors"]] + [""]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", type=comma_list(DALLE_PRESETS), default=None, help="comma list of DALLE_PRESETS (default: 125M; --quick: test)")
    p.add_argument("--quick", action="store_true", help="test preset, tiny step counts: checks the harness")
    p.add_argument("--zero", type=comma_list((0, 1, 2, 3), int), default="2", help="ZeRO stage(s), comma list of 0-3")
    p.add_argument("--precision", type=comma_list(("fp32", "bf16")), default=None, help="fp32 and/or bf16 (DeepSpeed bf16 mode), comma list "
                                                     "(default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--checkpointing", type=comma_list(("off", "on")), default="off", help="activation checkpointing: off, on or off,on")
    p.add_argument("--compile", type=comma_list(("off", "on")), default="off", help="torch.compile each resblock: off, on or off,on (ZeRO 0-2)")
    p.add_argument("--logits-matmul", type=comma_list(("fp32", "tf32")), default="fp32", help="the output heads' matmuls: fp32 (IEEE), tf32 (CUDA "
                   "tensor cores) or fp32,tf32")
    p.add_argument("--powersgd", type=comma_list(item=int_at_least(0), what="ranks ≥ 0"), default="0",
                   help="PowerSGD total rank per machine, comma list; 0: DeepSpeed's own reduction (e.g. 0,896)")
    p.add_argument("--powersgd-local-size", type=nonnegative_int, default=0,
                   help="ranks per machine for PowerSGD (0: from the hostnames; 2 on a 4-rank box emulates 2 machines)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "triton", "flex", "sdpa", "dense"])
    p.add_argument("--micro-batch", type=positive_int, default=None, help="sequences per rank per micro-step")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--warmup", type=nonnegative_int, default=None)
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps")
    p.add_argument("--profile-steps", type=positive_int, default=None)
    p.add_argument("--matmul-size", type=positive_int, default=None,
                   help="n of the n×n×n matmul (GPU 8192, CPU 1024; --quick 256)")
    p.add_argument("--matmul-reps", type=positive_int, default=None)
    p.add_argument("--torch-adam", default="auto", choices=["auto", "on", "off"],
                   help="torch.optim.AdamW instead of DeepSpeed's FusedAdam (auto: on CPU only)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads per rank")
    p.add_argument("--trace", default=None, help="write a Chrome trace of the profiled steps (FILE[.case][.rankN].json)")
    p.add_argument("--out", type=out_prefix, default=None, help="write OUT.md and OUT.json (rank 0)")
    p.add_argument("--note", default=None, help="a line saying what the run is (goes into OUT.md and OUT.json)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    q = args.quick
    args.presets = args.presets or ["test" if q else "125M"]
    args.precision = args.precision or ["bf16" if cuda else "fp32"]
    args.checkpointing = [c == "on" for c in args.checkpointing]
    co = args.compile
    if "on" in co:
        for z in args.zero:
            try:
                check_compile_supported({"zero_optimization": {"stage": z}})
            except ConfigError as e:
                p.error(f"--compile on does not combine with --zero {z}: {e}")
    args.compile = [c == "on" for c in co]
    args.micro_batch = args.micro_batch or (4 if q else (8 if cuda else 1))
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 5)
    args.steps = args.steps or (3 if q else 10)
    args.profile_steps = args.profile_steps or (2 if q else 3)
    args.matmul_size = args.matmul_size or (8192 if cuda else (256 if q else 1024))
    args.matmul_reps = args.matmul_reps or (3 if q else 10)
    return args


def main(argv=None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with distributed_run():
        return _run(args, argv)


def _run(args, argv: list[str]) -> dict | None:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = ds_device()
    host_start = host_info()  # eager step times include the host's launch path: how busy were the CPUs?
    cases = list(itertools.product(args.presets, args.zero, args.precision, args.checkpointing, args.compile,
                                   args.logits_matmul, args.powersgd))
    rows, errors = [], []
    for case in cases:
        try:
            rows.append(run_case(*case, args, dev, len(cases) > 1))
        except Exception as e:  # one GPU, e.g. out of memory at the largest preset: keep the other cases
            if world_size() > 1:  # the other ranks may be waiting in a collective: fail the run
                raise
            errors.append({"case": "/".join(map(str, case)), "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"{errors[-1]['case']}: FAILED: {errors[-1]['error']}", flush=True)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        r = rows[-1]
        if rank() == 0:
            print(f"{r['case']}: {1e3 * r['step_s']:.4g} ms/step, {r['tokens_per_s']:.4g} tokens/s, "
                  f"{r['model_tflops_per_s_per_device']:.3g} TFLOP/s/device, MFU {100 * r['mfu']:.1f}%", flush=True)
            if args.out:  # the report so far, rewritten after every case: a run stopped by a time limit keeps it
                result = _report(rows, errors, args, argv, dev, host_start)
                emit(result, markdown(result), args.out, show=False)
    if rank() != 0:
        return None
    result = _report(rows, errors, args, argv, dev, host_start)
    return emit(result, markdown(result), args.out)


def _report(rows: list[dict], errors: list[dict], args, argv: list[str], dev: torch.device,
            host_start: dict) -> dict:
    import deepspeed

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else host_start["host_cpu"]
    mem_kind = rows[0]["peak_memory_kind"] if rows else "n/a"
    launcher = "deepspeed" if "LOCAL_RANK" in os.environ and world_size() > 1 else "python"
    return {"bench": "train", "device": dev.type, "device_name": name, "world_size": world_size(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([launcher if launcher == "python" else f"deepspeed --num_gpus {world_size()}",
                                 "benchmarks/bench_train.py",
                                 shlex.join(a for a in argv if not a.startswith("--local_rank"))]),
            "flop_formula": "per sequence: 6*sum(matmul weights x positions they run on) + "
                            "12*d_model*sum_layers(kept mask pairs); see dalle_ds/models/flops.py",
            "memory_note": f"Peak memory: {mem_kind}, max over ranks.",
            "host": host_start, "host_end": host_info(), "note": args.note,
            "rows": rows, "errors": errors}


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    report = main()
    exit_process(1 if report and report["errors"] else 0)  # rank 0 says whether a case failed
