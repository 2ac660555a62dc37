#!/usr/bin/env python
"""Import the dVAE OpenAI released with the paper as a dvae.pt, so stage 2 can start from the paper's own stage 1.

    # once, where there is internet (https://github.com/openai/DALL-E): the two files, ~100 MB together
    curl -LO https://cdn.openai.com/dall-e/encoder.pkl && curl -LO https://cdn.openai.com/dall-e/decoder.pkl
    python launch/import_dvae.py --encoder encoder.pkl --decoder decoder.pkl --out runs/openai_dvae \
        --preview_data imagefolder --preview_path /data/images_val      # optional: reconstructions.png + numbers
    deepspeed --num_gpus 8 launch/tokenize_images.py --dvae runs/openai_dvae/dvae.pt --data imagefolder ...

The files are read without running code from them (dalle_ds/models/openai_dvae.py: the release's classes are
replaced by stand-ins while unpickling; the ``dall_e`` package is not needed). The model's shape is read off the
tensors (the release: 256 px → 32×32 codes, K = 8192, the ``paper`` preset); ``--image_size`` sets the side it is fed.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dalle_ds.config import DATASET_NAMES
from dalle_ds.train.cli import check_file, check_out_dir, validate_data_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="the release's encoder.pkl (or a state dict saved from it)")
    p.add_argument("--decoder", required=True, help="the release's decoder.pkl (or a state dict saved from it)")
    p.add_argument("--out", required=True, help="folder for dvae.pt (and the preview)")
    p.add_argument("--image_size", type=int, default=256,
                   help="side of the images the model is fed (the release was trained at 256); a multiple of the "
                        "downsampling factor")
    p.add_argument("--preview_data", default=None, choices=DATASET_NAMES,
                   help="reconstruct images of this dataset through the imported codes: reconstructions.png and "
                        "the error, PSNR and code usage in import.json")
    p.add_argument("--preview_path", default=None, help="with --preview_data: its folder / shards")
    p.add_argument("--preview_split", default="train")
    p.add_argument("--preview_images", type=int, default=16)
    args = p.parse_args(argv)
    check_file(p, "--encoder", args.encoder, "the release's encoder.pkl", expect="encoder.pkl")
    check_file(p, "--decoder", args.decoder, "the release's decoder.pkl", expect="decoder.pkl")
    check_out_dir(p, "--out", args.out)
    if args.image_size < 1:
        p.error(f"--image_size must be ≥ 1, got {args.image_size}")
    if args.preview_images < 1:
        p.error(f"--preview_images must be ≥ 1, got {args.preview_images}")
    if args.preview_path and not args.preview_data:
        p.error("--preview_path goes with --preview_data")
    return args


#: what import.json and dvae.pt record as the weights' origin (an earlier import may be replaced, nothing else)
SOURCE = "openai/DALL-E release"


def check_out_replaceable(out: Path) -> None:
    """ValueError when ``out`` already holds a dvae.pt that is not an earlier import of the release: a dVAE trained
    there by train_dvae.py (the README's stage-1 folder is runs/dvae for both) would be replaced without a word,
    and token shards and priors made with it would then be decoded by another model."""
    from dalle_ds.train.checkpoint import load_artifact

    existing = out / "dvae.pt"
    if not existing.exists():
        return
    try:  # mapped, not read: only the metadata is looked at
        source = (load_artifact(existing, "dalle_ds.dvae", "dVAE", mmap=True).get("metrics") or {}).get("source")
    except (FileNotFoundError, ValueError):
        source = None
    if source != SOURCE:
        raise ValueError(f"--out {out}: holds a dvae.pt that is not an import of OpenAI's release (a dVAE trained "
                         f"there?); importing would replace it: choose another --out, or remove {existing} first")


def preview_dataset(args, image_size: int):
    """The ``--preview_data`` images as centred squares at the model's size (None without the flag)."""
    if not args.preview_data:
        return None
    from dalle_ds.config import DataConfig
    from dalle_ds.data.registry import build_dataset

    data = DataConfig(name=args.preview_data, path=args.preview_path, train_split=args.preview_split,
                      train_samples=args.preview_images)
    validate_data_flags(data, image_size, {"name": "--preview_data", "path": "--preview_path",
                                           "train_split": "--preview_split", "train_samples": "--preview_images"})
    extra = {"require_caption": False} if data.name in ("imagefolder", "webdataset") else {}
    ds = build_dataset(data.name, args.preview_split, **data.dataset_kwargs(args.preview_split, image_size), **extra)
    if len(ds) == 0:
        raise ValueError(f"--preview_data {args.preview_data}: no readable images")
    return ds


def preview(model, ds, n: int, out: Path) -> dict:
    """Encode and decode ``n`` images of ``ds``: the metrics of dalle_ds.eval.dvae_eval and a picture, originals
    above their reconstructions."""
    from dalle_ds.eval.dvae_eval import evaluate_reconstructions
    from dalle_ds.utils.images import reconstruction_grid, save_png

    metrics, ex = evaluate_reconstructions(model, ds, n, batch_size=8)
    c = model.cfg
    ncol = min(8, len(ex["originals"]))  # no blank columns for a short preview
    save_png(reconstruction_grid(ex["originals"], ex["recons"], ncol=ncol, scale=max(1, 128 // c.image_size)),
             out / "reconstructions.png",
             title=f"imported dVAE: originals (above) and through {c.grid_size}x{c.grid_size} codes (below), "
                   f"PSNR {metrics['recon_psnr_db']:.1f} dB")
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    from dalle_ds.models.openai_dvae import import_release
    from dalle_ds.train.dvae_trainer import export_dvae, load_dvae
    from dalle_ds.train.engine_loop import parameter_count

    out = Path(args.out)
    try:  # everything that can fail on the inputs fails here, before anything is written
        check_out_replaceable(out)
        model = import_release(args.encoder, args.decoder, args.image_size)
        ds = preview_dataset(args, model.cfg.image_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = model.cfg
    source = {"source": SOURCE, "encoder": str(Path(args.encoder).resolve()),
              "decoder": str(Path(args.decoder).resolve())}
    export_dvae(out / "dvae.pt", c, model.state_dict(), 0, source)
    load_dvae(out / "dvae.pt")  # what stage 2 will do: fail here, not there
    print(f"dVAE written to {out / 'dvae.pt'}: {parameter_count(model) / 1e6:.1f}M parameters, "
          f"{c.image_size}x{c.image_size} images -> {c.grid_size}x{c.grid_size} codes of K = {c.vocab_size} "
          f"({c.groups} groups x {c.blocks_per_group} blocks, hidden {c.hidden}, decoder input {c.decoder_init})")
    report = {**source, "config": asdict(c)}
    if ds is not None:
        m = report["preview"] = preview(model, ds, args.preview_images, out)
        print(f"preview: {m['num_images']} images, MSE {m['recon_mse']:.5f}, PSNR {m['recon_psnr_db']:.2f} dB, "
              f"{m['codes_used']} codes used (perplexity {m['codebook_perplexity']:.1f}); "
              f"picture: {out / 'reconstructions.png'}")
    (out / "import.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
