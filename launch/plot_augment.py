"""Draw the paper's random crops (dalle_ds/data/augment.py) of one image: where they fall, and what comes out.

One row per listing (dVAE: Listing 1; prior: Listing 2). On the left, the image with the footprints of ``--n``
drawn crops (the region of the original that ends up in the output, one colour per draw; a dashed outline for a
mirrored crop); to its right, the crops themselves at the target size, in the same order. The crops are drawn as a
training run draws them: sample key (epoch, 0) for epochs 0 .. n - 1.

    python launch/plot_augment.py /data/photo.jpg --size 256 --out crops.png
    python launch/plot_augment.py --example --size 128 --out docs/augment_crops.png   # a drawn 3:2 test image
"""
from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from dalle_ds.data.augment import LISTINGS, CropPlan, PaperCrop, apply_plan
from dalle_ds.data.images import load_image, to_rgb
from dalle_ds.train.cli import check_out_file

GAP = 8
LABEL_PX = 18


def footprint(plan: CropPlan, size: int) -> tuple[float, float, float, float]:
    """The box of the original image that the crop's pixels come from (left, top, right, bottom)."""
    if plan.t < size:  # scaled up: the whole square
        return plan.left, plan.top, plan.left + plan.side, plan.top + plan.side
    f = plan.side / plan.t  # original pixels per pixel of the resized square
    x0, y0 = plan.left + plan.x * f, plan.top + plan.y * f
    return x0, y0, x0 + size * f, y0 + size * f


def example_image() -> Image.Image:
    """A 3:2 picture with a horizon, a sun and a word on a sign: what the crops keep, and what a flip mirrors."""
    w, h = 360, 240
    img = Image.new("RGB", (w, h), (135, 190, 235))
    pen = ImageDraw.Draw(img)
    pen.rectangle([0, 150, w, h], fill=(90, 160, 80))
    pen.ellipse([270, 25, 320, 75], fill=(250, 210, 60))
    pen.rectangle([40, 90, 150, 135], fill=(245, 245, 240), outline=(60, 40, 20), width=3)
    pen.rectangle([92, 135, 98, 175], fill=(110, 70, 30))
    pen.text((58, 105), "DALL-E", fill=(180, 20, 20))
    pen.polygon([(190, 150), (215, 95), (240, 150)], fill=(70, 110, 60))
    return img


def _colour(i: int, n: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(i / max(n, 1), 0.9, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def _dashed_rect(pen: ImageDraw.ImageDraw, box, fill, width: int = 2, dash: int = 6) -> None:
    x0, y0, x1, y1 = box
    for a, b, horizontal, at in ((x0, x1, True, y0), (x0, x1, True, y1), (y0, y1, False, x0), (y0, y1, False, x1)):
        pos = a
        while pos < b:
            end = min(pos + dash, b)
            pen.line([(pos, at), (end, at)] if horizontal else [(at, pos), (at, end)], fill=fill, width=width)
            pos += 2 * dash


def draw(img: Image.Image, size: int, n: int, seed: int = 0, preview: int = 0) -> Image.Image:
    """The sheet: per listing, the image with its crops' footprints, then the crops (``preview`` px per crop)."""
    img = to_rgb(img)
    preview = preview or max(size, 96)
    scale = preview * 2 / max(img.size)  # the original is shown about two crops wide
    shown = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    row_h = max(shown[1], preview) + LABEL_PX
    width = GAP + shown[0] + GAP + n * (preview + GAP)
    sheet = Image.new("RGB", (width, GAP + len(LISTINGS) * (row_h + GAP)), "white")
    pen = ImageDraw.Draw(sheet)
    for r, listing in enumerate(LISTINGS):
        crop = PaperCrop(listing, size, seed)
        y = GAP + r * (row_h + GAP)
        pen.text((GAP, y), f"{listing} (Listing {r + 1}): footprints in the original, then the {size} px crops",
                 fill=(0, 0, 0))
        y += LABEL_PX
        base = img.resize(shown, Image.Resampling.BICUBIC)
        marks = ImageDraw.Draw(base)
        for i in range(n):
            plan = crop.plan(*img.size, (i, 0))
            box = [v * scale for v in footprint(plan, size)]
            if plan.flip:
                _dashed_rect(marks, box, _colour(i, n))
            else:
                marks.rectangle(box, outline=_colour(i, n), width=2)
            out = apply_plan(img, plan, size).resize((preview, preview), Image.Resampling.NEAREST)
            x = GAP + shown[0] + GAP + i * (preview + GAP)
            sheet.paste(out, (x, y))
            pen.rectangle([x - 2, y - 2, x + preview + 1, y + preview + 1], outline=_colour(i, n), width=2)
        sheet.paste(base, (GAP, y))
    return sheet


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", nargs="?", help="an image file (any format Pillow reads)")
    p.add_argument("--example", action="store_true", help="use a drawn 3:2 test image instead of a file")
    p.add_argument("--size", type=int, default=256, help="the crops' side (the dVAE's image_size; paper: 256)")
    p.add_argument("--n", type=int, default=6, help="crops per listing")
    p.add_argument("--seed", type=int, default=0, help="the run seed the crops are drawn with")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if (args.image is None) == (not args.example):
        p.error("give an image file or --example (one of them)")
    if args.size < 1 or args.n < 1:
        p.error("--size and --n must be ≥ 1")
    if args.image is not None and not Path(args.image).is_file():
        p.error(f"no such file: {args.image}")
    check_out_file(p, "--out", args.out, (".png", ".jpg", ".jpeg", ".webp"))
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    try:
        img = example_image() if args.example else load_image(args.image)
    except OSError as e:  # PIL's UnidentifiedImageError is one: not an image, or a damaged one
        print(f"error: {args.image}: not an image Pillow can read ({e})", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(img, args.size, args.n, args.seed).save(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
