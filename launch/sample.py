#!/usr/bin/env python
"""Generate images from captions: N candidates per caption with the KV-cached sampler, decode with the dVAE, rerank
with a contrastive model, keep the top k; a PNG grid per caption and a JSON of scores.

    python launch/sample.py --prior runs/demo/dalle/dalle.pt --clip runs/demo/clip/clip \
        --caption "a large red circle above a small blue square" --num_candidates 16 --keep 4 --out runs/samples
    deepspeed --num_gpus 2 launch/sample.py --prior ... --shapes_split test_ood --num_captions 64 --out ...

Captions come from ``--caption`` (repeatable), ``--captions_file`` (one per line) or ``--shapes_split`` (the built-in
shapes data, whose scenes are known, so the samples are scored with the shapes scorer: top-1 after reranking,
the first sample without reranking, every candidate, and a caption-shuffled baseline, written to metrics.json).
Under the deepspeed launcher the captions are split across ranks. ``--clip`` is a local CLIP folder (trained by
launch/train_clip.py, or a pretrained one); without it candidates keep their sampling order.

``--image_prompt FILE --prompt_rows R`` primes the prior with the top R rows of the image's codes (the paper's
image-to-image translation, §3.3): every candidate keeps those rows and the rest is drawn given the caption. With
``--shapes_split``, ``--image_prompt scene`` primes each caption with its own scene, so the scorer measures how
well the prior completes a picture the way its caption says.

    python launch/sample.py --prior runs/demo/dalle/dalle.pt --clip runs/demo/clip/clip --shapes_split test_id \
        --image_prompt scene --prompt_rows 8 --num_candidates 32 --out runs/completions
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dalle_ds.train.cli import LaunchedArgumentParser, check_clip_dir, check_file, check_out_dir, input_error


def parse_args(argv=None) -> argparse.Namespace:
    p = LaunchedArgumentParser(description=__doc__.split("\n\n")[0])  # rank 0 alone reports a bad command line
    p.add_argument("--prior", required=True, help="dalle.pt written by launch/train_dalle.py")
    p.add_argument("--dvae", default=None, help="dvae.pt (default: the one the prior was trained with)")
    p.add_argument("--clip", default=None, help="local CLIP folder for reranking")
    p.add_argument("--caption", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--captions_file", default=None)
    p.add_argument("--shapes_split", default=None, choices=("train", "test_id", "test_ood"))
    p.add_argument("--num_captions", type=int, default=32, help="with --shapes_split: how many captions")
    p.add_argument("--shapes_seed", type=int, default=0)
    p.add_argument("--num_candidates", type=int, default=16, help="N samples per caption (paper: 512)")
    p.add_argument("--keep", type=int, default=4, help="top k kept after reranking")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=128,
                   help="sequences sampled at once (CPU, the demo's prior: 22 / 16 / 15 ms a sequence at 64 / 128 / "
                        "256 on one core)")
    p.add_argument("--dvae_precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="decode the codes under bf16 autocast (auto: where bf16 is native; 9.1 → 3.1 ms an image "
                        "on one AMX core)")
    p.add_argument("--image_prompt", default=None, metavar="FILE|scene",
                   help="an image whose top --prompt_rows rows of codes every candidate starts from (centre-cropped "
                        "and resized to the dVAE's input); 'scene' with --shapes_split: each caption's own scene")
    p.add_argument("--prompt_rows", type=int, default=None,
                   help="with --image_prompt: how many rows of the code grid are given (default: half the grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_cache", action="store_true", help="recompute the full forward per code (slow reference)")
    p.add_argument("--cuda_graph", action="store_true",
                   help="replay each cached decode step from a CUDA graph captured once per batch size (CUDA only: "
                        "one host call a step instead of ~15 kernel launches a layer; same logits)")
    p.add_argument("--save_candidates", action="store_true",
                   help="also write candidates.pt: every candidate image (uint8, in sampling order) with the captions "
                        "and scenes, to compare rerankers offline (benchmarks/rerank_eval.py)")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.keep < 1 or args.num_candidates < args.keep:
        p.error(f"need 1 ≤ --keep ≤ --num_candidates, got --keep {args.keep} (default 4) and --num_candidates "
                f"{args.num_candidates}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be ≥ 1, got {args.batch_size}")
    from dalle_ds.sample.generate import SamplingConfig

    try:
        args.sampling = SamplingConfig(args.temperature, args.top_k, args.top_p).validate()
    except ValueError as e:  # "temperature must be > 0, got 0.0": the flag is its field's name
        p.error(f"--{e}")
    if args.cuda_graph and args.no_cache:
        p.error("--cuda_graph replays the cached decode step: drop --no_cache (or it)")
    if args.cuda_graph and not torch.cuda.is_available():
        p.error("--cuda_graph needs a CUDA GPU (none is visible)")
    if args.num_captions < 1:
        p.error(f"--num_captions must be ≥ 1, got {args.num_captions}")
    if not (args.caption or args.captions_file or args.shapes_split):
        p.error("give --caption, --captions_file or --shapes_split")
    if args.shapes_split and (args.caption or args.captions_file):
        p.error("--shapes_split samples the split's own captions: drop --caption / --captions_file (or it)")
    if args.prompt_rows is not None and not args.image_prompt:
        p.error("--prompt_rows says how much of --image_prompt is given: add --image_prompt FILE (or scene)")
    if args.prompt_rows is not None and args.prompt_rows < 1:
        p.error(f"--prompt_rows must be ≥ 1, got {args.prompt_rows}")
    if args.image_prompt == "scene":
        if not args.shapes_split:
            p.error("--image_prompt scene primes each caption with its own shapes scene: add --shapes_split")
    elif args.image_prompt:
        check_file(p, "--image_prompt", args.image_prompt, "an image file, or 'scene' with --shapes_split")
    if args.captions_file:
        check_file(p, "--captions_file", args.captions_file, "a text file with one caption a line")
    check_file(p, "--prior", args.prior, "the dalle.pt written by launch/train_dalle.py", expect="dalle.pt")
    if args.dvae:
        check_file(p, "--dvae", args.dvae, "the dvae.pt written by launch/train_dvae.py", expect="dvae.pt")
    if args.clip:
        check_clip_dir(p, "--clip", args.clip)
    check_out_dir(p, "--out", args.out)
    return args


def gather_captions(args) -> tuple[list[str], list[dict] | None]:
    from dalle_ds.utils.ranks import is_job_rank0

    if args.shapes_split:
        from dalle_ds.data.shapes import ShapesDataset

        ds = ShapesDataset(args.shapes_split, num_samples=args.num_captions, seed=args.shapes_seed)
        scenes = [ds.scene(i) for i in range(len(ds))]
        return [s["caption"] for s in scenes], scenes
    captions = list(args.caption)
    if args.captions_file:
        try:
            lines = Path(args.captions_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"--captions_file {args.captions_file}: not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from e
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise ValueError(f"--captions_file {args.captions_file}: no captions in it (one a line)")
        captions += from_file
    blank = sum(not c.strip() for c in captions)
    if blank and is_job_rank0():  # every rank reads the same captions
        print(f"note: {blank} empty caption(s): their images are sampled with no text (unconditional)",
              file=sys.stderr)
    return captions, None  # parse_args saw --caption, --captions_file or --shapes_split


def prompt_images(args, scenes: list[dict] | None, n_captions: int, image_size: int) -> torch.Tensor | None:
    """uint8 [n_captions, 3, S, S]: the image each caption is primed with (None without --image_prompt)."""
    if not args.image_prompt:
        return None
    if args.image_prompt == "scene":
        from dalle_ds.data.shapes import IMAGE_SIZES, render_scene_tensor

        # a scene is the same at every size the data renders (only its coordinates scale): draw it at the dVAE's
        if image_size not in IMAGE_SIZES:
            raise ValueError(f"--image_prompt scene: the shapes scenes render at {' or '.join(map(str, IMAGE_SIZES))} "
                             f"pixels, the dVAE takes {image_size}")
        return torch.stack([render_scene_tensor(s, image_size) for s in scenes])
    from PIL import UnidentifiedImageError

    from dalle_ds.data.images import load_image, to_chw_uint8

    try:
        image = to_chw_uint8(load_image(args.image_prompt), image_size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"--image_prompt {args.image_prompt}: not a readable image ({e})") from e
    return image[None].expand(n_captions, -1, -1, -1)


def score_samples(records: list[dict], images: dict[int, torch.Tensor], scenes: list[dict]) -> dict:
    """Shapes scorer on: the reranked top-1, the first sample (no reranking), all candidates, the best candidate by
    the scorer itself (the ceiling of any reranker on these candidates), and the top-1 against a different caption's
    scene (caption-shuffled baseline)."""
    from dalle_ds.eval.shapes_scorer import aggregate_scores, best_of, detect_objects, score_candidates, score_images

    idx = [r["index"] for r in records]
    top1 = [images[i][0] for i in idx]
    first = [images[i][r["order"].index(0)] for i, r in zip(idx, records)]
    sc = [scenes[i] for i in idx]
    det = [detect_objects(im) for im in top1]
    shuffled = sc[1:] + sc[:1]
    per_candidate = score_candidates([images[i] for i in idx], sc)  # once, for the two entries that need them all
    return {"top1_after_rerank": score_images(top1, sc, detections=det),
            "first_sample_no_rerank": score_images(first, sc),
            "all_candidates": aggregate_scores([r for results in per_candidate for r in results]),
            "best_of_n_by_scorer": best_of(per_candidate),
            "caption_shuffled_baseline": score_images(top1, shuffled, detections=det)}


def sample_share(args, pipe, captions: list[str], sampling, out: Path,
                 prompts: torch.Tensor | None = None) -> tuple[list[dict], dict]:
    """This rank's share of the captions (every world_size-th): candidates, a PNG grid per caption, and a record
    each; returns (records, {caption index: candidate images, best first}). ``prompts``: each caption's prompt
    image; the grid then starts with it, the rows not given faded."""
    from dalle_ds.train.distributed import is_rank0, rank, world_size
    from dalle_ds.utils.images import fade_below, make_grid, save_png

    mine = list(range(rank(), len(captions), world_size()))
    per_chunk = max(1, args.batch_size // args.num_candidates)
    grid_side = pipe.prior.cfg.image_grid
    records, images = [], {}
    for start in tqdm(range(0, len(mine), per_chunk), desc="sampling", disable=not is_rank0(), dynamic_ncols=True):
        chunk = mine[start:start + per_chunk]
        codes = None if prompts is None else pipe.encode_prompt(prompts[chunk], args.prompt_rows)
        results = pipe.generate([captions[i] for i in chunk], args.num_candidates, sampling, args.batch_size,
                                seed=args.seed * 100_003 + chunk[0], use_cache=not args.no_cache,
                                cuda_graph=args.cuda_graph, prompt_codes=codes)
        for i, res in zip(chunk, results):
            images[i] = res.images
            ncol = min(8, args.num_candidates)
            tiles = list(res.images)
            title = f"{res.caption}  (best {args.keep} first" + (", CLIP-reranked)" if res.scores else ")")
            if prompts is not None:  # a first column: the prompt, then blanks, so the candidates keep their columns
                blank = torch.full_like(prompts[i], 255)
                first = [fade_below(prompts[i], args.prompt_rows, grid_side)]
                rows_of = [tiles[r:r + ncol] for r in range(0, len(tiles), ncol)]
                tiles = [t for r, row in enumerate(rows_of) for t in (first if r == 0 else [blank]) + row]
                ncol += 1
                title = f"{res.caption}  (left: the prompt, top {args.prompt_rows} of {grid_side} code rows; then " \
                        f"best {args.keep} first" + (", CLIP-reranked)" if res.scores else ")")
            grid = make_grid(tiles, ncol=ncol, scale=2)
            save_png(grid, out / "grids" / f"{i:04d}.png", title=title)
            records.append({"index": i, "caption": res.caption, "order": res.order, "kept": res.order[:args.keep],
                            "clip_scores": res.scores, "grid": f"grids/{i:04d}.png", "timings": res.timings})
    return records, images


def gather_shares(records: list[dict], images: dict, send_images: bool) -> tuple[list[dict], dict]:
    """Every rank's records (sorted by caption index) and, if ``send_images``, images; meaningful on rank 0."""
    from dalle_ds.train.distributed import world_size

    if world_size() == 1:
        return records, images
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, (records, images if send_images else {}))
    records = sorted((r for recs, _ in gathered for r in recs), key=lambda r: r["index"])
    return records, {k: v for _, imgs in gathered for k, v in imgs.items()}


def write_results(args, out: Path, sampling, records: list[dict], images: dict, scenes: list[dict] | None) -> None:
    """samples.json; with --save_candidates, candidates.pt; with known scenes, metrics.json (printed too), last.

    Each file is written atomically, and metrics.json after the others: launch/demo.sh takes it as the sign that the
    stage finished, so a run that failed or was stopped while writing the others must not have left it (it was
    written first, not atomically)."""
    from dalle_ds.utils.files import atomic_path, atomic_write_bytes

    result = {"prior": args.prior, "clip": args.clip, "num_candidates": args.num_candidates, "keep": args.keep,
              "sampling": vars(sampling), "image_prompt": args.image_prompt, "prompt_rows": args.prompt_rows,
              "captions": records}
    if scenes:
        for r in records:
            r["scene"] = scenes[r["index"]]
        result["metrics"] = score_samples(records, images, scenes)
    atomic_write_bytes(out / "samples.json", (json.dumps(result, indent=2) + "\n").encode())
    if args.save_candidates:
        sampled = []
        for r in records:  # back to sampling order: the pipeline returns candidates best first
            sampled.append(images[r["index"]][torch.tensor(r["order"]).argsort()])
        with atomic_path(out / "candidates.pt") as tmp:
            torch.save({"captions": [r["caption"] for r in records], "scenes": [r.get("scene") for r in records],
                        "images": torch.stack(sampled)}, tmp)
    if scenes:
        m = result["metrics"]
        atomic_write_bytes(out / "metrics.json", (json.dumps(m, indent=2) + "\n").encode())
        print(json.dumps({k: {a: round(m[k][a], 3) for a in ("exact", "color", "shape", "size", "count")}
                          for k in m}, indent=1))
    print(f"{len(records)} captions × {args.num_candidates} candidates; grids in {out / 'grids'}")


#: every file sample.py writes into --out (removed by a re-run before it writes its own)
OUTPUTS = ("samples.json", "metrics.json", "candidates.pt", "grids/[0-9]*.png")


def replace_earlier_run(out: Path) -> None:
    """Remove what an earlier sample.py run left in ``out``, and say so: a re-run with fewer captions, or without
    --shapes_split / --save_candidates, left the other run's grids, metrics.json and candidates.pt beside the new
    samples.json, where they read as this run's (demo_report.py reads metrics.json)."""
    from dalle_ds.utils.files import remove_earlier_outputs

    removed = remove_earlier_outputs(out, OUTPUTS)
    if removed:
        grids = sum(f.parent.name == "grids" for f in removed)
        names = [f.name for f in removed if f.parent.name != "grids"] + ([f"{grids} grids"] if grids else [])
        print(f"note: --out {out} held an earlier run's samples ({', '.join(names)}): replaced", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dalle_ds.sample.pipeline import TextToImage
    from dalle_ds.train.distributed import barrier, device, distributed_run, is_rank0

    sampling = args.sampling
    # Inputs the user named (captions file, prior, its tokenizer and dVAE, CLIP folder) fail here, before the process
    # group starts, as one line: the errors these loaders raise for a missing, wrong-kind, unreadable or mismatched
    # input (ConfigError is a ValueError). Anything else keeps its traceback.
    try:
        captions, scenes = gather_captions(args)
        pipe = TextToImage.load(args.prior, args.dvae, args.clip, device=device(),
                                dvae_bf16={"auto": None, "bf16": True, "fp32": False}[args.dvae_precision])
        prompts = prompt_images(args, scenes, len(captions), pipe.dvae.cfg.image_size)
        grid_side = pipe.prior.cfg.image_grid
        if prompts is not None and args.prompt_rows is None:
            args.prompt_rows = grid_side // 2
        if prompts is not None and args.prompt_rows >= grid_side:
            raise ValueError(f"--prompt_rows {args.prompt_rows}: the image grid has {grid_side} rows, so at most "
                             f"{grid_side - 1} can be given (the rest is sampled)")
    except (FileNotFoundError, ValueError) as e:
        return input_error(str(e))
    with distributed_run():
        out = Path(args.out)
        if is_rank0():
            replace_earlier_run(out)
        barrier()  # before any rank writes its grids
        (out / "grids").mkdir(parents=True, exist_ok=True)
        records, images = sample_share(args, pipe, captions, sampling, out, prompts)
        records, images = gather_shares(records, images, send_images=bool(scenes) or args.save_candidates)
        if is_rank0():
            write_results(args, out, sampling, records, images, scenes)
    return 0


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
