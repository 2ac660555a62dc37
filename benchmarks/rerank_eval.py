"""Compare contrastive rerankers offline on one fixed set of prior samples.

``launch/sample.py --save_candidates`` writes ``candidates.pt`` (every candidate image of every caption, in sampling
order, with the shapes scenes). This script reranks those same images with each CLIP given and scores the top-1 with
the shapes scorer, next to two references that need no reranker: the first sample (no reranking) and the best
candidate by the scorer itself (the ceiling of any reranker on these candidates). Reranking more of the candidates
(``--num_candidates 4 8 16``) shows how much a larger N would buy.

    python benchmarks/rerank_eval.py runs/x/candidates.pt --clip runs/a/clip/clip --clip runs/b/clip/clip
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dalle_ds.eval.shapes_scorer import best_of, score_candidates, score_images
from dalle_ds.sample.clip import ClipReranker

ATTRS = ("exact", "color", "shape", "size", "position", "relation", "count")


def load_candidates(path: str | Path) -> dict:
    data = torch.load(path, weights_only=False)
    images, scenes = data["images"], data["scenes"]
    if images.dtype != torch.uint8 or images.dim() != 5:
        raise ValueError(f"{path}: images must be uint8 [captions, candidates, 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if any(s is None for s in scenes):
        raise ValueError(f"{path}: candidates were sampled without shapes scenes (use --shapes_split)")
    return data


def top1_by_clip(reranker: ClipReranker, images: torch.Tensor, captions: list[str]) -> list[torch.Tensor]:
    """Each caption's candidate with the highest CLIP score."""
    return [cand[int(reranker.score(cand, [cap] * len(cand)).argmax())] for cand, cap in zip(images, captions)]


def summary(scores: dict) -> dict:
    row = {a: scores[a] for a in ATTRS}
    row["exact_one_object"] = scores["one_object"]["exact"]
    row["exact_two_objects"] = scores["two_objects"]["exact"]
    return row


def evaluate(data: dict, clips: list[str], num_candidates: list[int]) -> dict:
    images, captions, scenes = data["images"], data["captions"], data["scenes"]
    results: dict[str, dict] = {"first_sample_no_rerank": summary(score_images(images[:, 0], scenes))}
    rerankers = {c: ClipReranker.from_pretrained(c) for c in clips}
    per_candidate = score_candidates(images[:, :max(num_candidates)], scenes)
    for n in num_candidates:
        subset = images[:, :n]
        results[f"best_by_scorer@{n}"] = summary(best_of([r[:n] for r in per_candidate]))
        for name, rr in rerankers.items():
            results[f"{name}@{n}"] = summary(score_images(top1_by_clip(rr, subset, captions), scenes))
    return results


def _cell(value: float | None, width: int) -> str:
    return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("candidates", help="candidates.pt from launch/sample.py --save_candidates")
    p.add_argument("--clip", action="append", default=[], help="a CLIP folder (repeatable)")
    p.add_argument("--num_candidates", type=int, nargs="+", default=None,
                   help="rerank the first N candidates of each caption (default: all)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        data = load_candidates(args.candidates)
    except (ValueError, OSError) as e:
        p.error(str(e))
    total = data["images"].shape[1]
    ns = args.num_candidates or [total]
    if any(n < 1 or n > total for n in ns):
        p.error(f"--num_candidates must be in 1..{total}")
    results = evaluate(data, args.clip, ns)
    n_captions = data["images"].shape[0]
    print(f"{n_captions} captions x {total} candidates ({args.candidates})")
    width = max(len(k) for k in results)
    print(" " * width + "  " + " ".join(f"{a[:8]:>8}" for a in ATTRS) + "   one-obj  two-obj")
    for name, row in results.items():
        cells = " ".join(_cell(row[a], 8) for a in ATTRS)  # None: no caption of the set has that attribute
        print(f"{name:<{width}}  {cells}   {_cell(row['exact_one_object'], 7)}  {_cell(row['exact_two_objects'], 7)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"candidates": args.candidates, "captions": n_captions,
                                              "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
