"""``python -m dalle_ds.ops.fp169 [--build] [--verbose]``: show (and optionally build) the fp169 ops."""
from __future__ import annotations

import argparse
import logging

from . import _ext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", action="store_true", help="build the ops now if this machine has no cached build")
    ap.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.build:
        _ext.load(verbose=args.verbose)
    for row in _ext.status(build=args.build):
        print(f"{row['name']:<12} {'yes' if row['available'] else 'no ':<4} {row['reason']}")


if __name__ == "__main__":
    main()
