"""Checkpoints through the DeepSpeed engine, made atomic, plus atomically written exported artifacts.

DeepSpeed writes a checkpoint as a folder ``<dir>/<tag>/`` (model, optimizer and ZeRO shards) and a ``latest`` file
naming the tag. A crash while the folder is being written must never leave ``latest`` pointing at a half-written
checkpoint, so we save with ``save_latest=False`` and, once every rank has finished (a barrier), rank 0 replaces
``latest`` with an atomic ``os.replace``. Older tags beyond ``keep`` are deleted only after that.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dalle_ds.config import ConfigError
from dalle_ds.train.distributed import barrier, check_same_on_every_rank, failures_on_any_rank, is_rank0
from dalle_ds.train.distributed import rank as dist_rank
from dalle_ds.utils.errors import first_line
from dalle_ds.utils.files import atomic_path, atomic_write_bytes

log = logging.getLogger("dalle_ds.train")

_TAG = re.compile(r"^step(\d+)$")

# What reading a damaged checkpoint file raises (torch.load / DeepSpeed / json): turned into one clear error.
_READ_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError, KeyError)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read; the trainers report it as one line, like a config error.

    ``rank_local``: raised on the ranks that hit it only (inside DeepSpeed's load, where each rank reads its own
    shards and the others may already wait in a collective); the trainers then print it on that rank and exit
    without the final barrier, and the launcher stops the other ranks (``cli._train``)."""

    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local


def _unreadable_message(where: Path, e: BaseException) -> str:
    return (f"checkpoint {where} could not be read ({type(e).__name__}: {first_line(e)}). Checkpoints are committed "
            "only once every file is written, so a damaged one was changed afterwards (disk, copy): point "
            "checkpoints/latest at an earlier tag, or start over with --no-resume")


def _unreadable(where: Path, e: BaseException, rank_local: bool = False) -> CheckpointError:
    return CheckpointError(_unreadable_message(where, e), rank_local=rank_local)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_artifact(path: str | Path, kind: str, what: str, map_location: str | torch.device = "cpu",
                  mmap: bool = False) -> dict[str, Any]:
    """Load an exported artifact (``{"kind": kind, "config": ..., "state_dict": ...}``), with clear errors.
    ``mmap``: map the file instead of reading it (tensors are read when touched)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    try:
        blob = torch.load(p, map_location=map_location, weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # truncated, not a torch file, ...
        raise ValueError(f"{p} is not a readable {what} file (torch.load: {first_line(e, 120)})") from e
    if not isinstance(blob, dict) or blob.get("kind") != kind:
        raise ValueError(f"{p} is not a {what} exported by dalle_ds (found kind "
                         f"{blob.get('kind') if isinstance(blob, dict) else type(blob).__name__!r}, want {kind!r})")
    return blob


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def list_tags(ckpt_dir: str | Path) -> list[str]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if p.is_dir() and _TAG.match(p.name)), key=lambda t: int(t[4:]))


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The committed tag named by ``latest``, or None when there is no ``latest`` (no complete checkpoint).

    A ``latest`` that is empty or names a missing folder raises :class:`ConfigError`: starting over from step 0
    there would, at the first save, prune the checkpoints that do exist."""
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not tag or not (Path(ckpt_dir) / tag).is_dir():
        have = list_tags(ckpt_dir)
        raise ConfigError(f"{f} names checkpoint {tag!r}, which does not exist (present: "
                          f"{', '.join(have) or 'none'}); write one of them into {f} to resume from it, or pass "
                          "--no-resume / another --out to start over")
    return tag


# Model-config keys that a resumed run may change: how the same weights are computed or were initialized, not their
# shapes or meaning (anything else under ``model.`` refuses to resume).
RESUMABLE_MODEL_KEYS = frozenset({"attn_backend", "dropout", "activation_checkpointing", "logits_matmul",
                                  "resblock_dtype", "init_std", "code_embedding_std", "logit_scale_init",
                                  "vision_position_init"})


def architecture_differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    """The model-config keys (``model.<key>``) whose change means other weights, as "key old -> new; ..." (at most
    six), or "" when the weights of ``before`` fit ``now`` (:data:`RESUMABLE_MODEL_KEYS` may differ)."""
    from dalle_ds.utils.dicts import flatten

    b, n = (flatten({"model": json.loads(json.dumps(c))}) for c in (before, now))  # tuples -> lists, as saved
    keys = sorted(k for k in b.keys() | n.keys() if b.get(k) != n.get(k) and k.split(".", 1)[1]
                  not in RESUMABLE_MODEL_KEYS)
    return "; ".join(f"{k} {b.get(k)!r} -> {n.get(k)!r}" for k in keys[:6])


def has_checkpoint_of(run_dir: str | Path, job: str) -> bool:
    """Whether ``run_dir`` holds a committed checkpoint of a ``job`` run (one to resume). Raises
    :class:`ConfigError` when its checkpoints belong to another job (a prior's folder given to the CLIP trainer):
    the trainers call this first, before they write anything into the folder."""
    run_dir = Path(run_dir)
    if latest_tag(run_dir / "checkpoints") is None:
        return False
    if not (run_dir / f"{job}_run_config.json").is_file():
        others = sorted(p.name[: -len("_run_config.json")] for p in run_dir.glob("*_run_config.json"))
        raise ConfigError(f"{run_dir} holds checkpoints of another run ({', '.join(others) or 'unknown'}), not of a "
                          f"{job} run: use another --out")
    return True


#: What a run leaves in its folder besides the exported artifacts, as a later start reads it back: moved aside
#: together by :func:`set_aside_for_new_run` (the caption tokenizer folder of the prior and CLIP jobs too).
RUN_STATE = ("checkpoints", "monitor", "{job}_run_config.json", "{job}_ds_config.json", "{job}_partial_metrics.json")


def _aside_folder(run_dir: Path) -> Path:
    """Where an earlier run's files go when a start sets them aside: ``<run_dir>/replaced_<UTC time>``, with
    ``-2``, ``-3``... when that name is taken (two starts within a second). Read by rank 0, which moves the files."""
    import time

    base = run_dir / f"replaced_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    aside, n = base, 1
    while aside.exists():
        n += 1
        aside = base.with_name(f"{base.name}-{n}")
    return aside


def set_aside_for_new_run(run_dir: str | Path, job: str, also: tuple[str, ...] = (),
                          keep: tuple[str | Path | None, ...] = ()) -> Path | None:
    """Collective. For a ``job`` run that does not resume (``--no-resume``) in a folder holding a committed
    checkpoint of that job: rank 0 moves the earlier run's state (:data:`RUN_STATE`, and ``also``, e.g. its caption
    tokenizer folder) into ``<run_dir>/replaced_<UTC time>/`` before this run writes anything, and says so. An
    ``also`` entry that one of the ``keep`` paths names (this run's configured tokenizer is the folder's own) stays.
    Returns that folder (None when there was nothing to move; a folder of another job's checkpoints is refused, as
    on resume).

    Left in place, the two runs would mix: until this run's first save, a later start resumes the earlier run's
    ``latest`` with this run's tokenizer; DeepSpeed rewrites a tag of the same step in place, among the earlier
    run's files; the pruning keeps the highest steps, the earlier run's; the CSV logs gain a second history."""
    run_dir = Path(run_dir)
    if not has_checkpoint_of(run_dir, job):  # every rank reads it before rank 0 moves anything
        return None
    barrier()
    aside = _aside_folder(run_dir)
    if is_rank0():
        kept = {Path(k).resolve() for k in keep if k}
        names = [n.format(job=job) for n in RUN_STATE] + [n for n in also if (run_dir / n).resolve() not in kept]
        moved = [n for n in names if (run_dir / n).exists()]
        aside.mkdir()
        for name in moved:
            os.replace(run_dir / name, aside / name)
        log.warning("--no-resume: %s held a checkpoint of an earlier %s run; its %s moved to %s (delete it once "
                    "it is not needed)", run_dir, job, ", ".join(moved), aside)
    barrier()
    return aside


def set_aside_later_tags(run_dir: str | Path, tag: str) -> Path | None:
    """Collective. Resuming from ``tag`` while the folder holds tags of later steps (``latest`` pointed back at an
    earlier checkpoint, or a save a crash left half-written): rank 0 moves those into
    ``<run_dir>/replaced_<UTC time>/checkpoints/`` and says so. Left in place, the resumed run would save into their
    folders among their old files (a stale ``universal/`` copy would then be trusted on a later resume on another
    number of ranks), and the pruning, which keeps the highest steps, would delete this run's newer checkpoints
    first. Returns that folder, or None when there was nothing later."""
    run_dir = Path(run_dir)
    later = [t for t in list_tags(run_dir / "checkpoints") if int(t[4:]) > int(tag[4:])]
    barrier()  # every rank has listed the folder before rank 0 moves anything
    if not later:
        return None
    aside = _aside_folder(run_dir) / "checkpoints"
    if is_rank0():
        aside.mkdir(parents=True, exist_ok=True)
        for t in later:
            os.replace(run_dir / "checkpoints" / t, aside / t)
        log.warning("resuming from %s: the later checkpoint(s) %s were not committed by `latest`; moved to %s",
                    tag, ", ".join(later), aside)
    barrier()
    return aside


def check_resume(run_dir: str | Path, job: str, run_config: dict[str, Any], ds_config: dict[str, Any]) -> list[str]:
    """Before resuming from ``run_dir``: refuse what cannot resume, list what changed.

    Raises :class:`ConfigError` when the folder holds another job's checkpoints, when the model config differs
    (the weights would not fit; :data:`RESUMABLE_MODEL_KEYS` may change) or the Adam moments' format does, or when
    the ZeRO stage differs from the run that wrote them. Returns the other changed keys (for a warning: a longer
    ``steps`` or a new learning rate is a legitimate reason to resume). Reads the ``<job>_run_config.json`` the
    earlier run wrote and the checkpoint's layout (:func:`saved_layout`); a folder without a committed checkpoint
    passes. A different number of ranks is no refusal (:func:`universal_tag`)."""
    from dalle_ds.train.ds_config import precision_mode, zero_stage
    from dalle_ds.utils.dicts import flatten

    run_dir = Path(run_dir)
    if not has_checkpoint_of(run_dir, job):
        return []
    tag = latest_tag(run_dir / "checkpoints")
    old_config = json.loads((run_dir / f"{job}_run_config.json").read_text())
    before, now = flatten(old_config), flatten(json.loads(json.dumps(run_config)))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    model = architecture_differences(old_config.get("model", {}), run_config.get("model", {}))
    if model:
        raise ConfigError(f"cannot resume from {run_dir}: the model differs from the checkpoint's ({model}); use "
                          "another --out, or --no-resume to start over")
    moments = before.get("adam_moments", "fp32"), now.get("adam_moments", "fp32")  # runs before the key: fp32
    if moments[0] != moments[1]:  # 16-bit codes and fp32 moments are not each other's state
        raise ConfigError(f"cannot resume from {run_dir}: its optimizer state holds {moments[0]} Adam moments, this "
                          f"run asks for {moments[1]}")
    # the checkpoint's own record (the run's ds_config file is rewritten by every start, even one that then fails)
    layout = saved_layout(run_dir, job, tag)
    if layout is not None and layout["zero_stage"] != zero_stage(ds_config):
        raise ConfigError(f"cannot resume from {run_dir}: its checkpoints were written with ZeRO stage "
                          f"{layout['zero_stage']}, this run uses {zero_stage(ds_config)}")
    mode = precision_mode(ds_config)
    if layout is not None and layout.get("precision", mode) != mode:  # DeepSpeed names and lays out its state by it
        raise ConfigError(f"cannot resume from {run_dir}: its checkpoints were written in DeepSpeed's "
                          f"{layout['precision']} mode, this run asks for {mode} (the optimizer state is kept per "
                          "mode); keep the precision, or start a new run from the exported weights (init_from)")
    return changed


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep: int = 2,
                    rank_state: dict[str, Any] | None = None, layout: dict[str, int] | None = None) -> str:
    """Collective: every rank must call it. Returns the tag written.

    ``client_state`` goes into DeepSpeed's model-states file (written by data-parallel rank 0 only); ``rank_state``
    is this rank's own state (e.g. its ZeRO-3 share of the EMA), written by every rank as ``<tag>/rank<R>.pt``;
    ``layout`` (world size, micro-batch, ZeRO stage) goes to ``<tag>/layout.json``, read by :func:`saved_layout`
    before a resume builds its engine.
    """
    tag = step_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if rank_state is not None:
        atomic_torch_save(rank_state, Path(ckpt_dir) / tag / f"rank{dist_rank()}.pt")
    if layout is not None and is_rank0():
        atomic_write_bytes(Path(ckpt_dir) / tag / LAYOUT_FILE, (json.dumps(layout, sort_keys=True) + "\n").encode())
    barrier()
    if is_rank0():
        atomic_write_bytes(Path(ckpt_dir) / "latest", tag.encode())
        if keep > 0:
            for old in list_tags(ckpt_dir)[:-keep]:
                if old != tag:
                    shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    barrier()
    return tag


def resume_tag(ckpt_dir: str | Path) -> str | None:
    """The committed tag to resume from (:func:`latest_tag`), checked to be the same on every rank (collective)."""
    tag = latest_tag(ckpt_dir)
    check_same_on_every_rank(f"the checkpoint to resume ({Path(ckpt_dir) / 'latest'})", tag,
                             "every rank must see the same run folder (a filesystem shared by every node, with "
                             "rank 0's latest write visible to all)")
    return tag


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, universal: bool = False,
                    own_state: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load checkpoint ``tag`` (:func:`resume_tag`) into ``engine``.

    ``universal``: load DeepSpeed's universal copy of it (:func:`universal_tag`; the engine must have been built with
    ``checkpoint.load_universal``). Returns (client_state, this rank's rank_state, or None when there is none or
    ``own_state`` is False).
    """
    load = universal_tag(ckpt_dir, tag) if universal else tag
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load)
    except _READ_ERRORS as e:  # each rank reads its own shards: this rank alone may fail here
        raise _unreadable(Path(ckpt_dir) / load, e, rank_local=True) from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / load}", rank_local=True)
    own = Path(ckpt_dir) / tag / f"rank{dist_rank()}.pt"
    rank_state, error = None, None
    try:
        rank_state = torch.load(own, map_location="cpu", weights_only=False) if own_state and own.is_file() else None
    except _READ_ERRORS as e:
        error = _unreadable_message(own, e)
    # Only this rank reads its file: every rank learns whether any failed, and all raise the same error together.
    failed = failures_on_any_rank(error)
    if failed:
        others = f" (the same kind of failure on {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise CheckpointError(failed[0][1] + others)
    return client_state or {}, rank_state


# ----------------------------------------------------------------------------------------------------------------
# resuming on another number of ranks
# ----------------------------------------------------------------------------------------------------------------
LAYOUT_FILE = "layout.json"
UNIVERSAL_DIR = "universal"


def saved_layout(run_dir: str | Path, job: str, tag: str) -> dict[str, Any] | None:
    """How checkpoint ``tag`` of ``run_dir`` was trained: ``{"world_size", "micro_batch", "train_batch_size",
    "zero_stage"}`` (integers) and, for checkpoints written since 2026-12-07, ``"precision"`` (DeepSpeed's mode:
    "bf16", "fp16" or "fp32", ``ds_config.precision_mode``).

    Read from ``<tag>/layout.json``; checkpoints written before that file existed fall back to the run's
    ``<job>_ds_config.json`` (batch sizes and ZeRO stage; call this before the new run overwrites it). None when
    neither is there."""
    from dalle_ds.train.ds_config import zero_stage

    f = Path(run_dir) / "checkpoints" / tag / LAYOUT_FILE
    if f.is_file():
        try:
            return {k: v if k == "precision" else int(v) for k, v in json.loads(f.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as e:  # not JSON, not an object, not integers
            raise _unreadable(f, e) from e
    old_ds = Path(run_dir) / f"{job}_ds_config.json"
    if not old_ds.is_file():
        return None
    ds = json.loads(old_ds.read_text())
    mb, ga, tb = (ds.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                      "train_batch_size"))
    if not (isinstance(mb, int) and isinstance(ga, int) and isinstance(tb, int)) or tb % (mb * ga):
        return None
    return {"world_size": tb // (mb * ga), "micro_batch": mb, "train_batch_size": tb, "zero_stage": zero_stage(ds)}


def universal_tag(ckpt_dir: str | Path, tag: str) -> str:
    """Collective. The tag (``<tag>/universal``) of DeepSpeed's universal copy of checkpoint ``tag``: its ZeRO
    optimizer state and fp32 weights regrouped per parameter, loadable on any number of ranks. Rank 0 makes it the
    first time (DeepSpeed's ``ds_to_universal``, into a temporary folder renamed into place, so an interrupted
    conversion is redone and never half-read), the others wait; it lives inside the checkpoint's folder and goes
    when that is pruned. For a large model, convert before the job starts, when the conversion would outlast the
    collectives' timeout (``DEEPSPEED_TIMEOUT``): ``python launch/checkpoints.py --run <run> --universal``."""
    src = Path(ckpt_dir) / tag
    dst = src / UNIVERSAL_DIR
    failure: BaseException | None = None
    if is_rank0() and not dst.is_dir():
        try:
            _convert_to_universal(src, dst)
        except Exception as e:  # raised after the barrier: the other ranks must not wait for it until the timeout
            failure = e
    barrier()
    if failure is not None:
        raise failure
    if not dst.is_dir():
        raise RuntimeError(f"{dst} is missing on this rank: rank 0 failed to make it (see its error), or this rank "
                           "does not see the run folder (it must be on a filesystem shared by every node)")
    return f"{tag}/{UNIVERSAL_DIR}"


def _convert_to_universal(src: Path, dst: Path) -> None:
    import subprocess
    import sys

    tmp = Path(tempfile.mkdtemp(dir=src, prefix=f".{UNIVERSAL_DIR}."))
    try:
        # --inject_missing_state: the version stamp DeepSpeed asks its clients to save (Megatron-DeepSpeed does);
        # these checkpoints need no more than that (no tensor or pipeline parallelism to describe)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(src), "--output_folder", str(tmp), "--inject_missing_state",
                               "--num_extract_workers", "2", "--num_merge_workers", "1"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
            raise RuntimeError(f"converting {src} to a universal checkpoint failed:\n{tail}")
        os.replace(tmp, dst)
        (src / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer beside its output: unused
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resume_data_position(state: dict[str, int], samples_per_micro_before: int, samples_per_micro_now: int
                         ) -> tuple[dict[str, int], int]:
    """The data position ``state`` (epoch, micro-batches per rank consumed in it) of a run whose global micro-batch
    held ``samples_per_micro_before`` samples, for one whose holds ``samples_per_micro_now``.

    Every global micro-batch is the next contiguous block of the epoch's shuffled order, whatever the number of ranks
    (``DistributedSampler`` deals it out rank by rank), so an optimizer update of the same global batch reads the
    same samples at any world size: the position carries over as samples consumed in the epoch. Returns the new
    state and how many samples of the epoch are read a second time because that count is not a whole number of the
    new global micro-batches (0 at an update boundary whenever both micro-batches divide the global batch)."""
    consumed = int(state["index"]) * samples_per_micro_before
    index = consumed // samples_per_micro_now
    return {"epoch": int(state["epoch"]), "index": index}, consumed - index * samples_per_micro_now
