"""NHWC ("channels_last") convolution weights for a model trained on a DeepSpeed engine.

oneDNN (CPU) and cuDNN run NHWC convolutions faster; a conv whose weight is channels_last also returns its output
that way, so converting the weights is enough for the whole network to run NHWC. The conversion has to wait until
after ``deepspeed.initialize``: the engine broadcasts every parameter as ``p.data.view(torch.uint8)``
(``_broadcast_model`` in DeepSpeed 0.19.8), which needs a unit last stride. It is applied with ZeRO stage 0 only:
ZeRO-1/2 keep the parameters as views into one flat buffer, and re-laying them out would cut that link.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("dalle_ds.train")


class ChannelsLast:
    """An ``EngineLoop`` extension: re-lays the module's 4-D parameters out as channels_last (see the module doc)."""

    name = "channels_last"

    def after_initialize(self, engine) -> None:
        stage = engine.zero_optimization_stage()
        if stage != 0:
            log.warning("channels_last is applied with ZeRO stage 0 only (stage %d keeps parameters in a flat "
                        "buffer); training continues in NCHW", stage)
            return
        # Module.to keeps the Parameter objects (it swaps .data), so the optimizer's references stay valid.
        engine.module.to(memory_format=torch.channels_last)
