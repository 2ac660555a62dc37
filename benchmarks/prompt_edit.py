"""Text-controlled completion on the shapes data: the paper's zero-shot image-to-image translation (§3.3, Fig. 2d),
in miniature and scored.

Two-object scenes whose relation is vertical ("above", "below") and whose upper object lies wholly in the top
``--prompt_rows`` rows of the code grid (the lower one wholly below them) are encoded by the dVAE; the prior is
primed with those rows and samples the rest given a caption. Three captions per scene:

* ``own``: the scene's caption (completion);
* ``colour edit``: the lower object's colour changed (an edit the picture cannot know of: only the text says it);
* ``shape edit``: the lower object's shape changed.

Each caption's candidates are reranked by the CLIP (if given) and the top-1 is scored with the shapes scorer
against the caption's scene (exact: both objects' colour, shape and size, and the relation). The ``own`` top-1 is
also scored against the edited scenes: how often the edited attribute appears without being asked for (chance).
``no prompt`` samples the whole image from the own caption alone, for reference (``--no-reference`` skips it).
Edits never produce a held-out colour-shape pair, nor two equal objects.

    python benchmarks/prompt_edit.py --prior runs/demo/dalle/dalle.pt --clip runs/demo/clip/clip \\
        --out benchmarks/results/prompt_edit_cpu_<date>
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import emit, host_info, host_line, int_at_least, out_prefix  # noqa: E402  (benchmarks/timing.py)

from dalle_ds.data.shapes import (COLORS, SHAPES, edit_object, held_out_pairs, render_scene_tensor,  # noqa: E402
                                  sample_scene)
from dalle_ds.eval.shapes_scorer import detect_objects, score_images  # noqa: E402

CONDITIONS = ("own", "colour edit", "shape edit")
REFERENCE = "own, no prompt"
ATTRS = ("exact", "color", "shape", "size", "relation")


def upper_lower(scene: dict) -> tuple[int, int]:
    """Indices of the upper and the lower object (image y grows downwards)."""
    ys = [o["center"][1] for o in scene["objects"]]
    return (0, 1) if ys[0] < ys[1] else (1, 0)


def lower_is_held_out(scene: dict) -> bool:
    """Is the lower object a colour-shape pair held out of training (test_ood)?"""
    low = scene["objects"][upper_lower(scene)[1]]
    return (low["color"], low["shape"]) in held_out_pairs(scene.get("shape_set") or SHAPES)


def split_by_rows(scene: dict, rows: int, grid: int) -> bool:
    """A two-object vertical scene whose upper object ends above the cut after ``rows`` code rows and whose lower
    object starts below it."""
    if scene["relation"] not in ("above", "below"):
        return False
    cut = rows * scene["image_size"] / grid
    up, low = (scene["objects"][i] for i in upper_lower(scene))
    return up["center"][1] + up["half_size"] <= cut <= low["center"][1] - low["half_size"]


def pick_scenes(n: int, split: str, seed: int, rows: int, grid: int, image_size: int, limit: int = 200_000):
    """The first ``n`` scenes of ``split`` that :func:`split_by_rows` keeps."""
    picked = []
    for i in range(limit):
        scene = sample_scene(seed, split, i, image_size)
        if split_by_rows(scene, rows, grid):
            picked.append(scene)
            if len(picked) == n:
                return picked
    raise ValueError(f"only {len(picked)} of the first {limit} {split} scenes split at {rows} of {grid} rows")


def edited(scene: dict, attribute: str, rng: np.random.Generator) -> dict:
    """The scene with its lower object's ``attribute`` (color / shape) changed to a value drawn uniformly among those
    that keep the pair seen in training and the two objects distinct."""
    _, low = upper_lower(scene)
    objs = scene["objects"]
    held = set(held_out_pairs(scene.get("shape_set") or SHAPES))
    values = tuple(COLORS) if attribute == "color" else tuple(scene.get("shape_set") or SHAPES)
    choices = []
    for v in values:
        new = dict(objs[low], **{attribute: v})
        pair = (new["color"], new["shape"])
        if v != objs[low][attribute] and pair not in held and pair != (objs[1 - low]["color"], objs[1 - low]["shape"]):
            choices.append(v)
    return edit_object(scene, low, **{attribute: choices[rng.integers(len(choices))]})


def summary(scores: dict) -> dict:
    return {a: scores[a] for a in ATTRS} | {"n": scores["n"]}


def run(args) -> tuple[dict, list]:
    from dalle_ds.sample.generate import SamplingConfig
    from dalle_ds.sample.pipeline import TextToImage

    pipe = TextToImage.load(args.prior, args.dvae, args.clip, device=args.device)
    grid, size = pipe.prior.cfg.image_grid, pipe.dvae.cfg.image_size
    rows = args.prompt_rows or grid // 2
    if rows >= grid:
        raise SystemExit(f"--prompt_rows {rows}: the code grid has {grid} rows; give fewer (the rest is sampled)")
    scenes = pick_scenes(args.num_scenes, args.split, args.shapes_seed, rows, grid, size)
    rng = np.random.default_rng(args.seed)
    by_condition = {"own": scenes, "colour edit": [edited(s, "color", rng) for s in scenes],
                    "shape edit": [edited(s, "shape", rng) for s in scenes]}
    prompts = torch.stack([render_scene_tensor(s) for s in scenes])
    codes = pipe.encode_prompt(prompts, rows)
    sampling = SamplingConfig(temperature=args.temperature)
    top1, seconds = {}, {}
    conditions = [(c, c, codes) for c in CONDITIONS] + ([(REFERENCE, "own", None)] if args.reference else [])
    for name, c, prompt in conditions:
        t0 = time.perf_counter()
        results = pipe.generate([s["caption"] for s in by_condition[c]], args.num_candidates, sampling,
                                args.batch_size, seed=args.seed, prompt_codes=prompt)
        seconds[name] = time.perf_counter() - t0
        top1[name] = [r.images[0] for r in results]
        print(f"{name}: {seconds[name]:.1f} s", file=sys.stderr)
    scores = {name: summary(score_images(top1[name], by_condition[c])) for name, c, _ in conditions}
    own_det = [detect_objects(im) for im in top1["own"]]
    chance = {f"own vs {c}": summary(score_images(top1["own"], by_condition[c], detections=own_det))
              for c in CONDITIONS[1:]}
    # test_ood: the scenes whose lower object is a held-out colour-shape pair, which only the text asks for
    unseen = [i for i, s in enumerate(scenes) if lower_is_held_out(s)]
    lower_held_out = {name: summary(score_images([top1[name][i] for i in unseen], [scenes[i] for i in unseen]))
                      for name in ("own", REFERENCE) if name in top1} if unseen else {}
    result = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "device": str(args.device), "host_start": args.host_start, "host_end": host_info(),
        "prior": args.prior, "clip": args.clip, "split": args.split, "shapes_seed": args.shapes_seed,
        "grid": grid, "prompt_rows": rows, "num_scenes": len(scenes), "num_candidates": args.num_candidates,
        "temperature": args.temperature, "seed": args.seed, "sampling_seconds": seconds,
        "top1": scores, "chance": chance, "lower_held_out": lower_held_out,
        "examples": [{c: by_condition[c][i]["caption"] for c in CONDITIONS} for i in range(min(8, len(scenes)))],
    }
    figure = [[prompts[i], top1["own"][i], top1["colour edit"][i], top1["shape edit"][i]]
              for i in range(min(args.figure_rows, len(scenes)))]
    return result, figure


def markdown(r: dict) -> str:
    rerank = "CLIP-reranked top-1" if r["clip"] else "first sample (no reranker)"
    lines = [f"# Text-controlled completion (shapes, {r['split']}): {r['date'][:10]}", "",
             f"`{r['command']}`  ", f"{host_line(r['host_start'], r['host_end'])}", "",
             f"Prior `{r['prior']}`; primed with the top {r['prompt_rows']} of {r['grid']} code rows of each scene "
             f"(its upper object); {r['num_scenes']} two-object scenes with a vertical relation, "
             f"{r['num_candidates']} candidates per caption at temperature {r['temperature']}, {rerank}, scored "
             "against the caption's scene.", "",
             "| caption | n | exact | colour | shape | size | relation | sampling s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["top1"]:
        s = r["top1"][c]
        lines.append(f"| {c} | {s['n']} | " + " | ".join(f"{s[a]:.3f}" for a in ATTRS) +
                     f" | {r['sampling_seconds'][c]:.0f} |")
    for c, s in r["chance"].items():
        lines.append(f"| {c} (chance) | {s['n']} | " + " | ".join(f"{s[a]:.3f}" for a in ATTRS) + " | |")
    for c, s in r.get("lower_held_out", {}).items():
        lines.append(f"| {c}, lower object a held-out pair | {s['n']} | " +
                     " | ".join(f"{s[a]:.3f}" for a in ATTRS) + " | |")
    lines += ["", "Chance rows: the `own` top-1 scored against the edited scenes, i.e. how often the edited attribute "
              "is drawn without the caption asking for it."]
    if REFERENCE in r["top1"]:
        lines += ["", f"`{REFERENCE}`: the own captions sampled without the prompt (the whole image drawn)."]
    lines += ["", "Examples (own / colour edit / shape edit):", ""]
    lines += [f"- {e['own']} / {e['colour edit']} / {e['shape edit']}" for e in r["examples"]]
    return "\n".join(lines) + "\n"


def save_figure(figure: list, path: Path, rows: int, grid: int) -> None:
    from dalle_ds.utils.images import fade_below, make_grid, save_png

    tiles = [t for row in figure for t in [fade_below(row[0], rows, grid), *row[1:]]]
    save_png(make_grid(tiles, ncol=4, scale=2), path,
             title="prompt (top rows) | own caption | lower object's colour edited | its shape edited")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True)
    p.add_argument("--dvae", default=None)
    p.add_argument("--clip", default=None, help="CLIP folder to rerank with (default: the first sample)")
    p.add_argument("--split", default="test_id", choices=("train", "test_id", "test_ood"))
    p.add_argument("--shapes_seed", type=int, default=0)
    p.add_argument("--num_scenes", type=int_at_least(1), default=128)
    p.add_argument("--num_candidates", type=int_at_least(1), default=32)
    p.add_argument("--prompt_rows", type=int_at_least(1), default=None, help="default: half the grid")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--batch_size", type=int_at_least(1), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference row: the own caption without the prompt (the whole image sampled)")
    p.add_argument("--figure_rows", type=int_at_least(1), default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=out_prefix, default=None, help="PREFIX: writes PREFIX.json, PREFIX.md and PREFIX.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.host_start = host_info()
    result, figure = run(args)
    emit(result, markdown(result), args.out)
    if args.out:
        save_figure(figure, Path(args.out + ".png"), result["prompt_rows"], result["grid"])
    return 0


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
