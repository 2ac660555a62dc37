"""What a dVAE whose codes hold one value per patch could reach on the shapes scorer, measured on ground truth.

    python benchmarks/shapes_patch_ceiling.py [--patch 4] [--n 256] [--split test_id]

Each ``test_id`` image is reduced to one value per patch (4×4 px = one code of the demo's 16×16 grid) and drawn
back at full size, then scored like the dVAE's reconstructions:
  * majority colour, nearest: the patch's most common palette colour (background included), drawn as a flat block
    — the information in a code that only names a colour;
  * mean, nearest / mean, bilinear: the patch's mean RGB (a colour *and* how much of the patch it covers), drawn as
    a block or interpolated — codes that also carry coverage, decoded without or with a smooth outline.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dalle_ds.data.shapes import COLORS, ShapesDataset
from dalle_ds.eval.shapes_scorer import score_images


def reductions(images: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """float [B, 3, H, W] in 0..255 → the three patch reductions, each [B, 3, H, W]."""
    palette = torch.tensor([[0, 0, 0]] + [list(c) for c in COLORS.values()], dtype=torch.float)
    labels = ((images.permute(0, 2, 3, 1)[..., None, :] - palette) ** 2).sum(-1).argmin(-1)  # [B, H, W]
    b, h, w = labels.shape
    g_h, g_w = h // patch, w // patch
    per_patch = labels.view(b, g_h, patch, g_w, patch).permute(0, 1, 3, 2, 4).reshape(b, g_h, g_w, patch * patch)
    majority = palette[torch.mode(per_patch, dim=-1).values].permute(0, 3, 1, 2)
    mean = F.avg_pool2d(images, patch)
    return {"majority colour, nearest": F.interpolate(majority, scale_factor=patch, mode="nearest"),
            "mean, nearest": F.interpolate(mean, scale_factor=patch, mode="nearest"),
            "mean, bilinear": F.interpolate(mean, scale_factor=patch, mode="bilinear", align_corners=False)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, default=4, help="pixels per code side (the demo: 64 px / 16 codes = 4)")
    ap.add_argument("--n", type=int, default=256, help="images (the dVAE's evaluation uses 256)")
    ap.add_argument("--split", default="test_id")
    args = ap.parse_args(argv)
    if args.patch < 1 or 64 % args.patch:
        ap.error("--patch must divide 64")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    ds = ShapesDataset(split=args.split, num_samples=args.n, image_size=64)
    items = [ds[i] for i in range(args.n)]
    images = torch.stack([it["image"] for it in items]).float()
    scenes = [it["scene"] for it in items]
    out = {}
    for name, x in reductions(images, args.patch).items():
        s = score_images([im.clamp(0, 255).round().to(torch.uint8) for im in x], scenes)
        out[name] = {"exact": s["exact"], "color": s["color"], "shape": s["shape"],
                     "one_object_exact": s["one_object"]["exact"], "two_objects_exact": s["two_objects"]["exact"]}
        print(f"{name:26s} exact {s['exact']:.3f}  colour {s['color']:.3f}  shape {s['shape']:.3f}  "
              f"one object {s['one_object']['exact']:.3f}  two objects {s['two_objects']['exact']:.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
