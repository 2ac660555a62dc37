"""Which trainer extensions (see :class:`dalle_ds.train.engine_loop.EngineLoop`) a run config turns on."""
from __future__ import annotations

from typing import Any


def build_extensions(cfg: Any) -> list:
    """Extensions for a run config, in the order their hooks run."""
    exts: list = []
    if getattr(cfg, "adam_moments", "fp32") == "16bit":
        from dalle_ds.train.adam16 import Adam16Extension
        exts.append(Adam16Extension())
    psgd = getattr(cfg, "powersgd", None)
    if psgd is not None and psgd.enabled:
        from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
        exts.append(PowerSGDExtension(psgd))
    return exts
