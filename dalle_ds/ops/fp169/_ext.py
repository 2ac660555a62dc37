"""Loading the fp169 C++/CUDA library: two variants of the same sources, one loaded per process.

* ``fp169_cpu``: bindings.cpp + fp169_cpu.cpp (ops on CPU tensors).
* ``fp169_cuda``: the same plus fp169_cuda.cu, with ``-DDALLE_DS_WITH_CUDA`` (ops on CPU and CUDA tensors).

Both register the operator namespace ``torch.ops.dalle_ds_fp169``, so only one can be loaded: the CUDA variant when
torch has CUDA and a GPU is visible, else (or when its build fails) the CPU variant.
"""
from __future__ import annotations

import logging
import threading

import torch

from ..builder import OpBuilder, OpUnavailable

logger = logging.getLogger(__name__)

ABI = 2  # must match build_info() in csrc/fp169/bindings.cpp (2: adamw16_step_)
_DEPENDS = ("fp169/fp169.h", "fp169/fp169_kernels.h", "fp169/fp169_dispatch.h", "fp169/adamw16.h")


def _check(expect_cuda: bool) -> str | None:
    try:
        info = torch.ops.dalle_ds_fp169.build_info()
    except (AttributeError, RuntimeError) as exc:
        return f"no build_info op ({exc})"
    want = f"fp169 abi={ABI} cuda={int(expect_cuda)}"
    return None if info == want else f"build_info is {info!r}, expected {want!r}"


CPU_BUILDER = OpBuilder(
    name="fp169_cpu",
    sources=("fp169/bindings.cpp", "fp169/fp169_cpu.cpp"),
    depends=_DEPENDS,
    include_dirs=("fp169",),
    # adamw16.h rounds every fp32 operation on its own: no fused multiply-adds; sqrtf inline (no errno), still IEEE
    extra_cflags=("-O3", "-ffp-contract=off", "-fno-math-errno"),
    prebuilt_module="dalle_ds.ops.fp169._C_cpu",
    check=lambda: _check(False),
)

CUDA_BUILDER = OpBuilder(
    name="fp169_cuda",
    sources=("fp169/bindings.cpp", "fp169/fp169_cpu.cpp", "fp169/fp169_cuda.cu"),
    depends=_DEPENDS,
    include_dirs=("fp169",),
    with_cuda=True,
    extra_cflags=("-O3", "-ffp-contract=off", "-fno-math-errno", "-DDALLE_DS_WITH_CUDA"),
    extra_cuda_cflags=("-O3", "-lineinfo"),
    prebuilt_module="dalle_ds.ops.fp169._C_cuda",
    check=lambda: _check(True),
)

_lock = threading.Lock()
_state: dict | None = None


def _want_cuda() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available()


def load(verbose: bool = False) -> dict:
    """Load the best variant once per process; returns ``{"cpu": bool, "cuda": bool, "cpu_reason", "cuda_reason"}``."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        state = {"cpu": False, "cuda": False, "cpu_reason": "", "cuda_reason": ""}
        if _want_cuda():
            try:
                CUDA_BUILDER.load(verbose)
                state.update(cpu=True, cuda=True, cpu_reason="provided by the fp169_cuda library",
                             cuda_reason="loaded")
            except OpUnavailable as exc:
                state["cuda_reason"] = str(exc)
                logger.warning("dalle_ds fp169 CUDA op unavailable: %s", exc)
        else:
            state["cuda_reason"] = CUDA_BUILDER.incompatibility() or "not wanted"
        if not state["cpu"]:
            try:
                CPU_BUILDER.load(verbose)
                state.update(cpu=True, cpu_reason="loaded")
            except OpUnavailable as exc:
                state["cpu_reason"] = str(exc)
                logger.warning("dalle_ds fp169 C++ op unavailable: %s", exc)
        _state = state
        return state


def status(build: bool = True) -> list[dict]:
    """One dict per op (``name``, ``available``, ``reason``) for ``python -m dalle_ds.info``."""
    if build or _state is not None:
        st = load()
        return [
            {"name": "fp169_cpu", "available": st["cpu"], "reason": st["cpu_reason"]},
            {"name": "fp169_cuda", "available": st["cuda"], "reason": st["cuda_reason"]},
        ]
    rows = [CPU_BUILDER.status(build=False)]
    cuda = CUDA_BUILDER.status(build=False)
    if not _want_cuda():
        cuda = {"name": "fp169_cuda", "available": False, "reason": CUDA_BUILDER.incompatibility() or "no CUDA"}
    rows.append(cuda)
    return [{k: r[k] for k in ("name", "available", "reason")} for r in rows]
