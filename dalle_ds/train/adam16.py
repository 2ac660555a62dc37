"""16-bit Adam moments (paper App. B.2) in a DeepSpeed engine, as a trainer extension (see
:class:`dalle_ds.train.engine_loop.EngineLoop`; turned on by the prior's ``adam_moments=16bit``).

DeepSpeed builds its optimizer from the config's ``optimizer`` section; this extension instead hands
``deepspeed.initialize`` a client optimizer, :class:`dalle_ds.precision.adam_moments.AdamW16`, with the section's
hyper-parameters and two param groups: the resblocks' matmul weights (moments in 1-6-9 / 0-6-10) and the rest (fp32
moments: gains, biases, embeddings, heads). DeepSpeed's ZeRO optimizers then give it one flat fp32 partition per group
and keep the group's ``moments`` key; its scheduler, clipping, checkpoints and overflow handling are DeepSpeed's as
before. Refused: an optimizer section other than Adam/AdamW (or with ``adam_w_mode`` false, or AMSGrad), optimizer
offload (DeepSpeed's CPU Adam does the step there). Resuming on another number of ranks goes through DeepSpeed's
universal checkpoint, which hands the moments back as fp32 tensors holding the codes' integer values;
:meth:`Adam16Extension.after_universal_load` turns them back into codes.
"""
from __future__ import annotations

import torch

from dalle_ds.config import ConfigError
from dalle_ds.precision.adam_moments import AdamW16
from dalle_ds.train.ds_config import optimizer_offload

__all__ = ["Adam16Extension"]


class Adam16Extension:
    name = "adam16"

    def __init__(self):
        self.groups: list[dict] | None = None
        self.kinds: list[str] = []
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
        if optimizer_offload(ds_config):
            raise ConfigError(f"{where}: optimizer offload runs DeepSpeed's CPU Adam, which keeps fp32 moments; "
                              "drop zero_optimization.offload_optimizer or keep adam_moments=fp32")
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

    def after_universal_load(self, engine) -> None:
        """After DeepSpeed loaded a universal checkpoint (a resume on another number of ranks), put back what its
        loaders change:

        * the moments' dtype: both loaders rebuild each state as a ``zeros_like`` of the fp32 partition and copy the
          saved values in, so a 16-bit group's moments come back as fp32 tensors holding the codes as integers (exact:
          |code| <= 2^15 < 2^24); they are cast back to int16, anything else refused;
        * under ZeRO-3, each group's ``moments`` key: that loader gives every param group the first group's settings
          (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``, DeepSpeed 0.19.8), and ours differ only there."""
        opt = engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: flat fp32 partitions per sub-group
            for group, kind in zip(inner.param_groups, self.kinds, strict=True):
                group["moments"] = kind
            owned = [(inner.param_groups[opt.sub_group_to_group_id[i]], t)
                     for i, t in enumerate(opt.fp32_partitioned_groups_flat)]
        else:
            owned = [(group, p) for group in inner.param_groups for p in group["params"]]
        for group, p in owned:
            if group.get("moments") != "16bit":
                continue
            state = inner.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                t = state.get(key)
                if t is None or t.dtype == torch.int16:
                    continue
                if not (t.is_floating_point() and bool((t == t.round()).all()) and bool((t.abs() <= 32768).all())):
                    raise RuntimeError(f"16-bit Adam moments: the loaded {key} is not a tensor of 16-bit codes "
                                       f"({t.dtype})")
                state[key] = t.to(torch.int16)

    def client_optimizer(self):
        """(model_parameters, optimizer factory) for ``deepspeed.initialize``."""
        groups = [g for g in self.groups if g["params"]]
        # each group's moments, by position: the optimizer keeps these dicts as its param groups, which a universal
        # load rewrites (after_universal_load)
        self.kinds = [g["moments"] for g in groups]
        return groups, lambda param_groups: AdamW16(param_groups, **self.hyper)
