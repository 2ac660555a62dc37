"""Whether a device runs bf16 natively (and so faster than fp32), for the CPU paths that opt into bf16 autocast."""
from __future__ import annotations

import torch


def bf16_is_native(device: torch.device | str) -> bool:
    """True on any accelerator; on a CPU, when oneDNN has native bf16 (AVX-512 BF16 or AMX). Elsewhere bf16 runs
    emulated and slower than fp32."""
    if torch.device(device).type != "cpu":
        return True
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
