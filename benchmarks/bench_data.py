"""Time the image pipeline of one DataLoader worker: decode a photo, crop it (centred square, or the paper's Listing 1
/ Listing 2 random crops), resize to the model's size.

    python benchmarks/bench_data.py [--photo 500x375] [--size 256] [--n 64] [--out benchmarks/results/data_cpu_<date>]

The images are noise JPEGs of ``--photo`` pixels written to a temporary image folder (JPEG decoding cost depends on
the pixel count, hardly on the content); each row reads every image once through ``ImageTextFolder`` as training
does (``dataset[(epoch, index)]``), in this process, one torch thread. A GPU run needs, per rank, about
(images per second the trainer consumes) / (images per second here) workers (``data.num_workers``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import emit, host_info, host_line, int_at_least, md_table, out_prefix  # noqa: E402  (benchmarks/timing.py)

from dalle_ds.data.augment import PaperCrop  # noqa: E402
from dalle_ds.data.folder import ImageTextFolder  # noqa: E402

MODES = {"centre": None, "dvae (Listing 1)": "dvae", "prior (Listing 2)": "prior"}


def photo_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 500x375, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"sides must be ≥ 1, got {text!r}")
    return w, h


def write_folder(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=90)
            f.write(json.dumps({"file_name": f"{i}.jpg", "text": f"image {i}"}) + "\n")


def time_pass(ds, n: int, epoch: int) -> float:
    """Seconds per image for one pass over ``n`` images with sample keys (epoch, i)."""
    t0 = time.perf_counter()
    for i in range(n):
        ds[(epoch, i)]
    return (time.perf_counter() - t0) / n


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photo", type=photo_size, default=(500, 375), help="WIDTHxHEIGHT of the JPEGs (default 500x375)")
    ap.add_argument("--size", type=int_at_least(1), default=256, help="the model's image size (paper: 256)")
    ap.add_argument("--n", type=int_at_least(1), default=64, help="images per pass")
    ap.add_argument("--repeats", type=int_at_least(1), default=3, help="passes per mode (the median is kept)")
    ap.add_argument("--out", type=out_prefix, default=None, help="write OUT.json and OUT.md")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    start = host_info()
    per_image: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        write_folder(root, args.n, args.photo)
        for name, listing in MODES.items():
            crop = PaperCrop(listing, args.size, seed=0) if listing else None
            ds = ImageTextFolder(root, image_size=args.size, cache_dir=Path(tmp) / "cache", crop=crop,
                                 validate=False)
            time_pass(ds, min(args.n, 4), epoch=99)  # warm-up: imports, file cache
            times = sorted(time_pass(ds, args.n, epoch=e) for e in range(args.repeats))
            per_image[name] = times[len(times) // 2]
    end = host_info()
    w, h = args.photo
    result = {"benchmark": "data", "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/bench_data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": f"CPU ({platform.machine()})", "torch": torch.__version__,
              "photo": [w, h], "size": args.size, "n": args.n, "repeats": args.repeats,
              "seconds_per_image": per_image, "host": {"start": start, "end": end}}
    base = per_image["centre"]
    lines = [f"# Image pipeline of one data worker ({result['date']})", "",
             f"Command: `{result['command']}`. {result['device']}, torch {torch.__version__}, one thread.",
             f"{host_line(start, end)}", "",
             f"{args.n} noise JPEGs of {w}×{h} (quality 90) read through `ImageTextFolder` with sample keys, decoded "
             f"and cropped to {args.size}²; median of {args.repeats} passes.", ""]
    lines += md_table(["crop", "ms per image", "images/s per worker", "time vs centre"],
                      [[name, f"{t * 1e3:.2f}", f"{1 / t:.0f}", f"{t / base:.2f}×"] for name, t in per_image.items()],
                      align="lrrr")
    return emit(result, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
