"""List a run folder's checkpoints, and make the universal copy of one ahead of a resume on another number of GPUs.

Every trainer resumes on another number of ranks with its own command: rank 0 converts the checkpoint to
DeepSpeed's universal form (``<tag>/universal``) while the other ranks wait (README, "Many nodes"). For a large model
that conversion can outlast the collectives' timeout; run it here first, on one machine that sees the run folder:

    python launch/checkpoints.py --run runs/dalle                 # tag, world size, micro/global batch, ZeRO, size
    python launch/checkpoints.py --run runs/dalle --universal     # convert the latest (or --tag step00010000)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dalle_ds.config import ConfigError
from dalle_ds.train import checkpoint as ckpt


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def job_of(run: Path) -> str:
    """The job name of a run folder (its ``<job>_run_config.json``)."""
    return next((p.name[: -len("_run_config.json")] for p in sorted(run.glob("*_run_config.json"))), "train")


def describe(run: Path) -> list[dict]:
    """One row per checkpoint of ``run`` (oldest first): tag, whether ``latest`` names it, its layout (world size,
    micro-batch, global batch, ZeRO stage; None when unknown), bytes on disk and whether a universal copy exists."""
    ckpt_dir = run / "checkpoints"
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    job = job_of(run)
    rows = []
    for tag in ckpt.list_tags(ckpt_dir):
        universal = ckpt_dir / tag / ckpt.UNIVERSAL_DIR
        universal_bytes = _size(universal) if universal.is_dir() else None
        rows.append({"tag": tag, "latest": tag == latest, "layout": ckpt.saved_layout(run, job, tag),
                     "bytes": _size(ckpt_dir / tag) - (universal_bytes or 0), "universal_bytes": universal_bytes})
    return rows


def table(rows: list[dict]) -> str:
    head = "| tag | latest | ranks | micro-batch | global batch | ZeRO | size | universal copy |\n|---|---|---:|---:|---:|---:|---:|---|"
    lines = [head]
    for r in rows:
        lay = r["layout"] or {}
        u = r["universal_bytes"]
        lines.append(f"| {r['tag']} | {'yes' if r['latest'] else ''} | {lay.get('world_size', '?')} | "
                     f"{lay.get('micro_batch', '?')} | {lay.get('train_batch_size', '?')} | "
                     f"{lay.get('zero_stage', '?')} | {r['bytes'] / 2**20:.1f} MiB | "
                     f"{'' if u is None else f'{u / 2**20:.1f} MiB'} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder (the --out of a trainer)")
    p.add_argument("--universal", action="store_true",
                   help="make DeepSpeed's universal copy of a checkpoint (<tag>/universal) if it has none")
    p.add_argument("--tag", default=None, help="with --universal: this checkpoint (default: the one latest names)")
    args = p.parse_args(argv)
    if args.tag and not args.universal:
        p.error("--tag goes with --universal")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        # the checkpoints folder itself given (its name, a `latest` file or step folders): name the run folder above it
        looks_like = run.resolve().name == "checkpoints" or (run / "latest").is_file() or bool(ckpt.list_tags(run))
        parent = run.parent if run.name not in ("", "..") else run.resolve().parent  # Path(".").name is ""
        hint = f"; did you mean --run {parent}?" if run.is_dir() and looks_like else ""
        print(f"error: {run} holds no checkpoints folder: not a run folder, or one that never saved{hint}",
              file=sys.stderr)
        return 2
    try:
        if args.universal:
            tag = args.tag or ckpt.latest_tag(run / "checkpoints")
            if tag is None or not (run / "checkpoints" / tag).is_dir():
                raise ConfigError(f"no checkpoint {tag or '(latest)'} in {run / 'checkpoints'}")
            layout = ckpt.saved_layout(run, job_of(run), tag)
            if layout is not None and layout["zero_stage"] == 0:
                raise ConfigError(f"{tag} is a ZeRO-0 checkpoint: it has no sharded optimizer state, and loads on "
                                  "any number of ranks as it is (no universal copy needed)")
            try:
                made = ckpt.universal_tag(run / "checkpoints", tag)
            except RuntimeError as e:  # ds_to_universal failed (a damaged shard): its output's tail is the reason
                raise ConfigError(f"{e}\n(checkpoint {tag} cannot be converted; resume from another tag, or from "
                                  "the same number of GPUs it was written on)") from None
            print(f"universal copy of {tag}: {run / 'checkpoints' / made}")
        print(table(describe(run)))
    except ConfigError as e:  # CheckpointError included: a layout.json that does not read
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
