"""Sampling throughput: images per second with and without the key/value cache, and where the time goes.

For a prior preset (random weights: throughput does not depend on what was learned) and each batch size, it draws
every image code of a batch of captions with ``sample_image_tokens(use_cache=True)`` (one prefill of the text, then
one decode step per code, each attending to the cache under the layer's sparse mask) and with ``use_cache=False``
(a full forward pass of the whole sequence per code, the reference), then decodes with a dVAE of the matching grid
and vocabulary and reranks with a small CLIP, and reports

* images/s for sampling alone, cached and uncached, and the speedup; on CUDA also cached with the decode step replayed
  from a CUDA graph (``sample_image_tokens(cuda_graph=True)``: one host call per step instead of ~15 launches per
  layer), timed after its capture;
* the split of one cached generate (sample / dVAE decode / CLIP rerank), so the reranker's time share is visible;
* the floor: the images/s of a perfect cached sampler on this device, from the bytes and FLOPs each call must move and
  compute (``dalle_ds.models.flops.sampling_steps``: the weights once per call, the cached keys/values the masks make
  visible, per row) at the copy bandwidth and matmul rate measured in the same run, and each sampler's % of it.

Work per image without the cache is about n/2 full forward passes of n tokens (O(n^2) per layer in the attention
and O(n) matmuls per token, repeated n times); with the cache each code costs one token's matmuls plus one row of
attention. So the speedup should grow roughly linearly with the number of image tokens.

    python benchmarks/bench_sample.py --preset tiny --batch-sizes 1,8,32 --out benchmarks/results/sample_cpu_<date>
    python benchmarks/bench_sample.py --quick            # the test preset, seconds (tests the harness)
    python benchmarks/bench_sample.py --preset 350M --device cuda --dtype bfloat16 --batch-sizes 1,8,32,128 \
        --no-uncached-above 8

On CUDA, ``--batch-sizes auto`` doubles the batch until it runs out of memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_ds.config import DALLE_PRESETS, ClipModelConfig, DVAEConfig  # noqa: E402
from dalle_ds.data.tokenizer import train_caption_tokenizer  # noqa: E402
from dalle_ds.models.dalle import DALLE, prepare_text  # noqa: E402
from dalle_ds.models.dvae import DiscreteVAE  # noqa: E402
from dalle_ds.sample import cuda_graph  # noqa: E402
from dalle_ds.sample.clip import ClipReranker, build_clip, clip_tokenizer_from_caption_tokenizer, image_processor_for  # noqa: E402
from dalle_ds.sample.generate import SamplingConfig, sample_image_tokens  # noqa: E402
from dalle_ds.models.flops import sampling_floor_seconds, sampling_steps  # noqa: E402
from timing import (comma_list, copy_bytes_per_s, emit, host_info, host_line, matmul_flops_per_s, out_prefix,  # noqa: E402
                    positive_int, time_fn, torch_device)  # (benchmarks/timing.py)

CAPTIONS = ["a large red circle above a small blue square", "a small green triangle in the top left",
            "a white cross to the left of a yellow square", "a large purple star in the center"]


def build(preset: str, device: torch.device, dtype: torch.dtype):
    tok = train_caption_tokenizer(CAPTIONS * 4, vocab_size=400, max_length=DALLE_PRESETS[preset].text_len - 1)
    cfg = dataclasses.replace(DALLE_PRESETS[preset], text_vocab_size=tok.vocab_size, bos_id=tok.bos_id).validate()
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it samples (seconds on a CPU for the larger presets)
        prior = DALLE(cfg).to(dtype=dtype).eval()
    groups = 3  # 4x downsampling: 4 pixels per code
    dvae = DiscreteVAE(DVAEConfig(image_size=cfg.image_grid * 4, vocab_size=cfg.image_vocab_size, hidden=16,
                                  blocks_per_group=1, groups=groups, decoder_init=32)).to(device).eval()
    clip_cfg = ClipModelConfig(image_size=cfg.image_grid * 4, patch_size=4 if cfg.image_grid <= 8 else 8)
    clip_tok = clip_tokenizer_from_caption_tokenizer(tok, clip_cfg.text_len)
    reranker = ClipReranker(build_clip(clip_cfg, clip_tok), clip_tok, image_processor_for(clip_cfg.image_size), device)
    return tok, prior, dvae, reranker


def floor_row(cfg, batch: int, dtype: torch.dtype, bytes_per_s: float, flops_per_s: float) -> dict:
    """The floor of cached sampling at ``batch`` (parameters and cache in ``dtype``)."""
    steps = sampling_steps(cfg, batch, param_bytes=dtype.itemsize, cache_bytes=dtype.itemsize)
    floor = sampling_floor_seconds(steps, bytes_per_s, flops_per_s)
    return {"floor_s": floor, "floor_images_per_s": batch / floor, "floor_bytes": sum(st.bytes for st in steps),
            "floor_flops": sum(st.flops for st in steps)}


def run_case(prior, dvae, reranker, text, batch: int, device, reps: int, uncached: bool) -> dict:
    sampling = SamplingConfig()
    t = text[:1].expand(batch, -1).contiguous()
    gen = torch.Generator(device=device)
    row: dict = {"batch": batch, "image_tokens": prior.cfg.image_len}
    with torch.no_grad():
        cached = time_fn(lambda: sample_image_tokens(prior, t, sampling, gen.manual_seed(0), use_cache=True),
                         device, reps, warmup=1)
        row["cached_s"] = cached
        row["cached_images_per_s"] = batch / cached
        codes = sample_image_tokens(prior, t, sampling, gen.manual_seed(0), use_cache=True)
        if device.type == "cuda":  # warmup=1 captures the graph; the timed runs replay it
            graphed = time_fn(lambda: sample_image_tokens(prior, t, sampling, gen.manual_seed(0), cuda_graph=True),
                              device, reps, warmup=1)
            row["graph_s"] = graphed
            row["graph_images_per_s"] = batch / graphed
            row["graph_speedup"] = cached / graphed
            # the graph replays the eager step's kernels: the same draws, code for code
            row["graph_matches_eager"] = torch.equal(
                sample_image_tokens(prior, t, sampling, gen.manual_seed(0), cuda_graph=True), codes)
            cuda_graph.release(prior)  # its KV cache: the next batch size (or the OOM search) starts clean
        if uncached:
            # as many runs as the cached case: the speed-up is the headline (one run of it swung 3.7x on a busy CPU)
            full = time_fn(lambda: sample_image_tokens(prior, t, sampling, gen.manual_seed(0), use_cache=False),
                           device, reps, warmup=1)
            row["uncached_s"] = full
            row["uncached_images_per_s"] = batch / full
            row["cache_speedup"] = full / cached
        dec = time_fn(lambda: dvae.decode(codes.view(batch, prior.cfg.image_grid, prior.cfg.image_grid)), device, reps,
                      warmup=1)
        images = dvae.decode_uint8(codes.view(batch, prior.cfg.image_grid, prior.cfg.image_grid))
        rr = time_fn(lambda: reranker.rerank(images, CAPTIONS[0], keep=1), device, reps, warmup=1)
    total = cached + dec + rr
    row.update(decode_s=dec, rerank_s=rr, share_sample=cached / total, share_decode=dec / total,
               share_rerank=rr / total)
    return row


def auto_batches(limit: int = 4096) -> list[int]:
    out, b = [], 1
    while b <= limit:
        out.append(b)
        b *= 2
    return out


def markdown(result: dict) -> str:
    lines = [f"# bench_sample: {result['preset']} on {result['device_name']} ({result['dtype']})", "",
             f"{result['image_tokens']} image tokens per image; random weights; median of {result['reps']} runs. "
             f"Command: `{result['command']}`", ""]
    if "host_start" in result:
        lines += [host_line(result["host_start"], result.get("host_end")), ""]
    if "copy_gb_per_s" in result:
        lines += [f"Floor: a perfect cached sampler at the copy bandwidth ({result['copy_gb_per_s']:.4g} GB/s) and "
                  f"matmul rate ({result['matmul_tflops_per_s']:.4g} TFLOP/s) measured in this run, from the bytes "
                  "and FLOPs each call must move and compute (`dalle_ds.models.flops.sampling_steps`).", ""]
    lines += ["| batch | cached img/s | + CUDA graph img/s | graph speedup | floor img/s | best % of floor "
              "| uncached img/s | cache speedup | sample % | decode % | rerank % |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        unc = f"{r['uncached_images_per_s']:.3g}" if "uncached_images_per_s" in r else "-"
        sp = f"{r['cache_speedup']:.1f}x" if "cache_speedup" in r else "-"
        gr = f"{r['graph_images_per_s']:.3g}" if "graph_images_per_s" in r else "-"
        gsp = f"{r['graph_speedup']:.2f}x" if "graph_speedup" in r else "-"
        floor = f"{r['floor_images_per_s']:.3g}" if "floor_images_per_s" in r else "-"
        best = max(r["cached_images_per_s"], r.get("graph_images_per_s", 0.0))
        pct = f"{100 * best / r['floor_images_per_s']:.1f}%" if "floor_images_per_s" in r else "-"
        lines.append(f"| {r['batch']} | {r['cached_images_per_s']:.3g} | {gr} | {gsp} | {floor} | {pct} | {unc} | {sp} "
                     f"| {100 * r['share_sample']:.1f} | {100 * r['share_decode']:.1f} | {100 * r['share_rerank']:.1f} |")
    differ = [r["batch"] for r in result["rows"] if r.get("graph_matches_eager") is False]
    if differ:
        lines.append(f"\n**CUDA-graph sampling drew other codes than eager sampling** at batch {differ}: a bug.")
    if result.get("oom_at"):
        lines.append(f"\nOut of memory at batch {result['oom_at']}.")
    return "\n".join(lines) + "\n"


def _batch_sizes(text: str):
    """``--batch-sizes``: 'auto', or a comma list of integers ≥ 1."""
    return "auto" if text.strip() == "auto" else comma_list(item=positive_int, what="integers ≥ 1, or 'auto'")(text)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: ``preset`` and ``batch_sizes`` (a list of ints) resolved against ``--quick``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="prior preset (default: tiny; test with --quick)")
    p.add_argument("--quick", action="store_true", help="the test preset with batch sizes 1,4 (tests the harness)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None, help="comma list, or 'auto' (CUDA: double until out of memory)")
    p.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=positive_int, default=3)
    p.add_argument("--no-uncached-above", type=int, default=32,
                   help="skip the (slow) uncached reference for larger batches")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=out_prefix, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    args.preset = args.preset or ("test" if args.quick else "tiny")
    if args.preset not in DALLE_PRESETS:
        p.error(f"--preset must be one of {', '.join(DALLE_PRESETS)}")
    spec = args.batch_sizes or ([1, 4] if args.quick else [1, 8, 32])
    # off CUDA an allocation failure is no OutOfMemoryError: nothing would stop the doubling
    if spec == "auto" and not str(args.device).startswith("cuda"):
        p.error("--batch-sizes auto (double until out of memory) is for --device cuda; give a list on the CPU")
    args.batch_sizes = auto_batches() if spec == "auto" else spec
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches on the current device
    preset, batches = args.preset, args.batch_sizes
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    host = host_info()  # before the work: the copy and matmul rates below move with what else runs here
    tok, prior, dvae, reranker = build(preset, device, dtype)
    quick = args.quick
    copy_bw = copy_bytes_per_s(device, 2**30 if device.type == "cuda" else 2**22 if quick else 2**28)
    mm_rate = matmul_flops_per_s(device, dtype, 8192 if device.type == "cuda" else 256 if quick else 1024)
    ids, lengths = tok.encode(CAPTIONS[:1])
    text = prepare_text(ids, lengths, prior.cfg).to(device)
    rows, oom_at = [], None
    for b in batches:
        try:
            rows.append(run_case(prior, dvae, reranker, text, b, device, args.reps, b <= args.no_uncached_above))
            rows[-1].update(floor_row(prior.cfg, b, dtype, copy_bw, mm_rate))
        except torch.OutOfMemoryError:
            oom_at = b
            cuda_graph.release(prior)
            torch.cuda.empty_cache()
            break
        r = rows[-1]
        print(f"batch {b}: floor {r['floor_images_per_s']:.3g} img/s, cached {r['cached_images_per_s']:.3g} img/s"
              + (f", with CUDA graph {r['graph_images_per_s']:.3g} img/s ({r['graph_speedup']:.2f}x)"
                 if "graph_speedup" in r else "")
              + (f", uncached {r['uncached_images_per_s']:.3g} img/s ({r['cache_speedup']:.1f}x)"
                 if "cache_speedup" in r else ""), flush=True)
    result = {"bench": "sample", "preset": preset, "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else host["host_cpu"],
              "host_start": host, "host_end": host_info(),
              "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
              "image_tokens": prior.cfg.image_len, "reps": args.reps, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(["python", "benchmarks/bench_sample.py",
                                                                             *(argv if argv is not None else sys.argv[1:])]),
              "copy_gb_per_s": copy_bw / 1e9, "matmul_tflops_per_s": mm_rate / 1e12, "rows": rows, "oom_at": oom_at}
    return emit(result, markdown(result), args.out)


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    main()
    exit_process(0)
