"""What DeepSpeed actually holds for the prior's model state, against ``dalle_ds.models.memory.estimate_per_gpu``.

The estimate (``python -m dalle_ds.models --memory``) is arithmetic on bytes per parameter; this checks it against
the engine itself. It builds the prior of a preset under ``deepspeed.initialize`` (ZeRO stage, bf16 or fp32 as asked),
trains a few updates, and at each optimizer step (inside the step, where ZeRO holds its transient fp32 gradient
partition) adds up every tensor storage reachable from the engine: the module's parameters and gradients (ZeRO-3:
their partitions), and everything DeepSpeed's optimizer wrapper and the torch optimizer hold (master weights, Adam
moments, gradient partitions, communication buckets), each storage counted once. Activations are freed by then and
not part of it. On a GPU it also reports ``torch.cuda.max_memory_allocated``.

    python benchmarks/memory_check.py --preset tiny --zero 2 --precision bf16
    deepspeed --num_gpus 2 benchmarks/memory_check.py --preset tiny --zero 3      # DS_ACCELERATOR=cpu on a CPU

Prints one table row per rank's view (rank 0's), and with ``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dalle_ds.config import DALLE_PRESETS  # noqa: E402
from dalle_ds.models.memory import estimate_per_gpu  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ds_config  # noqa: E402

_TRAVERSED_MODULES = ("deepspeed", "torch.optim", "dalle_ds")


def reachable_storages(roots: dict[str, object]) -> dict[int, dict]:
    """``{storage data_ptr: {"bytes", "dtype", "root"}}`` for every tensor storage reachable from ``roots`` through
    containers, tensors' ``.grad`` and ZeRO-3 ``ds_tensor`` partitions, modules' parameters and buffers, and the
    attributes of DeepSpeed / torch.optim / dalle_ds objects. Each storage once (the first root that reaches it)."""
    found: dict[int, dict] = {}
    seen: set[int] = set()
    for root_name, root in roots.items():
        stack = [root]
        while stack:
            obj = stack.pop()
            if id(obj) in seen or obj is None:
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                st = obj.untyped_storage()
                if st.nbytes() > 0 and st.data_ptr() not in found:
                    found[st.data_ptr()] = {"bytes": st.nbytes(), "dtype": str(obj.dtype).replace("torch.", ""),
                                            "root": root_name}
                stack.extend(x for x in (obj.grad, getattr(obj, "ds_tensor", None)) if x is not None)
                continue
            if isinstance(obj, torch.nn.Module):
                stack.extend(obj.parameters())
                stack.extend(obj.buffers())
                continue
            if isinstance(obj, (list, tuple, set, frozenset)):
                stack.extend(obj)
                continue
            if isinstance(obj, dict):
                stack.extend(obj.values())
                stack.extend(k for k in obj if isinstance(k, torch.Tensor))
                continue
            module = type(obj).__module__ or ""
            if module.startswith(_TRAVERSED_MODULES) and hasattr(obj, "__dict__"):
                stack.extend(vars(obj).values())
    return found


def summarize(found: dict[int, dict]) -> dict:
    out: dict = {"total": 0, "by_root": {}, "by_dtype": {}}
    for entry in found.values():
        out["total"] += entry["bytes"]
        out["by_root"][entry["root"]] = out["by_root"].get(entry["root"], 0) + entry["bytes"]
        out["by_dtype"][entry["dtype"]] = out["by_dtype"].get(entry["dtype"], 0) + entry["bytes"]
    return out


def measure(preset: str, zero: int, precision: str, micro_batch: int = 1, steps: int = 2,
            bucket: int = 1_000_000) -> dict:
    """Train ``steps`` updates of the preset's prior under DeepSpeed (in an initialized process group) and return
    the largest model-state total seen at an optimizer step, with its breakdown, and the estimate's terms."""
    import deepspeed

    from dalle_ds.models.dalle import DALLE
    from dalle_ds.train.dalle_trainer import build_prior

    cfg = replace(DALLE_PRESETS[preset], attn_backend="dense" if not torch.cuda.is_available() else "auto")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = ds_config(zero, precision, micro_batch, 1, True, bucket)  # bench_train's cases
    torch.manual_seed(0)
    model = build_prior(cfg, config) if zero == 3 else DALLE(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    peak: dict = {"total": -1}
    basic = engine.basic_optimizer
    inner_step = basic.step

    def step_and_count(*args, **kwargs):
        nonlocal peak
        held = summarize(reachable_storages({"module": engine.module, "optimizer": engine.optimizer}))
        if held["total"] > peak["total"]:
            peak = held
        return inner_step(*args, **kwargs)

    basic.step = step_and_count
    device = engine.device
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        text = torch.randint(0, cfg.text_vocab_size, (micro_batch, cfg.text_len), generator=gen).to(device)
        image = torch.randint(0, cfg.image_vocab_size, (micro_batch, cfg.image_len), generator=gen).to(device)
        loss = engine(text, image).loss
        engine.backward(loss)
        del loss
        # After the backward: the gradients (or their reduced partitions) and ZeRO's reduction buckets are held.
        held = summarize(reachable_storages({"module": engine.module, "optimizer": engine.optimizer}))
        if held["total"] > peak["total"]:
            peak = held
        engine.step()
    world = engine.world_size if hasattr(engine, "world_size") else 1
    est = estimate_per_gpu(cfg, zero=zero, gpus=world, precision=precision, micro_batch=micro_batch,
                           ds_config=config)
    estimate_states = sum(est[k] for k in ("parameters", "gradients", "optimizer", "deepspeed_buffers"))
    result = {"preset": preset, "zero": zero, "precision": precision, "world_size": world,
              "measured_bytes": peak["total"], "measured_by_root": peak["by_root"],
              "measured_by_dtype": peak["by_dtype"], "estimate_bytes": estimate_states,
              "estimate_terms": {k: est[k] for k in ("parameters", "gradients", "optimizer", "deepspeed_buffers")},
              "num_parameters": est["num_parameters"]}
    if torch.cuda.is_available():
        result["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    engine.destroy() if hasattr(engine, "destroy") else None
    return result


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(DALLE_PRESETS))
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--bucket", type=int, default=1_000_000, help="reduce / allgather / prefetch bucket elements")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from dalle_ds.train.distributed import distributed_run, is_rank0

    with distributed_run():
        rows = [measure(args.preset, zero, precision, args.micro_batch, bucket=args.bucket)
                for zero in args.zero for precision in args.precision]
        report = is_rank0()
    if report:
        mib = 2.0 ** 20
        print("| preset | ZeRO | precision | ranks | measured MiB | estimate MiB | estimate / measured |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['preset']} | {r['zero']} | {r['precision']} | {r['world_size']} | "
                  f"{r['measured_bytes'] / mib:.2f} | {r['estimate_bytes'] / mib:.2f} | "
                  f"{r['estimate_bytes'] / r['measured_bytes']:.3f} |")
        if args.out:
            args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
