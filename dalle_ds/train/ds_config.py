"""Loading a DeepSpeed JSON config for a run: fill the ``"auto"`` values from the run, check what DeepSpeed would
only notice late (or with a cryptic message), and report every problem with the key that caused it.

DeepSpeed owns the schema (https://www.deepspeed.ai/docs/config-json/); this module only fills and checks:

* ``scheduler.params.total_num_steps: "auto"`` → the run's ``steps``; ``warmup_num_steps: "auto"`` → the paper's
  5,000 updates or 1/20 of a shorter run; a ``PlateauHalving`` scheduler (the paper's halving on plateaus,
  :mod:`dalle_ds.train.plateau`) has its parameters checked;
* ``tensorboard`` / ``csv_monitor`` ``output_path: "auto"`` → ``<run dir>/monitor``, ``job_name: "auto"`` → the job;
* ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` / ``gradient_accumulation_steps`` must be consistent
  with the world size;
* on a CPU accelerator, fp16 is refused (DeepSpeed's fp16 mode needs a GPU);
* a top-level key that DeepSpeed does not know but that is close to one it does (``zero_optimisation``,
  ``gradient_cliping``) is refused: DeepSpeed ignores unknown keys, so the run would silently go without ZeRO or
  clipping (a key unlike any known one only warns: DeepSpeed has sections this list may lack);
* the trainers need an ``optimizer`` section (DeepSpeed builds the optimizer from it; without one it fails only at
  the first update) of a type DeepSpeed builds, its ``params`` must be finite numbers, booleans or lists of numbers
  (a string ``lr`` fails deep inside torch), ``lr`` ≥ 0, a ``scheduler`` must be one DeepSpeed (or this project)
  knows, with int step counts, and ``gradient_clipping`` must be finite and ≥ 0 (0 turns clipping off);
* sections DeepSpeed reads as objects (``fp16``, ``zero_optimization``, ``scheduler.params``, ...) must be objects:
  ``"fp16": true`` would fail inside DeepSpeed with an AttributeError.

``--ds_set KEY=VALUE`` (:func:`apply_ds_overrides`) changes one value of the file from the command line, e.g.
``--ds_set optimizer.params.lr=1e-3``; the key must exist in the file (a typo would otherwise be ignored by DeepSpeed),
``+KEY=VALUE`` adds a new one (Hydra's convention). Values are JSON (``1e-3``, ``30``, ``true``, ``[0.9,0.95]``) or
else plain strings. The prepared config is saved in the run folder, so the run records what it trained with.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import difflib
import logging

from dalle_ds.config import ConfigError, load_json_config, parse_set_args
from dalle_ds.train.plateau import SCHEDULER_TYPE, plateau_params

log = logging.getLogger("dalle_ds.train")

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# Top-level sections defined outside deepspeed.runtime.constants (ZeRO, monitors, profilers, ...), DeepSpeed 0.19.
_MORE_TOP_LEVEL_KEYS = ("zero_optimization", "tensorboard", "csv_monitor", "wandb", "comet", "activation_checkpointing",
                        "flops_profiler", "comms_logger", "aio", "elasticity", "autotuning", "compression_training",
                        "data_efficiency", "nebula", "pipeline", "amp", "sparse_attention", "curriculum_learning",
                        "hybrid_engine", "weight_quantization", "timers", "compile")


def known_top_level_keys() -> set[str]:
    """DeepSpeed's top-level config keys: the lowercase string constants of ``deepspeed.runtime.constants`` plus
    the sections other modules define."""
    import deepspeed.runtime.constants as C

    return {v for k, v in vars(C).items() if k.isupper() and isinstance(v, str) and v.isidentifier()
            and v.islower()} | set(_MORE_TOP_LEVEL_KEYS)


#: Sections DeepSpeed reads as JSON objects (a ``"fp16": true`` or ``"scheduler": "WarmupLR"`` fails inside it with an
#: AttributeError), and the objects inside them.
_OBJECT_SECTIONS = ("fp16", "bf16", "zero_optimization", "optimizer", "scheduler", "tensorboard", "csv_monitor",
                    "wandb", "comet", "activation_checkpointing", "flops_profiler", "comms_logger", "torch_autocast",
                    "data_types", "optimizer.params", "scheduler.params", "zero_optimization.offload_optimizer",
                    "zero_optimization.offload_param")


_ABSENT = object()


def _section(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_section_types(cfg: dict[str, Any], where: str = "deepspeed config") -> None:
    """Every section DeepSpeed reads as an object is one, where present (null included: DeepSpeed calls .get on it)."""
    for dotted in _OBJECT_SECTIONS:
        value = _section(cfg, dotted)
        if value is not _ABSENT and not isinstance(value, dict):
            raise ConfigError(f"{where}: '{dotted}' must be a JSON object ({{...}}), got {json.dumps(value)}")


def _known_optimizer(name: str) -> bool:
    """What DeepSpeed 0.19 accepts as ``optimizer.type``: its own (any case) or a class of ``torch.optim``."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return name.lower() in DEEPSPEED_OPTIMIZERS or isinstance(getattr(torch.optim, name, None), type)


def _known_scheduler(name: str) -> bool:
    """What DeepSpeed accepts as ``scheduler.type`` (its lr_schedules or torch's), or this project's own."""
    import torch
    from deepspeed.runtime import lr_schedules

    return name == SCHEDULER_TYPE or isinstance(getattr(lr_schedules, name, None), type) or \
        isinstance(getattr(torch.optim.lr_scheduler, name, None), type)


def check_keys_and_values(cfg: dict[str, Any], where: str = "deepspeed config") -> None:
    """Refuse near-miss top-level keys, sections that are not objects, a missing or unknown optimizer, an unknown
    scheduler, non-numeric or nonfinite optimizer params, a negative learning rate and bad clipping."""
    check_section_types(cfg, where)
    known = known_top_level_keys()
    for key in cfg:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"{where}: unknown key '{key}' (did you mean '{close[0]}'?); DeepSpeed would ignore it")
        log.warning("%s: top-level key '%s' is not one DeepSpeed is known to read; it may be ignored", where, key)
    opt = cfg.get("optimizer")
    if not isinstance(opt, dict) or not opt.get("type"):
        raise ConfigError(f"{where}: needs an \"optimizer\" section with a \"type\" (e.g. {{\"type\": \"AdamW\", "
                          "\"params\": {\"lr\": 1e-3}}): the trainers let DeepSpeed build the optimizer")
    if not isinstance(opt["type"], str) or not _known_optimizer(opt["type"]):
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

        raise ConfigError(f"{where}: optimizer.type {opt['type']!r} is not one DeepSpeed builds (its own: "
                          f"{', '.join(DEEPSPEED_OPTIMIZERS)}; or a torch.optim class name)")
    for name, value in (opt.get("params") or {}).items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) or v == "auto" for v in items):  # bool is an int; "auto": below
            raise ConfigError(f"{where}: optimizer.params.{name} must be a number (or a list of numbers), got "
                              f"{value!r}")
        if not all(v == "auto" or math.isfinite(v) for v in items):
            raise ConfigError(f"{where}: optimizer.params.{name} must be finite, got {value!r}")
    lr = (opt.get("params") or {}).get("lr")
    if _is_number(lr) and lr < 0:
        raise ConfigError(f"{where}: optimizer.params.lr must be ≥ 0, got {lr!r}")
    sched = cfg.get("scheduler")
    if isinstance(sched, dict) and not (isinstance(sched.get("type"), str) and _known_scheduler(sched["type"])):
        from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

        raise ConfigError(f"{where}: scheduler.type {sched.get('type')!r} is not a scheduler DeepSpeed knows (its own: "
                          f"{', '.join(VALID_LR_SCHEDULES)}; a torch.optim.lr_scheduler class; or this project's "
                          f"{SCHEDULER_TYPE})")
    clip = cfg.get("gradient_clipping", 0)
    if not _is_number(clip) or not math.isfinite(clip) or clip < 0:
        raise ConfigError(f"{where}: gradient_clipping must be a finite number ≥ 0 (0 = off), got {clip!r}")


def zero_stage(cfg: dict[str, Any]) -> int:
    """The config's ZeRO stage (0 when it has no zero_optimization section)."""
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def optimizer_offload(cfg: dict[str, Any]) -> bool:
    """Whether the config puts the optimizer state in host memory (``zero_optimization.offload_optimizer.device``
    other than "none"; DeepSpeed honours it at ZeRO stages 1-3)."""
    device = (((cfg.get("zero_optimization") or {}).get("offload_optimizer")) or {}).get("device", "none")
    return device not in ("none", None)


def nonfinite_check_off(cfg: dict[str, Any]) -> str | None:
    """The key that keeps DeepSpeed from noticing a nonfinite gradient in this config, or None when it notices.

    PowerSGD and per-resblock gradient scaling skip an update by leaving an Inf in the gradients for the optimizer's
    own check. In DeepSpeed 0.19.8 ZeRO-3 always computes the global norm and skips on a nonfinite one; the ZeRO-1/2
    optimizer (``runtime/zero/stage_1_and_2.py``, ``step``) checks only with ``check_grad_overflow`` -- bf16 mode's
    ``bf16.check_grad_overflow`` (default true; off in fp32 mode) -- or, outside bf16 mode, through the norm that
    ``zero_optimization.compute_grad_norm`` (default true) computes. ZeRO-0 is the callers' own matter."""
    if zero_stage(cfg) not in (1, 2):
        return None
    if precision_mode(cfg) == "bf16":
        return "bf16.check_grad_overflow=false" if _bf16_section(cfg).get("check_grad_overflow") is False else None
    zo = cfg.get("zero_optimization") or {}
    return "zero_optimization.compute_grad_norm=false" if zo.get("compute_grad_norm") is False else None


def _bf16_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``bf16`` section, or DeepSpeed's older name for it, ``bfloat16`` ({} when neither is there)."""
    return (cfg.get("bf16") if cfg.get("bf16") is not None else cfg.get("bfloat16")) or {}


def precision_mode(cfg: dict[str, Any], where: str = "deepspeed config") -> str:
    """DeepSpeed's precision mode in the config: "bf16" (``bf16.enabled``, or the older ``bfloat16`` section), "fp16"
    (``fp16.enabled``) or "fp32" (neither; the model may still compute in 16 bits, e.g. fp16 resblocks)."""
    bf16, fp16 = (section.get("enabled") is True for section in (_bf16_section(cfg), cfg.get("fp16") or {}))
    if bf16 and fp16:
        raise ConfigError(f"{where}: bf16.enabled and fp16.enabled are both true; DeepSpeed allows one of them")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def check_rank0_evaluation_supported(cfg: dict[str, Any], trainer: str, why_small: str) -> None:
    """Trainers that evaluate on rank 0 alone (dVAE, CLIP) refuse ZeRO-3: gathering the ZeRO-3 EMA shards there
    would need every rank. ``why_small`` ends the message (why a stage ≤ 2 suits that model)."""
    if zero_stage(cfg) == 3:
        raise ConfigError(f"the {trainer} trainer supports ZeRO stages 0-2 (its evaluation runs on rank 0 only); "
                          f"use a stage ≤ 2 config ({why_small})")


def check_compile_supported(cfg: dict[str, Any]) -> None:
    """``compile=true`` (DALLE.compile_resblocks before deepspeed.initialize) works with ZeRO 0-2; under ZeRO-3 the
    engine's parameter gather / release hooks would run inside the compiled blocks."""
    if zero_stage(cfg) == 3:
        raise ConfigError("dalle_run.compile: not with ZeRO-3 (its parameter gather hooks would run inside the "
                          "compiled resblocks); use ZeRO 0-2 or set compile=false")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """The JSON object at ``path``; a path that does not exist names the closest .json file of its folder, if any."""
    p = Path(path)
    if not p.is_file() and p.parent.is_dir():
        close = difflib.get_close_matches(p.name, [f.name for f in p.parent.glob("*.json")], n=1, cutoff=0.6)
        if close:
            raise ConfigError(f"--deepspeed_config: file not found: {p}; did you mean {p.parent / close[0]}?")
    return load_json_config(path, flag="--deepspeed_config")


def apply_ds_overrides(cfg: dict[str, Any], items: list[str] | None) -> dict[str, Any]:
    """Return a copy of ``cfg`` with ``--ds_set`` items (``a.b.c=value`` or ``+a.b.c=value``) applied."""
    cfg = copy.deepcopy(cfg)
    for key, raw in parse_set_args(items, flag="--ds_set").items():
        add, name = key.startswith("+"), key.lstrip("+")
        path = name.split(".")
        if not all(path):
            raise ConfigError(f"--ds_set: empty name in key '{key}'")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = cfg
        for depth, part in enumerate(path, 1):
            where = ".".join(path[:depth])
            if part not in node and not add:
                raise ConfigError(f"--ds_set {key}: the config has no '{where}' (keys there: "
                                  f"{', '.join(sorted(node)) or 'none'}); write +{name}=… to add it")
            if depth == len(path):
                if isinstance(node.get(part), dict):
                    raise ConfigError(f"--ds_set {key}: '{where}' is a section; set its keys one by one")
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--ds_set {key}: '{where}' is a value, not a section")
    return cfg


def resolve_batch_sizes(cfg: dict[str, Any], world_size: int, where: str = "deepspeed config") -> tuple[int, int, int]:
    """Return (train_batch_size, micro_batch_per_gpu, grad_accum) after checking they agree with ``world_size``."""
    given = {k: cfg.get(k) for k in _BATCH_KEYS if cfg.get(k) is not None}
    for k, v in given.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: {k} must be a positive integer, got {v!r}")
    tb, mb, ga = (given.get(k) for k in _BATCH_KEYS)
    if mb is None and tb is None:
        raise ConfigError(f"{where}: set train_micro_batch_size_per_gpu (or train_batch_size)")
    if tb is None:
        ga = ga or 1
        tb = mb * ga * world_size
    elif mb is None:
        ga = ga or 1
        if tb % (ga * world_size):
            raise ConfigError(f"{where}: train_batch_size {tb} is not divisible by gradient_accumulation_steps "
                              f"{ga} × world size {world_size}")
        mb = tb // (ga * world_size)
    elif ga is None:
        if tb % (mb * world_size):
            raise ConfigError(f"{where}: train_batch_size {tb} is not divisible by "
                              f"train_micro_batch_size_per_gpu {mb} × world size {world_size}")
        ga = tb // (mb * world_size)
    if tb != mb * ga * world_size:
        raise ConfigError(f"{where}: train_batch_size {tb} ≠ train_micro_batch_size_per_gpu {mb} × "
                          f"gradient_accumulation_steps {ga} × world size {world_size}")
    return tb, mb, ga


#: The prior's linear warm-up in the paper (App. B.2: "over the first 5000 updates").
PAPER_WARMUP_STEPS = 5000


def auto_warmup_steps(steps: int) -> int:
    """``warmup_num_steps: "auto"``: the paper's 5,000 updates, or 1/20 of a shorter run (at least 2, at most the
    run: a 1-update run gets 1, which DeepSpeed's WarmupCosineLR raises to its own minimum of 2 internally).

    DeepSpeed 0.19.8's WarmupCosineLR runs the first two updates at rate 0 (it starts at iteration -1, read as ratio
    0, and its linear warm-up starts at ``warmup_min_ratio`` 0), so the peak comes at update W + 2."""
    return min(PAPER_WARMUP_STEPS, steps, max(2, steps // 20))


def prepare_ds_config(cfg: dict[str, Any], *, steps: int, run_dir: str | Path, job_name: str, world_size: int,
                      accelerator: str, where: str = "deepspeed config") -> dict[str, Any]:
    """Return a copy of ``cfg`` with "auto" values filled and consistency checked (raises :class:`ConfigError`)."""
    cfg = copy.deepcopy(cfg)
    check_keys_and_values(cfg, where)
    tb, mb, ga = resolve_batch_sizes(cfg, world_size, where)
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = tb, mb, ga

    sched = cfg.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        if sched.get("type") == SCHEDULER_TYPE:  # dalle_ds's own (dalle_ds.train.plateau): warm-up "auto" unless set
            params.setdefault("warmup_num_steps", "auto")
        for key in ("total_num_steps", "warmup_num_steps"):
            if params.get(key) == "auto":
                params[key] = steps if key == "total_num_steps" else auto_warmup_steps(steps)
            if key in params and not (isinstance(params[key], int) and not isinstance(params[key], bool)
                                      and params[key] >= 0):
                raise ConfigError(f"{where}: scheduler.params.{key} must be an int ≥ 0 (or \"auto\"), got "
                                  f"{params[key]!r}")
        warm = params.get("warmup_num_steps")
        if isinstance(warm, int) and warm > steps:
            raise ConfigError(f"{where}: scheduler.params.warmup_num_steps {warm} exceeds the run's {steps} steps")

    for mon in ("tensorboard", "csv_monitor", "wandb", "comet"):
        section = cfg.get(mon)
        if isinstance(section, dict):  # disabled ones too: `--ds_set tensorboard.enabled=false` leaves "auto" there
            if section.get("output_path") == "auto":
                section["output_path"] = str(Path(run_dir) / "monitor") + "/"
            if section.get("job_name") == "auto":
                section["job_name"] = job_name

    for key, value in _walk(cfg):
        if value == "auto":
            raise ConfigError(f"{where}: '{key}' is \"auto\" but this trainer has no value to fill it with")
    plateau_params(cfg, where)  # a PlateauHalving section's parameters, checked before the run starts

    if accelerator == "cpu" and cfg.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{where}: fp16.enabled is true, but DeepSpeed's fp16 mode needs a GPU; "
                          "use bf16 or fp32 on CPU")
    zero = cfg.get("zero_optimization", {}).get("stage", 0)
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero!r}")
    return cfg


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, node
