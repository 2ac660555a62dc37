"""PowerSGD inside real DeepSpeed engines (ZeRO 0, 1, 2) on 4 gloo processes emulating 2 machines x 2 GPUs.

A lossless rank must reproduce the stock DeepSpeed update; a low rank must still compress (and report it); an Inf in
one rank's gradient must make the engine skip the update on every rank with the parameters unchanged; ZeRO 0, 1, 2
and 3 (partitioned parameters, gathered to compare), the last two with 2 micro-batches per update. DeepSpeed's fp16 mode, ZeRO-1/2 without contiguous gradients
(which bypass the hook: shown on a real engine) and ZeRO-3 with qgZ or a predivide factor are refused with clear
errors. The full trainer path (config, logging, checkpoint resume) is in
tests/test_train_dalle_powersgd.py.
"""
import math
import types

import pytest
import torch

from dalle_ds.dist.local_ranks import run_local_ranks

pytestmark = pytest.mark.distributed


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 8)
        self.fc = torch.nn.Linear(8, 16)    # [16, 8]: compressed, rows split
        self.out = torch.nn.Linear(16, 8)   # [8, 16]: compressed, transposed

    def forward(self, idx):
        return self.out(torch.relu(self.fc(self.emb(idx)))).pow(2).mean()


def _ds_config(stage: int, gas: int = 1) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # partition every parameter (by default ones this small stay whole on every rank)
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "steps_per_print": 10 ** 9,
            "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True}


def _engine(stage: int, powersgd_rank: int | None, gas: int = 1, start_step: int = 0):
    import deepspeed
    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    model, cfg = _Net(), _ds_config(stage, gas)
    ext = None
    if powersgd_rank is not None:
        ext = PowerSGDExtension(PowerSGDConfig(enabled=True, rank=powersgd_rank, local_size=2, start_step=start_step,
                                               compress=r"^(fc|out)\.weight$"))
        ext.before_initialize(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if ext is not None:
        ext.setup(types.SimpleNamespace(engine=engine, device=torch.device("cpu")))
    return engine, ext


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(100 * step + rank))


def _train(engine, ext, rank, steps, poison_step=None):
    for step in range(steps):
        loss = engine(_batch(rank, step))
        if step == poison_step and rank == 1:
            loss = loss * math.inf  # every gradient of rank 1 becomes nonfinite
        engine.backward(loss)
        if ext is not None:
            ext.after_backward(None, 0)
        engine.step()


def _params(engine):
    import deepspeed
    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=hasattr(named[0][1], "ds_id")):  # ZeRO-3
        return {n: p.detach().clone() for n, p in named}


def _stages(rank, world, stage, gas=1):
    """``gas`` micro-batches per update (ZeRO-2 and 3 compress each micro-batch's buckets on their own)."""
    stock, _ = _engine(stage, None, gas)
    _train(stock, None, rank, 3 * gas)
    lossless, ext = _engine(stage, powersgd_rank=32, gas=gas)  # 16 per GPU >= every shard side
    assert set(ext.compressed_keys) == {"fc.weight", "out.weight"}
    if stage:
        assert type(lossless.optimizer).__name__.startswith("PowerSGD")
    if stage == 3:  # partitioned: outside a gather a rank holds only its share
        assert lossless.module.fc.weight.numel() == 0 and lossless.module.fc.weight.ds_tensor.numel() == 128 // world
    _train(lossless, ext, rank, 3 * gas)
    assert lossless.global_steps == 3
    a, b = _params(stock), _params(lossless)
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=2e-3, atol=2e-4), (n, float((a[n] - b[n]).abs().max()))
    lossy, ext = _engine(stage, powersgd_rank=2, gas=gas)
    _train(lossy, ext, rank, 2 * gas)
    stats = ext.stats()
    assert 0.5 < stats["powersgd/compression_rate"] < 1 and stats["powersgd/bytes_inter_machine"] > 0
    before = _params(lossy)
    _train(lossy, ext, rank, gas, poison_step=0)  # one update whose first micro-batch is nonfinite on rank 1
    after = _params(lossy)
    assert all(torch.equal(before[n], after[n]) for n in before), "a nonfinite step changed the parameters"
    assert lossy.skipped_steps == 1 and ext.stats()["powersgd/skipped_steps"] == 1
    _train(lossy, ext, rank, gas)  # and training goes on
    assert all(torch.isfinite(p).all() for p in _params(lossy).values())
    assert not all(torch.equal(after[n], p) for n, p in _params(lossy).items())


def _all_stages(rank, world):
    for stage in (0, 1, 2, 3):  # one set of processes for the four stages (start-up dominates on 2 cores)
        _stages(rank, world, stage, gas=2 if stage >= 2 else 1)
        _warm_up_skips_a_nonfinite_step(rank, stage)
    _foreign_optimizer_refused()


def _warm_up_skips_a_nonfinite_step(rank, stage):
    """During the uncompressed warm-up (powersgd.start_step) a nonfinite gradient skips the update too. Under
    ZeRO-0 no DeepSpeed check sees it: the reducer's flag must reach the extension's optimizer wrapper (it did not,
    and the parameters became NaN)."""
    engine, ext = _engine(stage, powersgd_rank=2, start_step=5)
    _train(engine, ext, rank, 1)
    before = _params(engine)
    _train(engine, ext, rank, 1, poison_step=0)
    after = _params(engine)
    assert all(torch.equal(before[n], after[n]) for n in before), f"ZeRO-{stage}: a warm-up step with Inf applied"
    assert engine.skipped_steps == 1


def _foreign_optimizer_refused():
    """An engine that built another optimizer class than the hooked one (as MiCS or SuperOffload would) is refused
    at setup: its reduction would never reach PowerSGD."""
    import deepspeed
    from dalle_ds.config import ConfigError, PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    model, cfg = _Net(), _ds_config(3)
    ext = PowerSGDExtension(PowerSGDConfig(enabled=True, rank=2, local_size=2, compress=r"^(fc|out)\.weight$"))
    ext.before_initialize(model, cfg)
    ext.restore_deepspeed()  # DeepSpeed builds its own class, as for a MiCS config
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    with pytest.raises(ConfigError, match="nothing would be compressed"):
        ext.setup(types.SimpleNamespace(engine=engine, device=torch.device("cpu")))


def test_powersgd_in_the_deepspeed_engine_zero_0_1_2_3():
    run_local_ranks(_all_stages, 4)


def test_zero3_refuses_qgz_and_predivide():
    """ZeRO++'s quantized gradients run inside the call PowerSGD replaces, and the hook averages over the job
    itself: both are refused before the engine is built; the plain ZeRO-3 config is accepted (and gets
    reduce_scatter=true, the path that reaches the hook)."""
    from dalle_ds.config import ConfigError, PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    ext = PowerSGDExtension(PowerSGDConfig(enabled=True))
    with pytest.raises(ConfigError, match="zero_quantized_gradients"):
        ext.before_initialize(_Net(), _zero(3, zero_quantized_gradients=True))
    with pytest.raises(ConfigError, match="gradient_predivide_factor"):
        ext.before_initialize(_Net(), dict(_ds_config(3), gradient_predivide_factor=2.0))
    cfg = _zero(3, reduce_scatter=False)
    _accepts(ext, cfg)
    assert cfg["zero_optimization"]["reduce_scatter"] is True


def _accepts(ext, cfg: dict) -> None:
    """``before_initialize`` passes; undo its ZeRO optimizer swap (``setup`` would, after deepspeed.initialize)
    so that it does not leak into later tests of this process."""
    ext.before_initialize(_Net(), cfg)
    ext.restore_deepspeed()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_fp16_mode_is_refused(stage):
    """DeepSpeed's fp16 mode would keep lowering no loss scale on ZeRO-0 skips and leave loss-scaled residuals in the
    error buffers; the project's fp16 route (per-resblock scaling, fp16.enabled=false) stays accepted."""
    from dalle_ds.config import ConfigError, PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    ext = PowerSGDExtension(PowerSGDConfig(enabled=True))
    with pytest.raises(ConfigError, match=r"fp16\.enabled is true(.|\n)*set fp16\.enabled=false(.|\n)*"
                                          r"model\.resblock_grad_scaling"):
        ext.before_initialize(_Net(), dict(_ds_config(stage), fp16={"enabled": True, "loss_scale": 0}))
    _accepts(ext, dict(_ds_config(stage), fp16={"enabled": False}))
    _accepts(ext, dict(_ds_config(stage), bf16={"enabled": True}))


def _zero(stage: int, **zero) -> dict:
    return dict(_ds_config(stage), zero_optimization={"stage": stage, **zero})


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_without_contiguous_gradients_is_refused(stage):
    """contiguous_gradients=false makes ZeRO-1/2 all-reduce through buffered_reduce_fallback, bypassing PowerSGD
    (test_contiguous_gradients_decide_whether_zero_calls_the_hook shows it on the engine). The key's absence means
    DeepSpeed's default, true; an optimizer offload forces it on; ZeRO-0 does not read it."""
    from dalle_ds.config import ConfigError, PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    ext = PowerSGDExtension(PowerSGDConfig(enabled=True))
    with pytest.raises(ConfigError, match=r"zero_optimization\.contiguous_gradients is false(.|\n)*"
                                          r"buffered_reduce_fallback(.|\n)*contiguous_gradients=true"):
        ext.before_initialize(_Net(), _zero(stage, contiguous_gradients=False))
    _accepts(ext, _zero(stage))
    _accepts(ext, _zero(stage, contiguous_gradients=True))
    _accepts(ext, _zero(stage, contiguous_gradients=False, offload_optimizer={"device": "cpu"}))
    _accepts(ext, _zero(0, contiguous_gradients=False))


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_without_the_nonfinite_check_is_refused(stage):
    """PowerSGD skips an update by leaving an Inf for DeepSpeed's check; ZeRO-1/2 runs that check only with
    compute_grad_norm (fp32 mode) or bf16.check_grad_overflow (bf16 mode) on: with either off, an Inf step was
    applied (parameters NaN, found by review). ZeRO-3 always checks."""
    from dalle_ds.config import ConfigError, PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    ext = PowerSGDExtension(PowerSGDConfig(enabled=True))
    with pytest.raises(ConfigError, match=r"zero_optimization\.compute_grad_norm=false turns off"):
        ext.before_initialize(_Net(), _zero(stage, compute_grad_norm=False))
    with pytest.raises(ConfigError, match=r"bf16\.check_grad_overflow=false turns off"):
        ext.before_initialize(_Net(), dict(_zero(stage), bf16={"enabled": True, "check_grad_overflow": False}))
    _accepts(ext, dict(_zero(stage, compute_grad_norm=False), bf16={"enabled": True}))  # bf16 checks on its own
    _accepts(ext, _zero(stage, compute_grad_norm=True))


def _reducer_calls(rank, world, contiguous: bool) -> int:
    """Elements PowerSGD reduced in one ZeRO-1 step with the config check bypassed (the key flipped after
    before_initialize): the DeepSpeed fact behind the refusal."""
    import deepspeed
    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    model, cfg = _Net(), _zero(1)
    ext = PowerSGDExtension(PowerSGDConfig(enabled=True, rank=2, local_size=1, compress=r"^(fc|out)\.weight$"))
    ext.before_initialize(model, cfg)
    cfg["zero_optimization"]["contiguous_gradients"] = contiguous
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ext.setup(types.SimpleNamespace(engine=engine, device=torch.device("cpu")))
    _train(engine, ext, rank, 1)
    return ext._acc.shard_elements + ext._acc.uncompressed_elements


def _both_settings(rank, world):
    return _reducer_calls(rank, world, True), _reducer_calls(rank, world, False)


def test_contiguous_gradients_decide_whether_zero_calls_the_hook():
    """Pins the DeepSpeed behaviour the refusal rests on (a DeepSpeed upgrade that changes it fails here): with
    contiguous gradients every parameter goes through PowerSGD, without them none does."""
    with_contiguous, without = run_local_ranks(_both_settings, 2)
    assert with_contiguous == sum(p.numel() for p in _Net().parameters()) and without == 0


def test_shipped_zero_configs_accept_powersgd():
    """Every shipped prior config (ZeRO 1-3, bf16 / fp16 resblocks, offload, plateau halving) is one PowerSGD can
    hook; the ZeRO-3 ones get reduce_scatter on, the ZeRO-1/2 ones off."""
    import json
    from pathlib import Path

    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.dist.deepspeed_powersgd import PowerSGDExtension
    paths = sorted(Path(__file__).resolve().parents[1].joinpath("ds_configs").glob("zero*.json"))
    assert len(paths) >= 7
    for path in paths:
        cfg = json.loads(path.read_text())
        _accepts(PowerSGDExtension(PowerSGDConfig(enabled=True)), cfg)
        assert cfg["zero_optimization"]["reduce_scatter"] is (cfg["zero_optimization"]["stage"] == 3), path.name
