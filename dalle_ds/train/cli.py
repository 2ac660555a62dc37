"""The command line shared by the entry points in ``launch/``: the trainers' (they differ in config class and trainer)
and the path checks of the others (``check_file``, ``check_out_dir``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

# the default of --stop_signals (dalle_ds.train.preemption)
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def _signals(text: str):
    from dalle_ds.train.preemption import parse_signals

    try:
        return parse_signals(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class LaunchedArgumentParser(argparse.ArgumentParser):
    """Under the ``deepspeed`` launcher every rank parses the same command line and fails alike: rank 0 (the
    launcher's ``RANK``) prints the usage and the error, the other ranks exit with the same code without a word."""

    def error(self, message: str):
        from dalle_ds.utils.ranks import is_job_rank0, let_rank0_speak_first

        if not is_job_rank0():
            let_rank0_speak_first()
            self.exit(2)
        super().error(message)


def build_parser(description: str, presets: dict[str, Any], default_preset: str) -> argparse.ArgumentParser:
    import deepspeed

    p = LaunchedArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default=default_preset,
                   help=f"run preset: {', '.join(presets)} (default: {default_preset})")
    p.add_argument("--config", default=None, help="JSON file overriding the preset (nested or dotted keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set steps=500 (repeatable)")
    p.add_argument("--ds_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value of the DeepSpeed config, e.g. --ds_set optimizer.params.lr=1e-3\n"
                        "(the key must exist in the file; +KEY=VALUE adds one; repeatable)")
    p.add_argument("--out", required=True, help="run folder (created; resumed from if it holds checkpoints)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over: an earlier run's checkpoints, logs and tokenizer in --out are moved into "
                        "<out>/replaced_<UTC time>/ first")
    p.add_argument("--stop_at", type=int, default=None,
                   help="checkpoint and exit after this many steps, as a preempted job would (rerun to resume)")
    p.add_argument("--stop_signals", default=",".join(DEFAULT_STOP_SIGNALS), type=_signals,
                   help="signals that stop the run after the next step with a checkpoint, as a preempted job\n"
                        "(exit code 128 + the signal; rerun to resume); the same signal twice stops at once;\n"
                        f"'none' keeps the default handlers (default: {','.join(DEFAULT_STOP_SIGNALS)})")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    deepspeed.add_config_arguments(p)
    return p


def run_training(argv: list[str] | None, *, description: str, cfg_class: type, presets: dict[str, Any],
                 default_preset: str, job_name: str, make_trainer: Callable[[Any, dict, str, bool], Any],
                 artifacts: Callable[[str], str]) -> int:
    """Parse → validate the run config and the DeepSpeed JSON (before any process group exists) → init → train."""
    from dalle_ds.config import ConfigError, build_run_config
    from dalle_ds.train.distributed import distributed_run
    from dalle_ds.train.ds_config import apply_ds_overrides, load_ds_config

    parser = build_parser(description, presets, default_preset)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (see ds_configs/)")
    if args.stop_at is not None and args.stop_at < 1:
        parser.error(f"--stop_at must be ≥ 1, got {args.stop_at}")
    check_out_dir(parser, "--out", args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = build_run_config(cfg_class, presets, args.preset, args.config, args.set)
        ds_raw = apply_ds_overrides(load_ds_config(args.deepspeed_config), args.ds_set)
    except ConfigError as e:  # before the process group: every rank finds it, rank 0 (the launcher's RANK) says it
        return input_error(str(e), "config error")
    with distributed_run():
        return _train(cfg, ds_raw, args, job_name, make_trainer, artifacts)


def _train(cfg, ds_raw: dict, args, job_name: str, make_trainer, artifacts) -> int:
    """The part of :func:`run_training` that runs inside the process group."""
    from dalle_ds.config import ConfigError
    from dalle_ds.train.distributed import is_rank0, rank, world_size
    from dalle_ds.train.ds_config import prepare_ds_config
    from deepspeed.accelerator import get_accelerator

    try:
        ds_cfg = prepare_ds_config(ds_raw, steps=cfg.steps, run_dir=args.out, job_name=job_name,
                                   world_size=world_size(), accelerator=get_accelerator().device_name())
        trainer = make_trainer(cfg, ds_cfg, args.out, args.resume)  # checks what needs the data or the engine
    except ConfigError as e:
        if getattr(e, "rank_local", False) and world_size() > 1:
            # Found by this rank alone (checkpoint.CheckpointError): the others may wait in a collective, so say it
            # here and leave by an exception, past distributed_run's final barrier; the launcher stops the rest.
            print(f"config error on rank {rank()}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if is_rank0():
            print(f"config error: {e}", file=sys.stderr)
        return 2
    summary = trainer.train(stop_at=args.stop_at, stop_signals=args.stop_signals)
    if summary.get("stopped_by"):
        import signal

        if is_rank0():
            print(f"stopped by {summary['stopped_by']} after step {summary['steps']}: checkpoint saved in "
                  f"{os.path.join(args.out, 'checkpoints')}; rerun the same command to resume", file=sys.stderr)
        return 128 + signal.Signals[summary["stopped_by"]].value
    if is_rank0() and summary["steps"] < cfg.steps:  # --stop_at: the checkpoint is the artifact, as after a signal
        print(f"stopped at step {summary['steps']} of {cfg.steps} (--stop_at): checkpoint saved in "
              f"{os.path.join(args.out, 'checkpoints')}; rerun without --stop_at to finish the run", file=sys.stderr)
    if is_rank0():
        ev = summary["eval"] or {}
        shown = {k: round(v, 4) for k, v in ev.items() if isinstance(v, float) and "/" not in k}
        print(json.dumps({"steps": summary["steps"], "train_seconds": round(summary["train_seconds"], 1), **shown},
                         indent=1))
        if summary["steps"] >= cfg.steps:
            print(artifacts(args.out))
    return 0


def input_error(message: str, kind: str = "error") -> int:
    """Say an error in the inputs (or the run config: ``kind`` "config error") found before the process group
    exists, once per job, and return exit code 2.

    Under the ``deepspeed`` launcher every rank loads the same inputs and fails alike: rank 0 says it; another rank
    waits for it (:func:`dalle_ds.utils.ranks.let_rank0_speak_first`: the launcher stops this rank once rank 0 has
    exited), and only if it is still running then (rank 0 did not fail: a file this node alone cannot read) says
    its own, with its rank."""
    from dalle_ds.utils.ranks import is_job_rank0, let_rank0_speak_first

    if is_job_rank0():
        print(f"{kind}: {message}", file=sys.stderr)
        return 2
    let_rank0_speak_first()
    print(f"{kind} on rank {os.environ.get('RANK')}: {message}", file=sys.stderr, flush=True)
    return 2


def check_file(p: argparse.ArgumentParser, flag: str, path: str, want: str, expect: str | None = None) -> None:
    """``p.error`` unless ``path`` is an existing file; a folder holding ``expect`` is named in the message."""
    f = Path(path)
    if f.is_dir():
        hint = f"did you mean {f / expect}?" if expect and (f / expect).is_file() else f"want {want}"
        p.error(f"{flag} {path}: is a folder, not a file; {hint}")
    if not f.is_file():
        p.error(f"{flag} {path}: file not found (want {want})")


def check_clip_dir(p: argparse.ArgumentParser, flag: str, path: str) -> None:
    """``p.error`` unless ``path`` is a CLIP folder (a ``config.json`` in it); a train_clip.py run folder, which holds
    the CLIP in ``clip/``, is named in the message."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        hint = (f"; did you mean {folder / 'clip'}?" if (folder / "clip" / "config.json").is_file()
                else " (want a folder written by launch/train_clip.py, or a local pretrained CLIP)")
        p.error(f"{flag} {path}: not a CLIP folder (no config.json){hint}")


def validate_data_flags(data, image_size: int, flags: dict[str, str]):
    """``data.validate(image_size)`` (a :class:`dalle_ds.config.DataConfig` built from command-line flags), with the
    config field names in its errors replaced by the flags that set them (``flags``: field → flag, e.g.
    ``{"train_split": "--split"}``), so the message names what the user typed."""
    from dalle_ds.config import ConfigError

    try:
        return data.validate(image_size, where="data")
    except ConfigError as e:
        msg = str(e)
        for field, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
            msg = msg.replace(f"data.{field}", flag)
        if msg.startswith("data: "):  # a check of several flags together
            msg = "arguments: " + msg[len("data: "):]
        raise ConfigError(msg) from None


def check_out_file(p: argparse.ArgumentParser, flag: str, path: str, suffixes: tuple[str, ...] = ()) -> None:
    """``p.error`` when the output file ``path`` cannot be written as one: it is a folder, a path above it is a
    file, or (with ``suffixes``) its extension is not one of them."""
    if not path.strip():
        p.error(f"{flag} is empty: name a file")
    out = Path(path)
    if out.is_dir():
        p.error(f"{flag} {path}: is a folder; name a file")
    if suffixes and out.suffix.lower() not in suffixes:
        p.error(f"{flag} {path}: want a file ending in {' or '.join(suffixes)}")
    check_out_dir(p, flag, str(out.parent))


def check_out_dir(p: argparse.ArgumentParser, flag: str, path: str) -> None:
    """``p.error`` when the output folder ``path`` cannot be a folder: it, or a path above it, is a file."""
    if not path.strip():
        p.error(f"{flag} is empty: name a folder")
    out = Path(path)
    if out.exists() and not out.is_dir():
        p.error(f"{flag} {path}: exists and is not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                p.error(f"{flag} {path}: {parent} is a file, not a folder")
            break
