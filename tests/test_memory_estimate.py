"""The per-GPU memory estimate (dalle_ds.models.memory, ``python -m dalle_ds.models --memory``) and the ZeRO ×
precision DeepSpeed configs in ds_configs/."""
import dataclasses
from pathlib import Path

import pytest
import torch

from dalle_ds.config import DALLE_PRESETS, DalleConfig
from dalle_ds.models.__main__ import main as models_main
from dalle_ds.models.dalle import DALLE, count_parameters
from dalle_ds.models.memory import (activation_bytes, estimate_per_gpu, format_estimate, parameter_breakdown,
                                    saved_activation_bytes)
from dalle_ds.train.ds_config import load_ds_config, prepare_ds_config

ROOT = Path(__file__).resolve().parents[1]
TINY = DALLE_PRESETS["tiny"]


@pytest.mark.parametrize("preset", ["test", "tiny", "125M", "12B"])
def test_closed_form_parameter_count_matches_the_model(preset):
    cfg = DALLE_PRESETS[preset]
    parts = parameter_breakdown(cfg)
    assert parts["total"] == count_parameters(cfg)
    assert parts["matmul"] + parts["fp32_islands"] == parts["total"]
    if preset == "tiny":  # the split by hand: resblock weight matrices vs gains, biases, embeddings, heads
        with torch.device("meta"):
            model = DALLE(cfg)
        matrices = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and p.dim() == 2)
        assert parts["matmul"] == matrices


def test_state_bytes_follow_the_zero_stages():
    """bf16: 2 + 2 bytes of parameters and gradients, 16 of optimizer state (fp32 master, fp32 gradient copy, two
    moments: what DeepSpeed holds, benchmarks/memory_check.py); fp32 without ZeRO: only the moments (8)."""
    psi = count_parameters(TINY)
    e = {z: estimate_per_gpu(TINY, zero=z, gpus=8, precision="bf16") for z in (0, 1, 2, 3)}
    assert (e[0]["parameters"], e[0]["gradients"], e[0]["optimizer"]) == (2 * psi, 2 * psi, 16 * psi)
    assert (e[1]["parameters"], e[1]["gradients"], e[1]["optimizer"]) == (2 * psi, 2 * psi, 16 * psi / 8)
    assert (e[2]["parameters"], e[2]["gradients"], e[2]["optimizer"]) == (2 * psi, 2 * psi / 8, 16 * psi / 8)
    assert (e[3]["parameters"], e[3]["gradients"], e[3]["optimizer"]) == (2 * psi / 8, 2 * psi / 8, 16 * psi / 8)
    assert e[0]["deepspeed_buffers"] == e[1]["deepspeed_buffers"] == e[2]["deepspeed_buffers"] == 0
    # ZeRO-3: DeepSpeed's default 5e8-element gradient bucket (bf16), the largest layer, the persistent parameters
    assert e[3]["deepspeed_buffers"] > 2 * 500_000_000
    small = estimate_per_gpu(TINY, zero=3, gpus=8, ds_config={"zero_optimization": {"reduce_bucket_size": 10}})
    assert small["deepspeed_buffers"] < e[3]["deepspeed_buffers"] - 999_000_000
    assert estimate_per_gpu(TINY, zero=0, gpus=1, precision="fp32")["optimizer"] == 8 * psi
    assert estimate_per_gpu(TINY, zero=1, gpus=2, precision="fp32")["optimizer"] == 16 * psi / 2
    f = estimate_per_gpu(TINY, zero=3, gpus=4, precision="fp16-resblock", offload=True)
    assert (f["parameters"], f["gradients"], f["optimizer"], f["host_optimizer"]) == (psi, psi, 0, 4 * psi)
    for est in e.values():
        assert est["total"] == pytest.approx(est["parameters"] + est["gradients"] + est["optimizer"]
                                             + est["deepspeed_buffers"] + est["ema"] + est["activations"])
        assert est["activations_checkpointed"] < est["activations"]


def test_the_weight_average_is_counted_where_it_lives():
    """The trainers' fp32 EMA: 4 bytes per parameter the rank holds (all of them under ZeRO 0-2, 1/N under ZeRO-3),
    on the GPU by default; with ema="host" none on the GPU and 4 + the parameters' dtype per parameter on the host."""
    psi = count_parameters(TINY)
    for zero, held in ((0, psi), (2, psi), (3, psi / 8)):
        dev = estimate_per_gpu(TINY, zero=zero, gpus=8, precision="bf16")
        host = estimate_per_gpu(TINY, zero=zero, gpus=8, precision="bf16", ema="host")
        none = estimate_per_gpu(TINY, zero=zero, gpus=8, precision="bf16", ema="none")
        assert (dev["ema"], dev["host_ema"]) == (4 * held, 0)
        assert (host["ema"], host["host_ema"]) == (0, (4 + 2) * held)
        assert none["ema"] == none["host_ema"] == 0
        assert dev["total"] - host["total"] == pytest.approx(4 * held) and host["total"] == none["total"]
    fp32 = estimate_per_gpu(TINY, zero=1, gpus=2, precision="fp16-resblock", ema="host")
    assert fp32["host_ema"] == 8 * psi  # fp32 parameters: a 4-byte staging copy
    text = format_estimate("tiny", estimate_per_gpu(TINY, zero=2, gpus=8, ema="host"), zero=2, gpus=8,
                           precision="bf16", micro_batch=1, offload=False)
    assert "EMA, in host memory per GPU" in text and "EMA of the weights" not in text
    with pytest.raises(ValueError, match="ema"):
        estimate_per_gpu(TINY, zero=2, gpus=8, ema="gpu")


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero2_bf16_model_states_are_deepspeeds_own_estimate(gpus):
    """DeepSpeed's estimator for ZeRO-2 without offload: 2Ψ + 18Ψ/N (16-bit parameters, then 16-bit and fp32
    gradient partitions, fp32 master weights and moments)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = DALLE_PRESETS["1.3B"]
    est = estimate_per_gpu(cfg, zero=2, gpus=gpus, precision="bf16")
    _, theirs = estimate_zero2_model_states_mem_needs(count_parameters(cfg), num_gpus_per_node=gpus,
                                                      cpu_offload=False)
    ours = est["parameters"] + est["gradients"] + est["optimizer"]
    assert ours == pytest.approx(theirs, abs=1.0)


@pytest.mark.slow
@pytest.mark.distributed
def test_estimate_bounds_what_deepspeed_holds(tmp_path):
    """benchmarks/memory_check.py adds up every storage DeepSpeed holds at the optimizer step (and after the
    backward) for the test preset: the estimate's model-state terms cover it (to 1%), by at most a third more (the freed
    gradients: ZeRO-1 reduces its full gradients away before the step), on 1 rank for ZeRO 0-3 and on 2 ranks for
    ZeRO-2/3, in bf16 and fp32."""
    import json
    import subprocess
    import sys

    from launch_utils import deepspeed_launch, single_process_env

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    proc = subprocess.run([sys.executable, "benchmarks/memory_check.py", "--preset", "test", "--out", str(one)],
                          cwd=ROOT, env=single_process_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deepspeed_launch("benchmarks/memory_check.py", ["--preset", "test", "--zero", "2", "3", "--out", str(two)])
    rows = json.loads(one.read_text()) + json.loads(two.read_text())
    assert {(r["zero"], r["precision"], r["world_size"]) for r in rows} == (
        {(z, p, 1) for z in range(4) for p in ("bf16", "fp32")} | {(z, p, 2) for z in (2, 3) for p in ("bf16", "fp32")})
    for r in rows:
        ratio = r["estimate_bytes"] / r["measured_bytes"]
        assert 0.99 <= ratio < 1.35, r  # 0.99: scalars and alignment padding DeepSpeed adds
    with pytest.raises(ValueError, match="offload needs ZeRO"):
        estimate_per_gpu(TINY, zero=0, gpus=1, offload=True)
    with pytest.raises(ValueError, match="precision"):
        activation_bytes(TINY, 1, "fp8", False)


def test_activation_arithmetic_against_what_autograd_saves():
    cfg0 = DalleConfig(text_vocab_size=50, text_len=8, image_vocab_size=32, image_grid=8, d_model=64, n_layers=4,
                       n_heads=2, conv_kernel=3, attn_backend="dense")
    B = 4
    g = torch.Generator().manual_seed(0)
    text, image = torch.randint(2, 50, (B, 8), generator=g), torch.randint(0, 32, (B, 64), generator=g)
    for kw, precision in [({}, "fp32"), ({"resblock_grad_scaling": True, "resblock_dtype": "float16"},
                                         "fp16-resblock")]:
        for ckpt in (False, True):
            cfg = dataclasses.replace(cfg0, activation_checkpointing=ckpt, **kw)
            model = DALLE(cfg)
            measured, _ = saved_activation_bytes(model, lambda: model(text, image).loss)
            est = activation_bytes(cfg, B, precision, ckpt, attention="dense")
            assert 0.75 < measured / est["kept"] < 1.1, (precision, ckpt, measured, est)


def test_cli_prints_the_estimate(capsys):
    assert models_main(["--preset", "12B", "--memory", "--zero", "3", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "12,293,824,256" in out and "ZeRO-3 over 64 GPU(s), bf16" in out
    est = estimate_per_gpu(DALLE_PRESETS["12B"], zero=3, gpus=64)
    assert f"{est['optimizer'] / 2 ** 30:10.2f} GiB" in out and "checkpointed" in out


def test_cli_refuses_a_deepspeed_config_it_cannot_read(tmp_path, capsys):
    (tmp_path / "z.json").write_text('{"zero_optimization": 2}')
    (tmp_path / "cpu_dvae.json").write_text("{}")
    for path, needle in ((tmp_path / "missing.json", "file not found"),
                         (tmp_path / "cpu_dave.json", f"did you mean {tmp_path / 'cpu_dvae.json'}?"),
                         (tmp_path / "z.json", "'zero_optimization' must be a JSON object")):
        with pytest.raises(SystemExit):
            models_main(["--preset", "tiny", "--memory", "--deepspeed_config", str(path)])
        assert needle in capsys.readouterr().err


def test_cli_takes_stage_precision_micro_batch_and_offload_from_the_deepspeed_config(tmp_path, capsys):
    """--deepspeed_config sets what the flags left unset; a flag given wins, with a warning naming both values."""
    zero3 = str(ROOT / "ds_configs" / "zero3_bf16_offload.json")
    assert models_main(["--preset", "tiny", "--memory", "--gpus", "8", "--deepspeed_config", zero3]) == 0
    out, err = capsys.readouterr()
    assert "ZeRO-3 over 8 GPU(s), bf16, micro-batch 2, optimizer offloaded to CPU" in out and err == ""
    fp32 = str(ROOT / "ds_configs" / "zero3_fp16_resblock.json")
    assert models_main(["--preset", "tiny", "--memory", "--zero", "1", "--deepspeed_config", fp32]) == 0
    out, err = capsys.readouterr()
    assert "ZeRO-1 over 1 GPU(s), fp32, micro-batch 2" in out
    assert "warning: --zero 1 differs from" in err and "zero_optimization.stage 3" in err
    assert "--precision fp16-resblock" in err  # the note: the file leaves DeepSpeed in fp32 mode
    assert models_main(["--preset", "tiny", "--memory", "--precision", "fp16-resblock", "--micro-batch", "4",
                        "--deepspeed_config", fp32]) == 0
    out, err = capsys.readouterr()
    assert "ZeRO-3 over 1 GPU(s), fp16-resblock, micro-batch 4" in out
    assert err.strip() == f"warning: --micro-batch 4 differs from {fp32}'s micro-batch 2; estimating --micro-batch 4"
    bf16 = str(ROOT / "ds_configs" / "zero1_bf16.json")
    assert models_main(["--preset", "tiny", "--memory", "--precision", "fp32", "--deepspeed_config", bf16]) == 0
    out, err = capsys.readouterr()
    assert "ZeRO-1 over 1 GPU(s), fp32" in out and "--precision fp32 differs from" in err and "bf16 mode" in err
    (tmp_path / "batch.json").write_text('{"train_batch_size": 32, "gradient_accumulation_steps": 2}')
    assert models_main(["--preset", "tiny", "--memory", "--gpus", "4", "--deepspeed_config",
                        str(tmp_path / "batch.json")]) == 0
    assert "ZeRO-0 over 4 GPU(s), fp32, micro-batch 4" in capsys.readouterr().out  # 32 / (2 × 4)
    (tmp_path / "fp16.json").write_text('{"fp16": {"enabled": true}}')
    with pytest.raises(SystemExit):
        models_main(["--preset", "tiny", "--memory", "--deepspeed_config", str(tmp_path / "fp16.json")])
    assert "pass --precision bf16" in capsys.readouterr().err
    assert models_main(["--preset", "tiny", "--memory"]) == 0  # no file: ZeRO-3, bf16, micro-batch 1
    assert "ZeRO-3 over 1 GPU(s), bf16, micro-batch 1" in capsys.readouterr().out


CONFIGS = sorted(ROOT.joinpath("ds_configs").glob("zero*.json"))


def test_the_zero_precision_matrix_is_shipped():
    names = {p.stem for p in CONFIGS}
    assert {f"zero{z}_{p}" for z in (1, 2, 3) for p in ("bf16", "fp16_resblock")} <= names
    assert any("offload" in n for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_load_and_deepspeed_accepts_them(path, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = load_ds_config(path)
    stage = int(path.stem[4])
    assert raw["zero_optimization"]["stage"] == stage
    if "fp16_resblock" in path.stem:  # fp32 params; the model scales per resblock: DeepSpeed's fp16 mode is off
        assert not raw.get("fp16", {}).get("enabled") and not raw.get("bf16", {}).get("enabled")
    else:
        assert raw["bf16"]["enabled"] is True
    prepare_ds_config(raw, steps=1000, run_dir=tmp_path, job_name="t", world_size=64, accelerator="cuda")
    # DeepSpeed's own parser (strict: unknown keys are errors) sees world size 1 without a process group
    cfg = prepare_ds_config(raw, steps=1000, run_dir=tmp_path, job_name="t", world_size=1, accelerator="cpu")
    ds = DeepSpeedConfig(cfg)
    assert ds.zero_optimization_stage == stage
    assert ds.bfloat16_config.enabled == ("bf16" in path.stem)
    assert (ds.zero_config.offload_optimizer is not None) == ("offload" in path.stem)


def test_16bit_adam_moments_estimate_is_what_the_optimizer_holds():
    """With adam_moments=16bit the estimate's optimizer state equals the bytes AdamW16 actually holds for the model,
    grouped as the trainer groups it (matmul weights: 4 bytes per element; the fp32 islands: 8)."""
    from dalle_ds.precision.adam_moments import AdamW16

    model = DALLE(TINY)
    sixteen = set(model.resblock_matmul_weight_names())
    assert sixteen and all(".fn." in n and n.endswith(".weight") for n in sixteen)
    named = list(model.named_parameters())
    opt = AdamW16([{"params": [p for n, p in named if n in sixteen]},
                   {"params": [p for n, p in named if n not in sixteen], "moments": "fp32"}])
    for _, p in named:
        p.grad = torch.zeros_like(p)
    opt.step()
    est = estimate_per_gpu(TINY, zero=0, gpus=1, precision="fp32", adam_moments="16bit")
    assert est["optimizer"] == opt.state_bytes()
    assert sum(p.numel() for n, p in named if n in sixteen) == parameter_breakdown(TINY)["matmul"]
    bf16 = estimate_per_gpu(TINY, zero=1, gpus=8, precision="bf16", adam_moments="16bit")
    psi, matmul = count_parameters(TINY), parameter_breakdown(TINY)["matmul"]
    assert bf16["optimizer"] == (16 * psi - 4 * matmul) / 8  # fp32 master, gradient copy and moments, partitioned
    with pytest.raises(ValueError, match="adam_moments"):
        estimate_per_gpu(TINY, zero=1, gpus=1, adam_moments="8bit")


@pytest.mark.parametrize("error_dtype", ["fp169", "fp32"])
def test_powersgd_state_estimate_is_what_the_reducer_allocates(error_dtype):
    """``--powersgd-rank``: the estimate's PowerSGD term equals the bytes of the error buffers and Q matrices that
    the reducer registers for the prior (default compress pattern), on one rank of a 4-GPU machine; it is the
    same for any number of machines, and the CLI prints it."""
    import re

    from dalle_ds.config import PowerSGDConfig
    from dalle_ds.dist.powersgd import HierarchicalPowerSGD, PowerSGDSettings
    from dalle_ds.dist.topology import Topology

    topo = Topology(world_size=4, rank=1, local_size=4, local_group=None, global_group=None)  # no collectives used
    red = HierarchicalPowerSGD(topo, PowerSGDSettings(rank=32, error_dtype=error_dtype))
    pattern = re.compile(PowerSGDConfig().compress)
    registered = [red.register(n, p.shape) for n, p in DALLE(TINY).named_parameters() if pattern.search(n)]
    assert len(registered) == 4 * TINY.n_layers and all(registered)
    held = sum(sh.err.numel() * sh.err.element_size() + sh.q.numel() * sh.q.element_size()
               for sh in red.shards.values())
    ests = [estimate_per_gpu(TINY, zero=3, gpus=g, powersgd_rank=32, gpus_per_machine=4,
                             powersgd_error_dtype=error_dtype) for g in (4, 64)]
    assert ests[0]["powersgd"] == ests[1]["powersgd"] == held
    plain = estimate_per_gpu(TINY, zero=3, gpus=64)
    assert plain["powersgd"] == 0 and ests[1]["total"] == plain["total"] + held
    mlp_only = r"^layers\.\d+\.mlp\.fn\.\w+\.weight$"  # a run's own powersgd.compress pattern is honoured
    held_mlp = sum(sh.err.numel() * sh.err.element_size() + sh.q.numel() * sh.q.element_size()
                   for k, sh in red.shards.items() if re.search(mlp_only, k))
    assert 0 < held_mlp < held and estimate_per_gpu(TINY, zero=3, gpus=4, powersgd_rank=32, gpus_per_machine=4,
                                                    powersgd_error_dtype=error_dtype,
                                                    powersgd_compress=mlp_only)["powersgd"] == held_mlp
    with pytest.raises(ValueError, match="gpus_per_machine"):
        estimate_per_gpu(TINY, zero=3, gpus=6, powersgd_rank=32, gpus_per_machine=4)


def test_cli_adds_powersgd_state(capsys):
    assert models_main(["--preset", "12B", "--memory", "--gpus", "1024", "--powersgd-rank", "896"]) == 0
    est = estimate_per_gpu(DALLE_PRESETS["12B"], zero=3, gpus=1024, powersgd_rank=896, gpus_per_machine=8)
    line = next(x for x in capsys.readouterr().out.splitlines() if "PowerSGD error buffers and Q" in x)
    assert line.endswith(f"{est['powersgd'] / 2 ** 30:10.2f} GiB") and est["powersgd"] > 2 ** 31
    with pytest.raises(SystemExit):
        models_main(["--preset", "tiny", "--memory", "--gpus", "6", "--powersgd-rank", "16",
                     "--gpus-per-machine", "4"])


def test_estimate_for_run_reads_the_run_settings():
    """The trainer's start-up line: stage, precision, micro-batch and offload come from the DeepSpeed config, the
    activations term follows the model's checkpointing, PowerSGD adds its buffers."""
    from dalle_ds.models.memory import estimate_for_run

    cfg = dataclasses.replace(TINY, activation_checkpointing=True)
    ds = load_ds_config(ROOT / "ds_configs" / "zero3_bf16_offload.json")
    est, line = estimate_for_run(cfg, ds, 16, micro_batch=2, powersgd_rank=8, gpus_per_machine=8)
    want = estimate_per_gpu(cfg, zero=3, gpus=16, precision="bf16", micro_batch=2, offload=True, ds_config=ds,
                            powersgd_rank=8, gpus_per_machine=8)
    assert est == want and est["powersgd"] > 0 and est["host_optimizer"] > 0
    total = est["total"] - est["activations"] + est["activations_checkpointed"]
    assert f"= {total / 2 ** 30:.2f} GiB" in line and "ZeRO-3, bf16, 16 GPU(s)" in line and "checkpointed" in line
    fp16 = dataclasses.replace(TINY, resblock_grad_scaling=True, resblock_dtype="float16")
    est16, line16 = estimate_for_run(fp16, load_ds_config(ROOT / "ds_configs" / "zero2_fp16_resblock.json"), 4)
    assert "ZeRO-2, fp16-resblock" in line16 and "no checkpointing" in line16
    assert est16 == estimate_per_gpu(fp16, zero=2, gpus=4, precision="fp16-resblock", micro_batch=2,
                                     ds_config=load_ds_config(ROOT / "ds_configs" / "zero2_fp16_resblock.json"))
    # the older "bfloat16" section is DeepSpeed's bf16 mode too (it was estimated as fp32)
    legacy = {k: v for k, v in ds.items() if k != "bf16"} | {"bfloat16": {"enabled": True}}
    assert "ZeRO-3, bf16" in estimate_for_run(cfg, legacy, 16, micro_batch=2)[1]
