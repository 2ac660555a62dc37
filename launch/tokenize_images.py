#!/usr/bin/env python
"""Turn a dataset into image-token shards for stage 2 (dVAE encoder argmax, no Gumbel noise).

    deepspeed --num_gpus 2 launch/tokenize_images.py --dvae runs/demo/dvae/dvae.pt \
        --data shapes --split train --num_samples 20000 --out runs/demo/tokens/train
    python launch/tokenize_images.py --dvae dvae.pt --data imagefolder --path DIR --out tokens/train

Each rank encodes every world_size-th sample and writes its own parts into ``<out>/incomplete/``; once every rank has
finished, rank 0 writes meta.json there and moves the new set into ``--out``, replacing an earlier run's (meta.json
last), so a run that fails part-way leaves the earlier complete set as it was. Captions (and the shapes scene, when
there is one) are stored next to the codes.

Each image is stored as its centred square, or with ``--crops K`` as K of the paper's random crops for the prior
(Listing 2, dalle_ds/data/augment.py, seeded by ``--seed``): the prior's training then reads crop ``e mod K`` of
every image in epoch ``e``, the paper's augmentation at the price of K encodings per image, and with K crops to
go round instead of a new one every epoch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dalle_ds.config import DATASET_NAMES, DataConfig
from dalle_ds.train.cli import LaunchedArgumentParser, check_file, check_out_dir, input_error, validate_data_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = LaunchedArgumentParser(description=__doc__.split("\n\n")[0])  # rank 0 alone reports a bad command line
    p.add_argument("--dvae", required=True, help="dvae.pt written by launch/train_dvae.py")
    p.add_argument("--data", default="shapes", choices=DATASET_NAMES)
    p.add_argument("--path", default=None, help="imagefolder dir / webdataset shards / fashion-mnist dir")
    p.add_argument("--split", default="train")
    p.add_argument("--num_samples", type=int, default=20000, help="shapes only: how many scenes")
    p.add_argument("--seed", type=int, default=0, help="shapes: the dataset seed; with --crops: the crops' seed")
    p.add_argument("--crops", type=int, default=0,
                   help="imagefolder / webdataset: store K random crops per image (the prior's Listing 2) instead "
                        "of the centred square; training reads crop e mod K in epoch e")
    p.add_argument("--max_aspect_ratio", type=float, default=0.0,
                   help="imagefolder / webdataset: leave out images whose longer side exceeds this multiple of the "
                        "shorter (the paper keeps [1/2, 2]: 2); 0 keeps all")
    p.add_argument("--image_key", default=None,
                   help="webdataset: the member holding the image (default: the first of png, jpg, webp, ... found)")
    p.add_argument("--caption_key", default=None,
                   help="imagefolder: the caption column of metadata.jsonl / .csv; webdataset: the caption member "
                        "(default: the first of text, caption, txt, ... found)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--rows_per_shard", type=int, default=8192,
                   help="rows per part file (each rank's last part holds the rest)")
    p.add_argument("--bf16", action="store_true",
                   help="encode under bf16 autocast with channels_last weights, as the demo's dVAE trains "
                        "(ds_configs/cpu_dvae.json); ~2.9x faster on a CPU with AMX or AVX-512 BF16, a few codes in a "
                        "thousand come out different from fp32")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag, low in (("batch_size", 1), ("num_workers", 0), ("rows_per_shard", 1), ("num_samples", 1),
                      ("crops", 0)):
        if getattr(args, flag) < low:
            p.error(f"--{flag} must be ≥ {low}, got {getattr(args, flag)}")
    if args.crops and args.data not in ("imagefolder", "webdataset"):
        p.error(f"--crops applies to imagefolder and webdataset images; {args.data} renders its images at the "
                "dVAE's size")
    check_file(p, "--dvae", args.dvae, "the dvae.pt written by launch/train_dvae.py", expect="dvae.pt")
    check_out_dir(p, "--out", args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from dalle_ds.data.registry import build_dataset
    from dalle_ds.train.distributed import barrier, distributed_run, is_rank0
    from dalle_ds.train.dvae_trainer import load_dvae

    # The dVAE and the data fail here, before the process group starts and before --out is touched, as one line:
    # the errors the loaders raise for a wrong-kind or unreadable dVAE and for a missing, empty or unusable dataset
    # (ConfigError is a ValueError). Anything else keeps its traceback.
    try:
        dvae = load_dvae(args.dvae)
        data = DataConfig(name=args.data, path=args.path, train_split=args.split, train_samples=args.num_samples,
                          seed=args.seed, max_aspect_ratio=args.max_aspect_ratio, image_key=args.image_key,
                          caption_key=args.caption_key,
                          augment="paper" if args.crops else "none")
        validate_data_flags(data, dvae.cfg.image_size, {
            "name": "--data", "path": "--path", "train_split": "--split", "train_samples": "--num_samples",
            "max_aspect_ratio": "--max_aspect_ratio", "augment": "--crops", "image_key": "--image_key",
            "caption_key": "--caption_key", "seed": "--seed"})
        ds = build_dataset(data.name, args.split, **data.dataset_kwargs(
            args.split, dvae.cfg.image_size, crop="prior" if args.crops else None, seed=args.seed))
    except (FileNotFoundError, ValueError) as e:
        return input_error(str(e))
    if len(ds) == 0:
        return input_error(f"{describe_data(args)} has no readable samples; nothing to tokenize (wrote nothing to "
                           f"{args.out})")
    out = Path(args.out)
    staging = out / STAGING
    with distributed_run():
        if is_rank0():
            start_staging(staging)
        barrier()
        parts = all_parts(tokenize_share(args, ds, dvae, staging))
        if is_rank0():
            if not write_index(args, data, dvae.cfg, parts, staging):
                print(f"note: the shards already in --out {out} (if any) are kept; the new ones stay in {staging}",
                      file=sys.stderr)
                return 2
            replace_earlier_shards(out)
            move_into_place(staging, out, parts)
            report(args, out)
    return 0


#: where a run writes its shards until every rank has finished and the index reads them (then they move into --out)
STAGING = "incomplete"


def start_staging(staging: Path) -> None:
    """An empty staging folder (rank 0, before any rank writes): what an interrupted run left there is removed."""
    if staging.exists():
        print(f"note: removing {staging}, the shards of an unfinished earlier run", file=sys.stderr)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)


def move_into_place(staging: Path, out: Path, parts: list[str]) -> None:
    """The new shards replace the old ones only once all are written and indexed: a run that fails or is stopped
    part-way keeps the folder's complete set (it was removed first, then rewritten). meta.json moves last, so a stop
    during the moves leaves a folder without one, which the later stages refuse."""
    for name in parts:
        for suffix in (".tokens.npy", ".jsonl"):
            os.replace(staging / f"{name}{suffix}", out / f"{name}{suffix}")
    os.replace(staging / "meta.json", out / "meta.json")
    staging.rmdir()


def replace_earlier_shards(out: Path) -> None:
    """A re-run replaces the folder's shards (meta.json first, so it is never stale), and says what they were: a
    held-out split tokenized into the training folder by mistake replaced the training tokens without a word."""
    meta, parts = out / "meta.json", sorted(out.glob("part-*"))
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
            what = (f"{old.get('num_samples', '?')} rows of {old.get('dataset', '?')} split {old.get('split', '?')!r}"
                    if isinstance(old, dict) else "a meta.json")
        except (ValueError, OSError):
            what = "a meta.json that does not read"
        print(f"note: --out {out} held token shards ({what}): replaced", file=sys.stderr)
    elif parts:
        print(f"note: --out {out} held {len(parts)} part files of an unfinished tokenization: removed", file=sys.stderr)
    for old in [meta, *parts]:
        old.unlink(missing_ok=True)


def describe_data(args) -> str:
    where = f" --path {args.path}" if args.path else ""
    return f"--data {args.data}{where} (split {args.split!r})"


def all_parts(mine: list[str]) -> list[str]:
    """Every rank's shard names, in rank order (a collective; it also waits for every rank to have flushed). Taken
    from the ranks themselves, not from a listing of the folder: on a filesystem shared over the network (NFS caches
    directory listings for tens of seconds) rank 0 may not yet see another node's new files in a listing."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(mine)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(mine))
    return [name for names in gathered for name in names]


def tokenize_share(args, ds, dvae, folder: Path) -> list[str]:
    """Encode this rank's share of the dataset ``ds`` (every world_size-th image) into its own token shards in
    ``folder``; returns their names."""
    from dalle_ds.data.images import collate_samples
    from dalle_ds.data.token_shards import ShardWriter
    from dalle_ds.train.data_loading import loader_kwargs, to_device
    from dalle_ds.train.distributed import device, is_rank0, rank, world_size

    dev = device()
    dvae = dvae.to(dev)
    autocast = dvae.bf16_inference(args.bf16)
    indices = range(rank(), len(ds), world_size())
    # (crop c, image i) keys draw crop c of image i (the dataset's PaperCrop, as training's (epoch, index) would)
    mine = Subset(ds, [(c, i) for c in range(args.crops) for i in indices] if args.crops else list(indices))
    loader = DataLoader(mine, batch_size=args.batch_size, collate_fn=collate_samples,
                        **loader_kwargs(dev, args.num_workers))
    writer = ShardWriter(folder, rank(), dvae.cfg.grid_size, dvae.cfg.vocab_size, args.rows_per_shard)
    position = 0
    for batch in tqdm(loader, desc=f"tokenize {args.split}", disable=not is_rank0(), dynamic_ncols=True):
        with autocast:
            tokens = dvae.encode(to_device(batch["image"], dev))
        records = []
        for j, caption in enumerate(batch["caption"]):
            key = mine.indices[position + j]
            rec = {"index": key[1], "crop": key[0], "caption": caption} if args.crops else {"index": key,
                                                                                             "caption": caption}
            if "scene" in batch:
                rec["scene"] = batch["scene"][j]
            records.append(rec)
        position += len(records)
        writer.add(tokens, records)
    writer.flush()
    return writer.parts


def write_index(args, data: DataConfig, dvae_cfg, parts: list[str], folder: str | Path | None = None) -> bool:
    """meta.json over every rank's shards ``parts`` in ``folder`` (default ``--out``; rank 0, after all have flushed);
    False, with no meta.json written (a folder without one is refused by the later stages), when no rank wrote a row
    or rank 0 cannot read a shard another rank wrote (``--out`` not on a filesystem every node sees)."""
    from dalle_ds.data.token_shards import write_meta

    if not parts:
        print(f"error: no token rows written from {describe_data(args)}; no meta.json written to {args.out}",
              file=sys.stderr)
        return False
    try:
        write_meta(args.out if folder is None else folder, parts, dvae_cfg.grid_size, dvae_cfg.vocab_size,
                   {"dvae": os.path.abspath(args.dvae), "dataset": data.name, "split": args.split,
                    "path": args.path, "seed": args.seed, "bf16": args.bf16, "crops": args.crops})
    except FileNotFoundError as e:
        print(f"error: rank 0 cannot read a shard another rank wrote ({e}); --out {args.out} must be on a "
              f"filesystem every node sees; no meta.json written", file=sys.stderr)
        return False
    return True


def report(args, out: Path) -> None:
    meta = json.loads((out / "meta.json").read_text())
    crops = f", {args.crops} random crops of each image" if args.crops else ""
    print(f"wrote {meta['num_samples']} token rows ({meta['grid_size']}×{meta['grid_size']} codes, "
          f"K={meta['vocab_size']}{crops}) in {len(meta['shards'])} parts to {out}")


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
