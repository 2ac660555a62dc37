"""Draw the attention masks and the tiles the block-sparse kernels visit, from the one mask definition.

One panel per mask kind (rows = queries, columns = keys, in the order the Triton kernels work in: column attention
on transposed image states). Each ``block_m x block_n`` tile is coloured by its status in
:func:`dalle_ds.ops.attention.layouts.block_status`: FULL tiles dark green; PARTIAL tiles dark orange where a pair is
visible and light orange where the kernel masks it; SKIP tiles white (the kernels never touch them). Down-sampled
to the panel size by area, so a pixel mixes the colours of the pairs it covers. Under each panel: the kept share of
the causal triangle and the tile counts.

    python launch/plot_masks.py --out docs/attention_masks.png                       # the paper's T=256, W=32
    python launch/plot_masks.py --text-len 4 --grid 4 --block 4 --out /tmp/masks.png  # small enough to see pairs
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from dalle_ds.ops.attention.layouts import FULL, PARTIAL, block_status
from dalle_ds.ops.attention.masks import MaskSpec
from dalle_ds.train.cli import check_out_file

# (visible pair, masked pair) colour per tile status; SKIP tiles stay white (they hold no visible pair)
TILE_RGB = {FULL: ((40, 130, 40), (40, 130, 40)), PARTIAL: ((205, 95, 0), (250, 215, 160))}
CAPTION_PX = 46


def panel(spec: MaskSpec, block_m: int, block_n: int, size: int) -> tuple[Image.Image, dict]:
    """The picture of one mask in the kernel order, ``size`` pixels square, plus its counts."""
    n = spec.seq_len
    vis = spec.dense(order="kernel")  # [N, N] bool
    status = block_status(spec, block_m, block_n, order="kernel")
    # tile status per element, then both down-sampled to the panel by area averaging (a pixel's share of pairs)
    tile = status.repeat_interleave(block_m, 0)[:n].repeat_interleave(block_n, 1)[:, :n]
    rgb = torch.full((3, n, n), 255.0)
    for code, (shown, masked) in TILE_RGB.items():
        for colour, where in ((shown, (tile == code) & vis), (masked, (tile == code) & ~vis)):
            rgb[:, where] = torch.tensor(colour, dtype=torch.float32)[:, None]
    mode = "area" if n >= size else "nearest"  # down-sampling mixes the pairs a pixel covers; up-sampling keeps them
    img = F.interpolate(rgb[None], size=(size, size), mode=mode)[0]
    pic = Image.fromarray(img.round().clamp(0, 255).byte().permute(1, 2, 0).numpy(), "RGB")
    counts = {
        "kept": int(vis.sum()), "causal": n * (n + 1) // 2,
        "full": int((status == FULL).sum()), "partial": int((status == PARTIAL).sum()), "tiles": status.numel(),
    }
    return pic, counts


def draw(specs: list[MaskSpec], block_m: int, block_n: int, size: int) -> Image.Image:
    """The panels side by side with their captions."""
    gap = 16
    width = len(specs) * size + (len(specs) + 1) * gap
    sheet = Image.new("RGB", (width, size + CAPTION_PX + 2 * gap), "white")
    pen = ImageDraw.Draw(sheet)
    for i, spec in enumerate(specs):
        pic, c = panel(spec, block_m, block_n, size)
        x = gap + i * (size + gap)
        sheet.paste(pic, (x, gap))
        pen.rectangle([x - 1, gap - 1, x + size, gap + size], outline=(0, 0, 0))
        order = ", kernel order (transposed)" if spec.transposed else ""
        pen.text((x, gap + size + 6), f"{spec.kind}{order}", fill=(0, 0, 0))
        pen.text((x, gap + size + 20), f"kept {100 * c['kept'] / c['causal']:.1f}% of causal; {block_m}x{block_n} "
                 f"tiles: {c['full']} full, {c['partial']} partial", fill=(0, 0, 0))
        pen.text((x, gap + size + 34), f"of {c['tiles']}; white tiles are skipped", fill=(0, 0, 0))
    return sheet


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--conv-kernel", type=int, default=11)
    ap.add_argument("--kinds", default="row,column,conv")
    ap.add_argument("--block", type=int, default=64, help="tile size (block_m = block_n)")
    ap.add_argument("--size", type=int, default=400, help="pixels per panel")
    ap.add_argument("--out", type=Path, default=Path("attention_masks.png"))
    args = ap.parse_args(argv)
    if args.block < 1 or args.size < 16:
        ap.error("--block must be >= 1 and --size >= 16")
    # PIL picks the format from the suffix; without one it raised "unknown file extension" after the drawing
    check_out_file(ap, "--out", str(args.out), (".png", ".jpg", ".jpeg", ".webp"))
    args.specs = mask_specs(ap, args)
    return args


def mask_specs(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[MaskSpec]:
    """One MaskSpec per ``--kinds`` entry; MaskSpec's own checks (a kind it does not know, a grid below 1, an even
    conv kernel) become a usage error naming the flag, not a traceback."""
    flags = {"mask kind": "--kinds", "text_len": "--text-len", "grid": "--grid", "conv_kernel": "--conv-kernel"}
    try:
        return [MaskSpec(kind.strip(), args.text_len, args.grid, conv_kernel=args.conv_kernel)
                for kind in args.kinds.split(",")]
    except ValueError as e:
        msg = str(e)
        for field, flag in flags.items():
            msg = msg.replace(field, flag, 1) if msg.startswith(field) else msg
        ap.error(msg)


def main(argv=None) -> Path:
    args = parse_args(argv)
    sheet = draw(args.specs, args.block, args.block, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return args.out


if __name__ == "__main__":
    main()
