"""The training benchmark's harness on CPU (test preset): once as one plain process, once under the deepspeed launcher
with 2 ranks. Checks that the report is complete and self-consistent; timings themselves are not checked."""
import dataclasses
import json
import statistics
import subprocess
import sys

import pytest

from launch_utils import ROOT, deepspeed_launch, single_process_env

from dalle_ds.config import DALLE_PRESETS
from dalle_ds.models.flops import recompute_flops_per_sequence, training_flops_per_sequence, training_step_parts

FIELDS = ("case", "preset", "zero", "precision", "activation_checkpointing", "compiled", "logits_matmul",
          "attn_backend", "params",
          "seq_len",
          "world_size", "train_batch_size", "tokens_per_step", "flops_per_step", "hardware_flops_per_step", "step_s",
          "tokens_per_s", "model_tflops_per_s", "model_tflops_per_s_per_device", "matmul_tflops_per_s", "mfu",
          "peak_memory_bytes", "peak_memory_kind", "phases", "per_rank")
PHASE_FIELDS = ("forward_ms", "backward_ms", "optimizer_ms", "step_ms", "communication_ms",
                "communication_in_phase_ms", "other_ms", "collective_ops")


def _close(a, b, rel=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b))


def _check(result: dict, world: int, micro: int, accum: int, ckpt: bool) -> dict:
    assert result["bench"] == "train" and result["device"] == "cpu" and result["world_size"] == world
    assert result["date"] and result["command"].split()[0] in ("python", "deepspeed")
    assert result["host"]["procs_running"] >= 1 and result["host_end"]["cpu_count"] == result["host"]["cpu_count"]
    (row,) = result["rows"]
    for f in FIELDS:
        assert f in row, f
    cfg = dataclasses.replace(DALLE_PRESETS["test"], activation_checkpointing=ckpt)
    batch = micro * accum * world
    assert row["activation_checkpointing"] is ckpt and row["train_batch_size"] == batch
    assert row["tokens_per_step"] == batch * cfg.seq_len
    assert row["flops_per_step"] == batch * training_flops_per_sequence(cfg)
    assert row["hardware_flops_per_step"] == row["flops_per_step"] + (batch * recompute_flops_per_sequence(cfg)
                                                                     if ckpt else 0)
    ranks = row["per_rank"]
    assert len(ranks) == world
    for r in ranks:
        assert len(r["step_times_s"]) == result["rows"][0]["timed_steps"]
        assert _close(r["step_s"], statistics.median(r["step_times_s"]))
        assert r["peak_memory_bytes"] > 0 and r["matmul_flops_per_s"] > 0
    assert row["step_s"] == max(r["step_s"] for r in ranks) > 0
    assert _close(row["tokens_per_s"], row["tokens_per_step"] / row["step_s"])
    assert _close(row["model_tflops_per_s"] * 1e12, row["flops_per_step"] / row["step_s"])
    assert _close(row["model_tflops_per_s_per_device"] * world, row["model_tflops_per_s"])
    mm = statistics.mean(r["matmul_flops_per_s"] for r in ranks)
    assert _close(row["mfu"], row["model_tflops_per_s_per_device"] * 1e12 / mm)
    assert row["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in ranks)
    assert "RSS" in row["peak_memory_kind"]
    ph = row["phases"]
    for f in PHASE_FIELDS:
        assert f in ph, f
    eps = 1e-6
    parts = [ph["forward_ms"], ph["backward_ms"], ph["optimizer_ms"]]
    assert all(p > 0 for p in parts) and sum(parts) <= ph["step_ms"] + eps
    assert _close(ph["other_ms"], ph["step_ms"] - sum(parts), 1e-6)
    inside = ph["communication_in_phase_ms"]
    assert set(inside) == {"forward", "backward", "optimizer"}
    assert all(0 <= v <= ph["communication_ms"] + eps for v in inside.values())
    assert sum(inside.values()) <= ph["communication_ms"] + eps <= ph["step_ms"] + eps
    sinks = row["time_sinks"]
    assert sinks["basis"].startswith("CPU operators") and sinks["idle_ms"] is None and sinks["busy_ms"] is None
    assert sinks["step_ms"] == ph["step_ms"] and _close(sum(sinks["categories"].values()), sinks["total_ms"], 1e-6)
    assert sinks["categories"]["matmul"] > 0 and sinks["categories"]["optimizer"] > 0
    ms = [t["ms"] for t in sinks["top"]]
    assert ms == sorted(ms, reverse=True) and 0 < sum(ms) <= sinks["total_ms"] + eps
    for t in sinks["top"]:
        assert _close(t["share_of_step"], t["ms"] / ph["step_ms"]) and t["calls_per_step"] > 0
    # floors: each part's work (from flops.py) over the rate measured for it, summed; MFU at that sum
    floor = row["floor"]
    work = training_step_parts(cfg, micro * accum, row["params"], row["precision"], row["zero"], world)
    rates = {"resblock matmuls": mm, "attention": mm,
             "output heads": statistics.mean(r["head_matmul_flops_per_s"] for r in ranks),
             "optimizer": statistics.mean(r["copy_bytes_per_s"] for r in ranks)}
    for part, w in work.items():
        (unit, amount), = w.items()
        got = floor["parts"][part]
        assert got["unit"] == unit and got["work"] == amount and _close(got["ms"], amount / rates[part] * 1e3)
    assert _close(floor["step_ms"], sum(p["ms"] for p in floor["parts"].values()))
    assert _close(floor["mfu_at_floor"], row["flops_per_step"] / world / (floor["step_ms"] / 1e3) / mm)
    return row


def test_bench_train_quick_one_process(tmp_path):
    out, trace = tmp_path / "train", tmp_path / "trace.json"
    env = single_process_env()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick", "--threads", "1",
                           "--grad-accum", "2", "--checkpointing", "on", "--trace", str(trace), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "train.json").read_text())
    row = _check(result, world=1, micro=4, accum=2, ckpt=True)
    assert row["hardware_flops_per_step"] > row["flops_per_step"]
    md = (tmp_path / "train.md").read_text()
    assert "| case |" in md and "| time sink |" in md and "## Floors" in md
    assert "traceEvents" in json.loads(trace.read_text())


def test_bench_train_keeps_the_cases_that_ran_when_one_fails(tmp_path):
    """One GPU, a case that fails (say, out of memory): the report keeps the others, names the failure, is written
    after every case, and the exit status says something failed."""
    out = tmp_path / "train"
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_train as b; real = b.run_case\n"
            "def run_case(preset, zero, *rest):\n"
            "    if zero == 0: raise MemoryError('out of memory (simulated)')\n"
            "    return real(preset, zero, *rest)\n"
            "b.run_case = run_case\n"
            f"r = b.main(['--quick', '--threads', '1', '--zero', '0,2', '--steps', '1', '--warmup', '0', "
            f"'--out', {str(out)!r}])\n"
            "sys.exit(1 if r['errors'] else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=single_process_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "train.json").read_text())
    assert [r["zero"] for r in result["rows"]] == [2]
    assert len(result["errors"]) == 1 and "MemoryError: out of memory (simulated)" in result["errors"][0]["error"]
    assert "## Failed cases" in (tmp_path / "train.md").read_text()


@pytest.mark.distributed
@pytest.mark.slow
def test_bench_train_quick_deepspeed_two_ranks(tmp_path):
    """ZeRO-2 on 2 ranks, with DeepSpeed's own reduction and with PowerSGD (2 machines x 1 rank)."""
    out = tmp_path / "train2"
    deepspeed_launch("benchmarks/bench_train.py", ["--quick", "--zero", "2", "--powersgd", "0,4",
                                                   "--powersgd-local-size", "1", "--out", str(out)],
                     num_procs=2, timeout=400)
    result = json.loads((tmp_path / "train2.json").read_text())
    assert result["command"].startswith("deepspeed --num_gpus 2")
    stock, psgd = (_check({**result, "rows": [r]}, world=2, micro=4, accum=1, ckpt=False) for r in result["rows"])
    # ZeRO-2 over 2 ranks must move gradients and parameters: the profiler saw collectives
    for row in (stock, psgd):
        ops = " ".join(row["phases"]["collective_ops"])
        assert "all_reduce" in ops or "reduce_scatter" in ops or "allreduce" in ops
        assert row["phases"]["communication_ms"] > 0
    assert stock["powersgd_rank"] == 0 and stock["powersgd"] is None
    assert psgd["case"].endswith("_powersgd4") and psgd["powersgd_rank"] == 4
    d, r, m = DALLE_PRESETS["test"].d_model, 4, 1  # the compression formula of tests/test_powersgd.py
    s = psgd["powersgd"]
    assert s["powersgd/compression_rate"] == pytest.approx(1 - r * (m + 3) / (3 * d * m), rel=0.01)
    assert 0 < s["powersgd/bytes_inter_machine"] and s["powersgd/bytes_sent"] < s["powersgd/bytes_baseline_fp32"]
    assert "| test_z2_fp32_nockpt_powersgd4 | 0.8333 |" in (tmp_path / "train2.md").read_text()


def test_compile_option_parses_and_refuses_zero3(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    assert bench_train.parse_args(["--quick", "--compile", "off,on"]).compile == [False, True]
    assert bench_train.parse_args(["--quick"]).compile == [False]
    assert bench_train.parse_args(["--quick"]).logits_matmul == ["fp32"]
    assert bench_train.parse_args(["--quick", "--logits-matmul", "fp32,tf32"]).logits_matmul == ["fp32", "tf32"]
    assert bench_train.parse_args(["--quick"]).powersgd == [0]
    assert bench_train.parse_args(["--quick", "--powersgd", "0,896"]).powersgd == [0, 896]
    for bad in (["--compile", "yes"], ["--compile", "on", "--zero", "2,3"], ["--logits-matmul", "fp16"],
                ["--powersgd", "-4"], ["--powersgd", "x"]):
        with pytest.raises(SystemExit):
            bench_train.parse_args(["--quick", *bad])
    assert "not combine with --zero 3" in capsys.readouterr().err


def test_time_sink_categories():
    """Real kernel and operator names (cuBLAS, Triton, NCCL, Inductor, aten) land in the category that they are."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from op_breakdown import category

    expect = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel":
            "matmul",
        "ampere_sgemm_128x64_tn": "matmul", "cutlass_80_simt_sgemm_256x128_8x4_nt_align1": "matmul",
        "aten::addmm": "matmul", "aten::mm": "matmul",
        "_attn_fwd": "attention", "_attn_bwd_dkdv": "attention", "flash_fwd_kernel": "attention",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
        "c10d::allreduce_": "communication", "gloo:all_reduce": "communication",
        "multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>": "optimizer",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "normalization",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>": "softmax / loss",
        "aten::nll_loss_forward": "softmax / loss",
        "Memcpy DtoD (Device -> Device)": "copies / casts", "aten::copy_": "copies / casts",
        "bench/forward": "host (Python, framework)", "torch::autograd::AccumulateGrad": "host (Python, framework)",
        "dalle_ds_fp169::error_add_": "compression (PowerSGD, 1-6-9)", "aten::linalg_qr": "compression (PowerSGD, 1-6-9)",
        "void dalle_ds::fp169::cuda::(anonymous namespace)::encode_kernel<dalle_ds::fp169::Fp169, "
        "dalle_ds::fp169::F32Value>(float const*, unsigned short*, long, long, float, bool)":
            "compression (PowerSGD, 1-6-9)",
        "void geqrf_kernel<float>": "compression (PowerSGD, 1-6-9)",
        "dalle_ds_fp169::adamw16_step_": "optimizer",
        "triton_poi_fused_add_gelu_0": "elementwise / other",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl": "elementwise / other",
    }
    assert {name: category(name) for name in expect} == expect


def test_time_sinks_of_device_kernels():
    """The GPU branch on made-up kernel events: durations summed per name, the device's busy time is the union of
    the kernel spans (overlaps counted once), idle = step − busy; CPU-side events are left out."""
    from types import SimpleNamespace as NS

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from op_breakdown import op_breakdown

    def ev(name, start, end, dev="DeviceType.CUDA", annotation=False):
        return NS(name=name, device_type=dev, time_range=NS(start=start, end=end, elapsed_us=lambda: end - start),
                  self_cpu_time_total=1e6, is_user_annotation=annotation)

    events = [ev("aten::mm", 0, 5000, "DeviceType.CPU"),              # host op: not a kernel, ignored
              ev("bench/forward", 0, 10000, annotation=True),          # a range's GPU copy: spans kernels, ignored
              ev("sm90_xmma_gemm_bf16bf16", 0, 3000), ev("_attn_fwd", 2000, 4000),   # overlap 2000-3000
              ev("sm90_xmma_gemm_bf16bf16", 6000, 7000), ev("ncclDevKernel_AllReduce", 9000, 9500)]
    b = op_breakdown(events, steps=1, step_ms=10.0)
    assert b["basis"].startswith("device kernels")
    assert b["total_ms"] == 6.5 and b["busy_ms"] == 5.5 and b["idle_ms"] == 4.5
    assert b["categories"] == {"matmul": 4.0, "attention": 2.0, "communication": 0.5}
    assert [(t["name"], t["ms"], t["calls_per_step"], t["share_of_step"]) for t in b["top"]] == [
        ("sm90_xmma_gemm_bf16bf16", 4.0, 2, 0.4), ("_attn_fwd", 2.0, 1, 0.2), ("ncclDevKernel_AllReduce", 0.5, 1, 0.05)]
    assert op_breakdown(events, steps=2, step_ms=5.0)["busy_ms"] == 2.75  # per step
