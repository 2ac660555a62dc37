#!/usr/bin/env python
"""Collect a demo run's numbers into RUN/metrics.json and print them with where the pictures are.

    python launch/demo_report.py runs/demo [--total_seconds N]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ATTRS = ("exact", "color", "shape", "size", "position", "relation", "count")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _attrs(m: dict | None) -> dict | None:
    if not m:
        return None
    return {k: (round(m[k], 4) if isinstance(m.get(k), float) else m.get(k)) for k in (*ATTRS, "n") if k in m}


def collect(run: Path) -> dict:
    out: dict = {"run": str(run)}
    dvae = _load(run / "dvae" / "dvae_metrics.json")
    if dvae:
        out["dvae"] = {k: v for k, v in (dvae.get("eval") or {}).items() if not isinstance(v, (dict, list))}
    dalle = _load(run / "dalle" / "dalle_metrics.json")
    if dalle:
        out["prior"] = {"steps": dalle["steps"], "train_seconds": round(dalle["train_seconds"], 1),
                        **{k: round(v, 4) for k, v in (dalle.get("eval") or {}).items()}}
        hist = dalle.get("history") or []
        if hist:
            out["prior"]["train_loss_first_logged"] = round(hist[0]["loss"], 4)
            out["prior"]["train_loss_last_logged"] = round(hist[-1]["loss"], 4)
    clip = _load(run / "clip" / "clip_metrics.json")
    if clip:
        out["clip"] = clip.get("eval")
    for split in ("test_id", "test_ood"):
        m = _load(run / f"samples_{split}" / "metrics.json")
        if m:
            out[f"samples_{split}"] = {
                name: {"all": _attrs(v), "one_object": _attrs(v.get("one_object")),
                       "two_objects": _attrs(v.get("two_objects"))}
                for name, v in m.items()}
            out[f"samples_{split}"]["grids"] = str(run / f"samples_{split}" / "grids")
    edit = _load(run / "prompt_edit" / "prompt_edit.json")
    if edit:
        out["image_prompts"] = {"prompt_rows": edit["prompt_rows"], "grid": edit["grid"],
                                "top1": {c: _attrs(v) for c, v in edit["top1"].items()},
                                "chance": {c: _attrs(v) for c, v in edit["chance"].items()},
                                "picture": str(run / "prompt_edit" / "prompt_edit.png")}
    times = run / "stage_seconds.txt"
    if times.is_file():
        out["stage_seconds"] = {" ".join(line.split()[:-1]): int(line.split()[-1])
                                for line in times.read_text().splitlines() if line.strip()}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--total_seconds", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():  # metrics.json is written into it: a traceback (FileNotFoundError) said nothing useful
        print(f"error: {run} is not a folder: give the run folder of launch/demo.sh (e.g. runs/demo)",
              file=sys.stderr)
        return 2
    report = collect(run)
    if args.total_seconds is not None:
        report["total_seconds"] = args.total_seconds
    (run / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    for split in ("test_id", "test_ood"):
        s = report.get(f"samples_{split}")
        if s:
            top, base = s["top1_after_rerank"]["all"], s["caption_shuffled_baseline"]["all"]
            print(f"{split}: top-1 after rerank exact {top['exact']:.3f} colour {top['color']:.3f} shape "
                  f"{top['shape']:.3f} (n={top['n']}); caption-shuffled exact {base['exact']:.3f}; "
                  f"one object {s['top1_after_rerank']['one_object']['exact']}, "
                  f"two objects {s['top1_after_rerank']['two_objects']['exact']}")
            if "best_of_n_by_scorer" in s:
                print(f"  best candidate by the scorer (what a perfect reranker would pick): exact "
                      f"{s['best_of_n_by_scorer']['all']['exact']:.3f}")
    edit = report.get("image_prompts")
    if edit:
        top, chance = edit["top1"], edit["chance"]
        print(f"image prompts (top {edit['prompt_rows']} of {edit['grid']} code rows given, test_id): exact "
              f"{top['own']['exact']:.3f} with the own caption; with the lower object's colour edited "
              f"{top['colour edit']['exact']:.3f} (unasked {chance['own vs colour edit']['exact']:.3f}), its shape "
              f"edited {top['shape edit']['exact']:.3f} (unasked {chance['own vs shape edit']['exact']:.3f})")
    print(f"metrics: {run / 'metrics.json'}")
    print("pictures:")
    print(f"  dVAE reconstructions (originals above, reconstructions below): {run / 'dvae' / 'reconstructions_final.png'}")
    for split in ("test_id", "test_ood"):
        if (run / f"samples_{split}" / "grids").is_dir():
            print(f"  samples, one grid per caption (reranked, best first): {run / f'samples_{split}' / 'grids'}/")
    if edit:
        print(f"  image prompts (prompt, own caption, colour edited, shape edited): {edit['picture']}")
    curves = sorted(run.glob("*/curves_*.svg"))
    if curves:
        print(f"  training curves (launch/plot_metrics.py): {', '.join(str(c) for c in curves)}")
    print(f"  TensorBoard: tensorboard --logdir {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
