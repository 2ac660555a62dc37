"""``python -m dalle_ds.info``: versions, devices, and which ops, backends and datasets are available (and why not).

``--json`` prints the same as JSON (for bug reports and benchmark headers).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Any

PACKAGES = ("torch", "triton", "deepspeed", "datasets", "tokenizers", "transformers", "numpy", "scipy", "PIL",
            "tqdm", "webdataset", "ninja", "torchmetrics", "torch_fidelity")  # torch_fidelity: FID / IS only


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report whatever went wrong
        return f"not importable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return str(getattr(mod, "__version__", "installed"))


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform(), "dalle_ds": _dalle_ds_version()}
    out.update({name: _version(name) for name in PACKAGES})
    return out


def _dalle_ds_version() -> str:
    from dalle_ds import __version__

    return __version__


def devices() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                         "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                        for i in range(torch.cuda.device_count())]
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        info["deepspeed_accelerator"] = acc.device_name()
        info["deepspeed_comm_backend"] = acc.communication_backend_name()
    except Exception as e:  # noqa: BLE001
        info["deepspeed_accelerator"] = f"unavailable ({type(e).__name__}: {e})"
    return info


def _status_rows(module: str, func: str, label: str) -> list[dict[str, Any]]:
    """Ask an ops module for its own status; a module that fails to import is itself a row with the reason."""
    try:
        mod = importlib.import_module(module)
        rows = getattr(mod, func)()
    except Exception as e:  # noqa: BLE001
        return [{"name": label, "available": False, "reason": f"{module} failed to load: {type(e).__name__}: {e}"}]
    return [dict(r) for r in rows]


def ops() -> dict[str, list[dict[str, Any]]]:
    return {
        "attention backends": _status_rows("dalle_ds.ops.attention", "backend_status", "attention")
        + _status_rows("dalle_ds.ops.attention.tuning_cache", "status_rows", "tuning cache"),
        "1-6-9 codec": _status_rows("dalle_ds.ops.fp169", "op_status", "fp169"),
    }


def datasets() -> list[dict[str, Any]]:
    rows = [{"name": "shapes", "available": True, "reason": "built in (rendered on the fly)"}]
    try:
        from dalle_ds.data.fashion_mnist import is_available

        ok, reason = is_available()
        rows.append({"name": "fashion_mnist", "available": ok, "reason": reason})
    except Exception as e:  # noqa: BLE001
        rows.append({"name": "fashion_mnist", "available": False, "reason": f"{type(e).__name__}: {e}"})
    rows.append({"name": "imagefolder / webdataset", "available": True, "reason": "your data via HF datasets"})
    return rows


def collect() -> dict[str, Any]:
    return {"versions": versions(), "devices": devices(), "ops": ops(), "datasets": datasets()}


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        mark = "yes" if r.get("available") else "no "
        print(f"  [{mark}] {r.get('name', '?'):<22} {r.get('reason', '')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print("dalle_ds environment")
    print("versions:")
    for k, v in info["versions"].items():
        print(f"  {k:<13} {v}")
    print("devices:")
    for k, v in info["devices"].items():
        print(f"  {k:<22} {v}")
    for group, rows in info["ops"].items():
        print(f"{group}:")
        _print_rows(rows)
    print("datasets:")
    _print_rows(info["datasets"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
