"""``python -m dalle_ds.models --preset 12B``: parameter counts of the presets, computed on the meta device."""
from __future__ import annotations

import argparse
import sys

from dalle_ds.config import DALLE_PRESETS
from dalle_ds.models.dalle import count_parameters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default=None, help=f"one of {', '.join(DALLE_PRESETS)} (default: all)")
    args = p.parse_args(argv)
    if args.preset is not None and args.preset not in DALLE_PRESETS:
        p.error(f"unknown preset {args.preset!r}; choose from {', '.join(DALLE_PRESETS)}")
    names = [args.preset] if args.preset else list(DALLE_PRESETS)
    print(f"{'preset':<8} {'params':>16} {'layers':>6} {'d_model':>7} {'heads':>5} {'text+image tokens':>18}")
    for name in names:
        cfg = DALLE_PRESETS[name]
        n = count_parameters(cfg)
        print(f"{name:<8} {n:>16,} {cfg.n_layers:>6} {cfg.d_model:>7} {cfg.n_heads:>5} "
              f"{f'{cfg.text_len} + {cfg.image_len}':>18}   ({n / 1e9:.2f} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
