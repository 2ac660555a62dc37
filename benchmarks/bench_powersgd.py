"""Hierarchical PowerSGD: bytes and time per reduction, orthogonalization, and a side-by-side with torch's hook.

Three parts (all on gloo processes of this machine; ``--parts`` picks):

* ``reduce``: the gradients of a prior preset, 4 ranks as 2 machines x 2 GPUs. Per step and rank: bytes sent inside
  the machine (fp32 reduce-scatter + all-gather; ``powersgd_bf16``: bf16 gradients, which travel as bf16; under
  ZeRO-3, ``powersgd_zero3``, the all-gather is replaced by an all-to-all of each rank's partition pieces and the
  uncompressed rest is reduce-scattered), across machines (P and Q' in 1-6-9), for the uncompressed rest
  (fp32), against a plain fp32 ring all-reduce of everything; the median time of one reduction of each kind; the
  compression rate of the resblock matrices against the formula 1 - r (m + 3) / (3 d m) for this model (fused qkv;
  see tests/test_powersgd.py) and the paper's 1 - r (m + 2) / (2 d m) for separate q, k, v (E.1, Table 2).
* ``orth``: Householder (ours, torch ops) vs ``torch.linalg.qr`` vs modified Gram-Schmidt on P shapes [n, r]: time,
  and the orthogonality error max|P^T P - I| on a well-conditioned P and on an ill-conditioned one (condition number
  1e6 in fp32), where Gram-Schmidt's loss of orthogonality shows (the paper's reason for Householder, E.2).
* ``ddp``: the same small prior trained for the same steps on a synthetic caption -> codes task by (a) DDP with the
  plain all-reduce, (b) DDP with torch's ``powerSGD_hook`` (flat, unsharded, warm-started Q, rank = our per-GPU rank),
  (c) the hierarchical reducer (2 machines x 2 GPUs): final loss, bytes per step per rank, seconds per step.

On a 2-core CPU the 4 processes share two cores: times say little about a cluster; bytes and losses do.

    python benchmarks/bench_powersgd.py --out benchmarks/results/powersgd_cpu_<date>
    python benchmarks/bench_powersgd.py --quick        # seconds: checks the harness
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_ds.config import DALLE_PRESETS, PowerSGDConfig  # noqa: E402
from dalle_ds.dist.local_ranks import run_local_ranks  # noqa: E402
from dalle_ds.dist.orthogonalize import ORTHOGONALIZERS  # noqa: E402
from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings, fp32_ring_bytes  # noqa: E402
from dalle_ds.dist.topology import Topology  # noqa: E402
from dalle_ds.models.dalle import DALLE  # noqa: E402
from timing import comma_list, emit, int_at_least, out_prefix, positive_int, time_fn  # noqa: E402  (benchmarks/timing.py)

WORLD, LOCAL = 4, 2


def _model(preset: str, **over) -> DALLE:
    torch.manual_seed(0)
    return DALLE(dataclasses.replace(DALLE_PRESETS[preset], **over))


def _reducer(model, rank_total: int, start_step: int = 0) -> HierarchicalPowerSGD:
    import re
    red = HierarchicalPowerSGD(Topology.build(LOCAL), PowerSGDSettings(rank=rank_total, start_step=start_step))
    for n, p in model.named_parameters():
        if re.search(PowerSGDConfig().compress, n):
            red.register(n, p.shape)
    return red


# -- reduce ----------------------------------------------------------------------------------------------------------
def _reduce_part(rank, world, preset, rank_total, repeats):
    model = _model(preset)
    d, m = model.cfg.d_model, LOCAL
    g = torch.Generator().manual_seed(rank)
    grads = [(n, torch.randn(p.shape, generator=g) * 1e-3) for n, p in model.named_parameters()]
    out = {}
    kinds = (("powersgd", 0), ("powersgd_bf16", 0), ("powersgd_zero3", 0), ("fp32_allreduce", 10 ** 9))
    for kind, start in kinds:
        red = _reducer(model, rank_total, start_step=start)
        reports = []

        def once():
            # powersgd_bf16: bf16 gradients (DeepSpeed's bf16 mode), sent inside the machine as bf16
            work = [(n, t.to(torch.bfloat16) if kind == "powersgd_bf16" else t.clone()) for n, t in grads]
            if kind == "powersgd_zero3":  # the ZeRO-3 contract: this rank's partitions, no all-gather
                reports.append(red.reduce_partitions_(work, step=0)[0])
            else:
                reports.append(red.reduce_(work, step=0))
        seconds = time_fn(once, torch.device("cpu"), repeats=repeats, warmup=1)
        rep = reports[-1]
        out[kind] = {"seconds": seconds, "bytes_intra": rep.bytes_intra, "bytes_inter": rep.bytes_inter,
                     "bytes_uncompressed": rep.bytes_uncompressed, "bytes_baseline": rep.bytes_baseline,
                     "shard_elements": rep.shard_elements, "factor_elements": rep.factor_elements}
    p = out["powersgd"]
    k = rank_total // m
    out["model"] = {"preset": preset, "d_model": d, "n_layers": model.cfg.n_layers,
                    "parameters": sum(t.numel() for _, t in grads)}
    out["rank_per_machine"], out["rank_per_gpu"], out["gpus_per_machine"] = rank_total, k, m
    out["compression_rate_measured"] = 1 - p["factor_elements"] / p["shard_elements"]
    out["compression_rate_formula_fused_qkv"] = 1 - rank_total * (m + 3) / (3 * d * m)
    out["compression_rate_paper_separate_qkv"] = 1 - rank_total * (m + 2) / (2 * d * m)
    return out


# -- orthogonalization -----------------------------------------------------------------------------------------------
def _ill_conditioned(n, r, cond, gen):
    u, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)
    return ((u * s) @ v.t()).float()


def orth_part(shapes, repeats):
    """Timed on one CPU thread, as the report says (the parent process otherwise has torch's default count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _orth_rows(shapes, repeats)
    finally:
        torch.set_num_threads(threads)


def _orth_rows(shapes, repeats):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, r in shapes:
        well = torch.randn(n, r, generator=gen)
        ill = _ill_conditioned(n, r, 1e6, gen)
        for name, fn in ORTHOGONALIZERS.items():
            eye = torch.eye(r)
            err = {tag: float((fn(p).t() @ fn(p) - eye).abs().max()) for tag, p in (("well", well), ("ill", ill))}
            secs = time_fn(lambda: fn(well), torch.device("cpu"), repeats=repeats)
            rows.append({"n": n, "r": r, "method": name, "seconds": secs, "orth_error_well": err["well"],
                         "orth_error_cond1e6": err["ill"]})
    return rows


# -- DDP side by side ------------------------------------------------------------------------------------------------
def _batch(cfg, step, rank, batch):
    """Captions of random words; image code i = (first word + i) mod vocab: learnable from the text."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    text = torch.randint(2, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
    image = (text[:, 1:2] + torch.arange(cfg.image_len)) % cfg.image_vocab_size
    return text, image


def _ddp_part(rank, world, mode, preset, over, steps, batch, rank_total):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ph
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model(preset, **over)
    cfg = model.cfg
    counted = {"bytes": 0}
    real_all_reduce = dist.all_reduce
    red = None
    if mode == "ours":
        red = _reducer(model, rank_total)
        net = model
    else:
        net = DDP(model)
        if mode == "torch_hook":
            def counting(t, *a, **k):  # the hook's P and Q all-reduces (fp32) are Python calls
                counted["bytes"] += fp32_ring_bytes(t.numel(), WORLD)
                return real_all_reduce(t, *a, **k)
            ph.dist.all_reduce = counting  # ph.dist is torch.distributed itself: the loss average below bypasses it
            state = ph.PowerSGDState(process_group=None, matrix_approximation_rank=rank_total // LOCAL,
                                     start_powerSGD_iter=2, min_compression_rate=1.0, random_seed=0)
            net.register_comm_hook(state, ph.powerSGD_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.96))
    losses, t0, nbytes, intra = [], None, 0, 0
    for step in range(steps):
        if step == 2:
            t0, counted["bytes"] = time.perf_counter(), 0
        text, image = _batch(cfg, step, rank, batch)
        loss = net(text, image).loss
        loss.backward()
        if red is not None:
            rep = red.reduce_([(n, p.grad) for n, p in model.named_parameters()], step=step)
            if step >= 2:  # the fp32 rest is a world all-reduce: it crosses machines too
                nbytes += rep.bytes_inter + rep.bytes_uncompressed
                intra += rep.bytes_intra
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.detach().clone()
        real_all_reduce(avg)  # not the hook's traffic: not counted
        losses.append(float(avg) / WORLD)
    seconds = (time.perf_counter() - t0) / (steps - 2)
    if mode == "ddp":
        nbytes = fp32_ring_bytes(sum(p.numel() for p in model.parameters()), WORLD) * (steps - 2)
    elif mode == "torch_hook":
        nbytes = counted["bytes"]
        ph.dist.all_reduce = real_all_reduce
    tail = losses[-5:]
    return {"mode": mode, "final_loss": sum(tail) / len(tail), "first_loss": losses[0],
            "bytes_per_step": nbytes / (steps - 2), "bytes_inside_machine_per_step": intra / (steps - 2),
            "seconds_per_step": seconds}


# -- report ----------------------------------------------------------------------------------------------------------
def _markdown(res: dict) -> str:
    lines = [f"# PowerSGD benchmark ({res['date']}, {res['device']})", "", f"Command: `{res['command']}`", ""]
    if "reduce" in res:
        r = res["reduce"]
        lines += [f"## One reduction of the {r['model']['preset']} prior's gradients "
                  f"(d_model {r['model']['d_model']}, {r['model']['parameters']:,} parameters), "
                  f"2 machines x 2 ranks, rank {r['rank_per_machine']} per machine", "",
                  "| reduction | seconds (median) | bytes inside machine | bytes across machines | "
                  "bytes fp32 rest | fp32 ring all-reduce of everything |", "|---|---|---|---|---|---|"]
        for kind in ("fp32_allreduce", "powersgd", "powersgd_bf16", "powersgd_zero3"):
            x = r[kind]
            lines.append(f"| {kind} | {x['seconds']:.4f} | {x['bytes_intra']:,} | {x['bytes_inter']:,} | "
                         f"{x['bytes_uncompressed']:,} | {x['bytes_baseline']:,} |")
        lines += ["", f"Compression rate of the resblock matrices: measured {r['compression_rate_measured']:.4f}, "
                  f"formula for this model (fused qkv) {r['compression_rate_formula_fused_qkv']:.4f}, the paper's "
                  f"accounting with separate q, k, v {r['compression_rate_paper_separate_qkv']:.4f}.", ""]
    if "orth" in res:
        lines += ["## Orthogonalization of P [n, r] (fp32, one thread)", "",
                  "| n | r | method | seconds | max abs(PᵀP − I), well-conditioned | same, condition 1e6 |",
                  "|---|---|---|---|---|---|"]
        for x in res["orth"]:
            lines.append(f"| {x['n']} | {x['r']} | {x['method']} | {x['seconds']:.5f} | {x['orth_error_well']:.2e} |"
                         f" {x['orth_error_cond1e6']:.2e} |")
        lines.append("")
    if "ddp" in res:
        d = res["ddp"]
        lines += [f"## Training side by side: {d['steps']} steps, batch {d['batch']} per rank, 4 ranks, "
                  f"rank {d['rank_per_gpu']} per GPU", "",
                  f"| reduction | first loss | final loss (mean of last {min(5, d['steps'])}) | bytes per step per "
                  "rank over the "
                  "network | bytes inside a machine | s/step |", "|---|---|---|---|---|---|"]
        for x in d["runs"]:
            lines.append(f"| {x['mode']} | {x['first_loss']:.4f} | {x['final_loss']:.4f} | "
                         f"{x['bytes_per_step']:,.0f} | {x['bytes_inside_machine_per_step']:,.0f} | "
                         f"{x['seconds_per_step']:.3f} |")
        lines += ["", "ddp: plain fp32 ring all-reduce over the 4 ranks (all counted as network); torch_hook: torch's "
                  "powerSGD_hook (flat over 4 ranks, full matrices, embeddings compressed too, error feedback, warm "
                  "start, fp32 P/Q all-reduces; 1-D tensors go in fp32); ours: hierarchical and sharded, P/Q' in "
                  "1-6-9 across machines plus one fp32 all-reduce of the uncompressed parameters (network), fp32 "
                  "reduce-scatter and all-gather inside each machine.", ""]
    return "\n".join(lines)


PARTS = ("reduce", "orth", "ddp")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked; ``parts`` becomes a list, and ``preset``, ``rank`` and ``steps`` not given come
    from ``--quick`` (test, 4, 4) or the full run (tiny, 16, 60)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=comma_list(PARTS), default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    ap.add_argument("--preset", default=None, help="prior preset for the reduce part (default: tiny; --quick: test)")
    ap.add_argument("--rank", type=positive_int, default=None,
                    help=f"PowerSGD rank per machine, a multiple of {LOCAL} (default: 16; --quick: 4)")
    ap.add_argument("--steps", type=int_at_least(3), default=None, help="ddp training steps (default: 60; --quick: 4)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=out_prefix, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    args.preset = args.preset or ("test" if args.quick else "tiny")
    if args.preset not in DALLE_PRESETS:
        ap.error(f"--preset must be one of {', '.join(DALLE_PRESETS)}, got {args.preset!r}")
    args.rank = args.rank or (4 if args.quick else 16)
    if args.rank % LOCAL:
        ap.error(f"--rank must be a multiple of {LOCAL} (the GPUs per machine; each uses rank / {LOCAL}), "
                 f"got {args.rank}")
    args.steps = args.steps or (4 if args.quick else 60)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    parts = args.parts
    res = {"date": datetime.date.today().isoformat(), "device": f"CPU {platform.machine()}, {os.cpu_count()} cores, "
           f"gloo, torch {torch.__version__}", "command": "python " + " ".join(sys.argv)}
    preset, steps = args.preset, args.steps
    shapes, repeats = ([(16, 2)], 2) if args.quick else ([(256, 8), (1024, 32), (2048, 64)], 5)
    if "reduce" in parts:
        res["reduce"] = run_local_ranks(_reduce_part, WORLD, preset, args.rank, repeats)
    if "orth" in parts:
        res["orth"] = orth_part(shapes, repeats)
    if "ddp" in parts:
        over = dict(d_model=64, n_layers=2, n_heads=2, text_len=16, image_grid=8, image_vocab_size=64,
                    text_vocab_size=64) if not args.quick else {}
        rk = args.rank
        runs = [run_local_ranks(_ddp_part, WORLD, mode, "tiny" if not args.quick else "test", over, steps, 8, rk)
                for mode in ("ddp", "torch_hook", "ours")]
        res["ddp"] = {"steps": steps, "batch": 8, "rank_per_gpu": rk // LOCAL, "model": over, "runs": runs}
    emit(res, _markdown(res), str(args.out) if args.out else None)


if __name__ == "__main__":
    main()
