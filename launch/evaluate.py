#!/usr/bin/env python
"""Fréchet distance and Inception score of a prior's samples against held-out images, at several blur radii (the
paper's MS-COCO evaluation, §3.2 and Fig. 9).

    python launch/evaluate.py --prior runs/demo/dalle/dalle.pt --clip runs/demo/clip/clip \
        --data shapes --split test_id --num_captions 512 --features clip --out runs/eval
    deepspeed --num_gpus 8 launch/evaluate.py --prior runs/dalle/dalle.pt --clip runs/clip/clip \
        --data imagefolder --path /data/coco_val --split validation --num_captions 30000 --num_candidates 512 \
        --features inception --inception_weights /data/weights-inception-2015-12-05-6726825d.pth --out runs/eval_coco

For each of the first ``--num_captions`` captions of the data: ``--num_candidates`` samples, reranked by ``--clip``;
the top-1 ("reranked") and the first sample drawn ("first", what the prior gives without a reranker) are compared
with the caption's own images ("real"), and so is each real image passed through the dVAE ("dvae": the resolution
the codes keep, a floor for any sample). Every set is blurred by each ``--blur`` radius, real images included, and
scored with ``dalle_ds.eval.fidelity`` (``--features inception``: FID and IS, needs ``pip install "dalle_ds[fid]"``;
``--features clip``: FD-CLIP, the Fréchet distance in a CLIP's image embeddings, not comparable with FID; it uses
``--feature_clip`` if given, else ``--clip``, which favours the reranked set). Under the deepspeed launcher the
captions are split across ranks and the statistics gathered. ``--rerank_pools 2,4,8`` adds the reranked top-1 of
each caption's first K candidates ("reranked@K"): the distance against the size of the pool the reranker picks from.

Writes ``metrics.json``, ``report.md`` (a table per metric), ``fd_vs_blur.svg`` (with pools also ``fd_vs_pool.svg``),
``examples_r0.png`` and ``examples_r<largest radius>.png`` (a row per set: real, dVAE, reranked, first sample; the
first captions).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dalle_ds.config import DATASET_NAMES
from dalle_ds.train.cli import (LaunchedArgumentParser, check_clip_dir, check_file, check_out_dir, input_error,
                               validate_data_flags)

#: Blur radii in pixels (PIL's Gaussian standard deviation); the paper plots FID and IS against a growing radius.
DEFAULT_BLUR = "0,1,2,4,8"
EXAMPLES = 8


def _radii(text: str) -> list[float]:
    try:
        radii = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated numbers, got {text!r}") from None
    # not finite: int(inf) raised OverflowError, which argparse does not turn into a usage error
    if not radii or any(not 0 <= r < math.inf for r in radii) or len(set(radii)) != len(radii):
        raise argparse.ArgumentTypeError(f"want distinct finite radii ≥ 0, got {text!r}")
    return sorted(int(r) if r == int(r) else r for r in radii)


def _pools(text: str) -> list[int]:
    try:
        pools = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated whole numbers, got {text!r}") from None
    if not pools or pools[0] < 2:
        raise argparse.ArgumentTypeError(f"want pool sizes ≥ 2, got {text!r}")
    return pools


def pool_top1(result, k: int) -> torch.Tensor:
    """The reranker's best among the first ``k`` candidates drawn for one caption (``result.order``: the candidates'
    draw indices, best first; ``result.images`` in that order)."""
    return result.images[next(j for j, drawn in enumerate(result.order) if drawn < k)]


def sample_sets(args) -> list[str]:
    """The names of the sample sets scored besides the real images, in report order."""
    pools = [f"reranked@{k}" for k in args.rerank_pools] if args.clip else []
    return ["dvae", "first", *pools] + (["reranked"] if args.clip else [])


def parse_args(argv=None) -> argparse.Namespace:
    p = LaunchedArgumentParser(description=__doc__.split("\n\n")[0])  # rank 0 alone reports a bad command line
    p.add_argument("--prior", required=True, help="dalle.pt written by launch/train_dalle.py")
    p.add_argument("--dvae", default=None, help="dvae.pt (default: the one the prior was trained with)")
    p.add_argument("--clip", default=None, help="CLIP folder that reranks the candidates (no reranking without)")
    p.add_argument("--data", default="shapes", choices=DATASET_NAMES, help="where the captions and real images are")
    p.add_argument("--path", default=None, help="imagefolder dir / webdataset shards / fashion-mnist dir")
    p.add_argument("--split", default=None, help="default: test_id for shapes, test for fashion_mnist, else train")
    p.add_argument("--num_captions", type=int, default=1024, help="the data's first N captions (paper: 30,000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; shapes: also the scenes' seed")
    p.add_argument("--num_candidates", type=int, default=16, help="samples per caption, reranked (paper: 512)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=128, help="sequences sampled at once")
    p.add_argument("--cuda_graph", action="store_true",
                   help="replay each decode step from a captured CUDA graph (launch/sample.py --cuda_graph)")
    p.add_argument("--rerank_pools", type=_pools, default=[], metavar="K,K,...",
                   help="also score the reranked top-1 of each caption's first K candidates (K < --num_candidates): "
                        "how the distance falls with the pool the reranker picks from")
    p.add_argument("--features", choices=("inception", "clip"), default="inception")
    p.add_argument("--feature_clip", default=None, help="--features clip: the CLIP whose embeddings are compared "
                   "(default --clip; another CLIP avoids favouring the samples --clip picked)")
    p.add_argument("--inception_weights", default=None,
                   help="--features inception: a local copy of torch-fidelity's Inception weights (no download)")
    p.add_argument("--blur", type=_radii, default=_radii(DEFAULT_BLUR), help=f"radii (default {DEFAULT_BLUR})")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag, low in (("num_captions", 2), ("num_candidates", 1), ("batch_size", 1)):
        if getattr(args, flag) < low:
            p.error(f"--{flag} must be ≥ {low}, got {getattr(args, flag)}")
    from dalle_ds.sample.generate import SamplingConfig

    try:
        args.sampling = SamplingConfig(args.temperature, args.top_k, args.top_p).validate()
    except ValueError as e:
        p.error(f"--{e}")
    if args.rerank_pools and not args.clip:
        p.error("--rerank_pools scores the reranker's picks: give --clip")
    if args.rerank_pools and args.rerank_pools[-1] >= args.num_candidates:
        p.error(f"--rerank_pools must stay below --num_candidates ({args.num_candidates}: the full pool is the "
                f"'reranked' set), got {args.rerank_pools[-1]}")
    if args.cuda_graph and not torch.cuda.is_available():
        p.error("--cuda_graph needs a CUDA GPU (none is visible)")
    args.split = args.split or {"shapes": "test_id", "fashion_mnist": "test"}.get(args.data, "train")
    args.feature_clip = args.feature_clip or args.clip
    if args.features == "clip" and not args.feature_clip:
        p.error("--features clip compares CLIP image embeddings: give --clip or --feature_clip")
    if args.features == "inception" and args.feature_clip and args.feature_clip != args.clip:
        p.error("--feature_clip goes with --features clip")
    if args.inception_weights and args.features != "inception":
        p.error("--inception_weights goes with --features inception")
    if args.inception_weights:
        check_file(p, "--inception_weights", args.inception_weights, "torch-fidelity's Inception-v3 weights (.pth)")
    check_file(p, "--prior", args.prior, "the dalle.pt written by launch/train_dalle.py", expect="dalle.pt")
    if args.dvae:
        check_file(p, "--dvae", args.dvae, "the dvae.pt written by launch/train_dvae.py", expect="dvae.pt")
    for flag in ("--clip", "--feature_clip"):
        if getattr(args, flag[2:]):
            check_clip_dir(p, flag, getattr(args, flag[2:]))
    check_out_dir(p, "--out", args.out)
    return args


def load_inputs(args):
    """(pipeline, dataset, feature CLIP or None); the errors of a wrong input are ValueError / FileNotFoundError."""
    from dalle_ds.config import DataConfig
    from dalle_ds.data.registry import build_dataset
    from dalle_ds.sample.clip import ClipReranker
    from dalle_ds.sample.pipeline import TextToImage
    from dalle_ds.train.distributed import device

    pipe = TextToImage.load(args.prior, args.dvae, args.clip, device=device())
    size = pipe.dvae.cfg.image_size
    data = DataConfig(name=args.data, path=args.path, train_split=args.split, train_samples=args.num_captions,
                      seed=args.seed)
    validate_data_flags(data, size, {"name": "--data", "path": "--path", "train_split": "--split",
                                     "train_samples": "--num_captions", "seed": "--seed"})
    ds = build_dataset(data.name, args.split, **data.dataset_kwargs(args.split, size))
    if len(ds) < args.num_captions:
        raise ValueError(f"--num_captions {args.num_captions}: {args.data} split {args.split!r} has only {len(ds)} "
                         "samples")
    feature_clip = None
    if args.features == "clip":
        feature_clip = (pipe.reranker if args.feature_clip == args.clip
                        else ClipReranker.from_pretrained(args.feature_clip, device=device()))
    return pipe, ds, feature_clip


def evaluate_share(args, pipe, ds, meter) -> dict:
    """This rank's captions (every world_size-th of the first N): sample, rerank, feed the meter; returns the first
    captions' example images (rank 0) and timings."""
    from dalle_ds.train.distributed import is_rank0, rank, world_size

    mine = list(range(rank(), args.num_captions, world_size()))
    per_chunk = max(1, args.batch_size // args.num_candidates)
    examples, t_sample, t_metric = {"real": [], "dvae": [], "reranked": [], "first": []}, 0.0, 0.0
    for start in tqdm(range(0, len(mine), per_chunk), desc="evaluating", disable=not is_rank0(), dynamic_ncols=True):
        chunk = mine[start:start + per_chunk]
        items = [ds[i] for i in chunk]
        real = torch.stack([it["image"] for it in items])
        t0 = time.perf_counter()
        results = pipe.generate([it["caption"] for it in items], args.num_candidates, args.sampling,
                                args.batch_size, seed=args.seed * 100_003 + chunk[0], cuda_graph=args.cuda_graph)
        sets = {"real": real, "dvae": pipe.reconstruct(real),
                "first": torch.stack([pool_top1(r, 1) for r in results])}  # the first drawn: a pool of one
        for k in args.rerank_pools:
            sets[f"reranked@{k}"] = torch.stack([pool_top1(r, k) for r in results])
        if pipe.reranker is not None:
            sets["reranked"] = torch.stack([r.images[0] for r in results])
        t1 = time.perf_counter()
        for name, images in sets.items():
            meter.update(images, name)
        t_sample, t_metric = t_sample + t1 - t0, t_metric + time.perf_counter() - t1
        for name in examples:
            examples[name] += list(sets[name][:EXAMPLES - len(examples[name])]) if name in sets else []
    return {"examples": {k: v for k, v in examples.items() if v}, "sample_s": t_sample, "metric_s": t_metric}


def report(args, metrics: dict, counts: dict) -> str:
    name = "FID" if args.features == "inception" else "FD-CLIP"
    lines = [f"# {name} and blur radius: {args.prior}", "",
             f"`{' '.join(a for a in sys.argv if not a.startswith('--local_rank'))}`", "",
             f"{counts['real']} captions of {args.data} split {args.split!r}; {args.num_candidates} candidates each, "
             + (f"reranked by {args.clip}" if args.clip else "no reranker") + "; features: "
             + ("Inception-v3 (torch-fidelity)" if args.features == "inception"
                else f"CLIP image embeddings of {args.feature_clip} (not comparable with FID)"), "",
             f"{name} (lower is better), per blur radius in pixels:", "",
             "| set | " + " | ".join(f"r = {r}" for r in args.blur) + " |",
             "|---|" + "---:|" * len(args.blur)]
    for s, by_r in metrics["fd"].items():
        lines.append(f"| {s} | " + " | ".join(f"{by_r[r]:.4g}" for r in args.blur) + " |")
    if metrics["inception_score"]:
        lines += ["", "Inception score (higher is better), mean ± std over 10 splits:", "",
                  "| set | " + " | ".join(f"r = {r}" for r in args.blur) + " |", "|---|" + "---:|" * len(args.blur)]
        for s, by_r in metrics["inception_score"].items():
            lines.append(f"| {s} | " + " | ".join(f"{by_r[r][0]:.3g} ± {by_r[r][1]:.2g}" for r in args.blur) + " |")
    lines += ["", "Sets: real = the captions' own images; dvae = those images through the dVAE (encode, decode); "
              "reranked = the top-1 of the candidates; reranked@K = the top-1 of the first K candidates drawn; "
              "first = the first candidate drawn (no reranking)."]
    return "\n".join(lines) + "\n"


#: every file evaluate.py writes into --out (which of the charts and example pictures depends on the flags)
OUTPUTS = ("metrics.json", "report.md", "fd_vs_blur.svg", "fd_vs_pool.svg", "examples_r*.png")


def write_outputs(args, out: Path, metrics: dict, counts: dict, share: dict) -> None:
    from dalle_ds.eval.fidelity import gaussian_blur
    from dalle_ds.utils.files import remove_earlier_outputs
    from dalle_ds.utils.images import make_grid, save_png
    from dalle_ds.utils.svg_plot import line_chart

    # an earlier run with --rerank_pools or another largest --blur radius left fd_vs_pool.svg or examples_r<r>.png
    # that this run does not write: beside the new metrics.json they read as its own
    removed = remove_earlier_outputs(out, OUTPUTS)
    if removed:
        print(f"note: --out {out} held an earlier evaluation ({', '.join(f.name for f in removed)}): replaced",
              file=sys.stderr)

    result = {"prior": args.prior, "clip": args.clip, "features": args.features, "feature_clip": args.feature_clip,
              "data": args.data, "split": args.split, "num_captions": counts["real"],
              "num_candidates": args.num_candidates, "rerank_pools": args.rerank_pools,
              "sampling": vars(args.sampling), "blur": args.blur,
              "counts": counts, "seconds_rank0": {k: round(share[k], 1) for k in ("sample_s", "metric_s")},
              "fd": {s: {str(r): v for r, v in by_r.items()} for s, by_r in metrics["fd"].items()},
              "inception_score": {s: {str(r): v for r, v in by_r.items()}
                                  for s, by_r in metrics["inception_score"].items()}}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(args, metrics, counts)
    (out / "report.md").write_text(text)
    name = "FID" if args.features == "inception" else "FD-CLIP"
    (out / "fd_vs_blur.svg").write_text(line_chart(
        args.blur, {s: [by_r[r] for r in args.blur] for s, by_r in metrics["fd"].items()},
        f"{name} against blur radius ({counts['real']} captions)", name, xlabel="blur radius (pixels)",
        xticks=args.blur, yfmt=".3g"))
    if args.rerank_pools:  # first = a pool of 1, reranked = all candidates; x on a log2 scale
        pools = [1, *args.rerank_pools, args.num_candidates]
        names = ["first", *(f"reranked@{k}" for k in args.rerank_pools), "reranked"]
        x = [math.log2(k) for k in pools]
        (out / "fd_vs_pool.svg").write_text(line_chart(
            x, {f"r = {r}": [metrics["fd"][n][r] for n in names] for r in args.blur},
            f"{name} against the reranker's pool ({counts['real']} captions)", name,
            xlabel="log2 of the candidates the reranker picks from (0: the first sample)", xticks=x, yfmt=".3g"))
    rows = list(share["examples"])
    for r in sorted({0, args.blur[-1]}):
        tiles = [im for k in rows for im in gaussian_blur(torch.stack(share["examples"][k]), r)]
        save_png(make_grid(tiles, ncol=len(share["examples"]["real"]), scale=2), out / f"examples_r{r}.png",
                 title=f"rows: {', '.join(rows)}; blur radius {r}")
    print(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dalle_ds.eval.fidelity import FidelityMeter, FidelityUnavailable, inception_unavailable
    from dalle_ds.train.distributed import device, distributed_run, is_rank0, world_size

    # A missing package first, before the models load and the data is read (not in parse_args: the command line
    # itself is fine, and the docs' commands are checked to parse on machines without it)
    missing = inception_unavailable() if args.features == "inception" else None
    if missing:
        return input_error(f"--features inception: {missing}")
    # Inputs fail here, before the process group starts, as one line (ConfigError is a ValueError).
    try:
        pipe, ds, feature_clip = load_inputs(args)
        meter = FidelityMeter(args.features, sample_sets(args), args.blur, clip=feature_clip,
                              inception_weights=args.inception_weights, device=device())
    except (FileNotFoundError, ValueError, FidelityUnavailable) as e:
        return input_error(str(e))
    with distributed_run():
        if args.num_captions < world_size():  # every rank's metrics need samples of their own (same on every rank)
            if is_rank0():
                print(f"error: --num_captions {args.num_captions} is fewer than the {world_size()} ranks",
                      file=sys.stderr)
            return 2
        share = evaluate_share(args, pipe, ds, meter)
        metrics = meter.compute(seed=args.seed)  # every rank: the metrics gather their states
        counts = {k: int(v) for k, v in meter.global_counts().items()}
        if is_rank0():
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            write_outputs(args, out, metrics, counts, share)
    return 0


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
