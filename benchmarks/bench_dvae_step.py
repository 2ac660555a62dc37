"""Time one dVAE training update (forward, backward, Adam step) in each precision × memory-layout combination.

    python benchmarks/bench_dvae_step.py [--preset demo] [--batch 16] [--threads 1] [--out benchmarks/results/dvae_step_cpu_<date>]

The demo's dVAE stage is bounded by this update (a one-thread profile: convolution backward 45%, forward convolutions
19%), so this is what decides how many updates fit in the demo's ten minutes. Rows: fp32 or bf16 autocast (what
``torch_autocast`` in a DeepSpeed config turns on) × NCHW or channels_last weights (``channels_last`` in the dVAE
run config). The model and loss are the trainer's; the data is random uint8 images.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import comma_list, emit, md_table, out_prefix, time_fn  # noqa: E402  (benchmarks/timing.py)

from dalle_ds.config import DVAE_RUN_PRESETS  # noqa: E402
from dalle_ds.models.dvae import DiscreteVAE  # noqa: E402
from dalle_ds.precision.native import bf16_is_native  # noqa: E402

MODES = {"fp32 NCHW": (False, False), "fp32 channels_last": (False, True),
         "bf16 NCHW": (True, False), "bf16 channels_last": (True, True)}


def update_fn(cfg, batch: int, bf16: bool, channels_last: bool, device: torch.device):
    torch.manual_seed(0)
    model = DiscreteVAE(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randint(0, 256, (batch, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images, tau=1.0, kl_weight=0.0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo", choices=sorted(DVAE_RUN_PRESETS))
    ap.add_argument("--batch", type=int, default=16, help="images per update (the demo: 16 per rank)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo: 1 per rank, 2 ranks)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--modes", type=comma_list(MODES), default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    ap.add_argument("--out", type=out_prefix, default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--batch, --repeats and --threads must be ≥ 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    modes = args.modes
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DVAE_RUN_PRESETS[args.preset].model
    rows = {}
    for m in modes:
        bf16, cl = MODES[m]
        rows[m] = time_fn(update_fn(cfg, args.batch, bf16, cl, device), device, args.repeats)
    base = rows.get("fp32 NCHW")
    bf16_native = bf16_is_native("cpu")
    result = {"benchmark": "dvae_step", "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/bench_dvae_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_bf16": bf16_native,
              "torch": torch.__version__, "preset": args.preset, "batch": args.batch, "threads": args.threads,
              "seconds_per_update": rows}
    lines = [f"# dVAE update time ({result['date']})", "",
             f"Device: {result['device']}, torch {torch.__version__}, CPU capability {result['cpu_capability']}, "
             f"oneDNN native bf16: {bf16_native}. Command: `{result['command']}`.", "",
             f"Model: dVAE preset '{args.preset}' ({cfg.image_size}² images, K {cfg.vocab_size}, hidden {cfg.hidden}); "
             f"batch {args.batch}; {args.threads} thread(s); median of {args.repeats} updates.", ""]
    lines += md_table(["precision, layout", "ms per update", "speed-up vs fp32 NCHW"],
                      [[m, f"{t * 1e3:.0f}", f"{base / t:.2f}×" if base else "-"] for m, t in rows.items()])
    return emit(result, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
