"""16-bit Adam moments (paper App. B.2) in a DeepSpeed engine, as a trainer extension (see
:class:`dalle_ds.train.engine_loop.EngineLoop`; turned on by the prior's ``adam_moments=16bit``).

DeepSpeed builds its optimizer from the config's ``optimizer`` section; this extension instead hands
``deepspeed.initialize`` a client optimizer, :class:`dalle_ds.precision.adam_moments.AdamW16`, with the section's
hyper-parameters and two param groups: the resblocks' matmul weights (moments in 1-6-9 / 0-6-10) and the rest (fp32
moments: gains, biases, embeddings, heads). DeepSpeed's ZeRO optimizers then give it one flat fp32 partition per group
and keep the group's ``moments`` key; its scheduler, clipping, checkpoints and overflow handling are DeepSpeed's as
before. Refused: an optimizer section other than Adam/AdamW (or with ``adam_w_mode`` false, or AMSGrad), optimizer
offload (DeepSpeed's CPU Adam does the step there), and elastic / universal checkpoints (they reshape state
tensors as fp32 values).
"""
from __future__ import annotations

import torch

from dalle_ds.config import ConfigError
from dalle_ds.precision.adam_moments import AdamW16

__all__ = ["Adam16Extension"]


class Adam16Extension:
    name = "adam16"

    def __init__(self):
        self.groups: list[dict] | None = None
        self.hyper: dict | None = None

    def before_initialize(self, model: torch.nn.Module, ds_config: dict) -> None:
        where = "adam_moments=16bit"
        section = ds_config.get("optimizer") or {}
        if str(section.get("type", "")).lower() not in ("adam", "adamw"):
            raise ConfigError(f"{where}: needs an Adam or AdamW optimizer section in the DeepSpeed config, got "
                              f"{section.get('type')!r}")
        params = dict(section.get("params", {}))
        if params.get("adam_w_mode") is False or params.get("amsgrad"):
            raise ConfigError(f"{where}: the 16-bit moments are for AdamW (decoupled weight decay, no AMSGrad); "
                              "remove adam_w_mode=false / amsgrad from optimizer.params")
        zo = ds_config.get("zero_optimization", {})
        if str((zo.get("offload_optimizer") or {}).get("device", "none")).lower() not in ("none", ""):
            raise ConfigError(f"{where}: optimizer offload runs DeepSpeed's CPU Adam, which keeps fp32 moments; "
                              "drop zero_optimization.offload_optimizer or keep adam_moments=fp32")
        if zo.get("elastic_checkpoint") or (ds_config.get("checkpoint") or {}).get("load_universal"):
            raise ConfigError(f"{where}: elastic and universal checkpoints re-partition optimizer state as fp32 "
                              "values, which 16-bit codes are not; turn them off")
        if not hasattr(model, "resblock_matmul_weight_names"):
            raise ConfigError(f"{where}: the model names no resblock matmul weights (the prior does)")
        ds_config["zero_allow_untested_optimizer"] = True  # a client optimizer under ZeRO
        sixteen = set(model.resblock_matmul_weight_names())
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.groups = [{"params": [p for n, p in named if n in sixteen], "moments": "16bit"},
                       {"params": [p for n, p in named if n not in sixteen], "moments": "fp32"}]
        # the defaults of the optimizer DeepSpeed would have built: torch's AdamW (torch_adam) decays by 0.01 unless
        # told otherwise, DeepSpeed's FusedAdam by 0
        self.hyper = {"lr": params.get("lr", 1e-3), "betas": tuple(params.get("betas", (0.9, 0.999))),
                      "eps": params.get("eps", 1e-8),
                      "weight_decay": params.get("weight_decay", 0.01 if params.get("torch_adam") else 0.0)}

    def client_optimizer(self):
        """(model_parameters, optimizer factory) for ``deepspeed.initialize``."""
        groups = [g for g in self.groups if g["params"]]
        return groups, lambda param_groups: AdamW16(param_groups, **self.hyper)
