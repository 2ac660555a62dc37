"""The attention benchmark harness on tiny CPU shapes: JSON structure and FLOP counting (not speed)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_attention  # noqa: E402


def test_flop_counting_by_hand():
    # T = 3, W = 4, row mask: text 3*4/2 = 6 pairs, image->text 16*3 = 48, image->image 15 + 11*5 = 70
    kept = 6 + 48 + 70
    assert bench_attention.attention_flops(kept, 1, 2, 16, "fwd") == 2 * 2 * 2 * 16 * kept  # 2 matmuls x 2 FLOP/MAC
    assert bench_attention.attention_flops(kept, 1, 2, 16, "bwd") == 2.5 * 4 * 16 * kept * 2
    assert bench_attention.attention_flops(kept, 3, 5, 64, "fwd_bwd") == 3.5 * 4 * 64 * kept * 15
    assert bench_attention.mix_counts(64) == {"row": 47, "column": 16, "conv": 1}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """Run the harness once, tiny, in a subprocess with the Triton interpreter so every provider is exercised."""
    out = str(tmp_path_factory.mktemp("bench") / "attn")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"), "--quick", "--reps", "1",
           "--cases", "tiny", "--extra-masks", "causal", "--profile", "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out + ".json") as f:
        report = json.load(f)
    with open(out + ".md") as f:
        md = f.read()
    return report, md, proc.stdout


def test_report_structure(quick_report):
    report, md, stdout = quick_report
    for key in ("device", "versions", "date", "command", "matmul_tflops", "flop_convention", "cases"):
        assert key in report
    assert report["device"].startswith("CPU") and report["matmul_tflops"] > 0
    (case,) = report["cases"]
    assert (case["T"], case["W"], case["N"], case["B"], case["H"], case["D"]) == (3, 4, 19, 1, 2, 16)
    assert set(case["masks"]) == {"row", "column", "conv", "causal"}  # causal: --extra-masks, outside the mix
    assert case["masks"]["causal"]["kept_elements"] == 19 * 20 // 2
    assert set(case["mix"]["counts"]) == {"row", "column", "conv"}
    assert md.strip().splitlines()[0].startswith("# bench_attention") and "| case | mask | provider |" in md
    assert stdout.strip().endswith(md.strip().splitlines()[-1])  # the markdown table is printed last
    assert "partial" not in report  # the final write replaced the per-mask partial ones
    # how busy the host was at the start and the end (eager timings include the host's launch path)
    for key in ("host", "host_end"):
        host = report[key]
        assert host["cpu_count"] >= 1 and host["host_cpu"] and host["load_avg_1min"] >= 0
        assert host["procs_running"] >= 1  # this process was running when it read /proc/stat
    assert f"{report['host']['cpu_count']} CPUs; at the start 1-min load {report['host']['load_avg_1min']}" in md


def test_partial_results_after_each_mask(monkeypatch):
    """run_case hands the case so far to ``progress`` after every mask (the bench saves it: a killed run keeps it)."""
    import torch

    seen = []
    monkeypatch.setattr(bench_attention, "measure", lambda *a, **k: {"fwd_ms": 1.0, "bwd_ms": 2.0, "fwd_bwd_ms": 3.0})
    monkeypatch.setattr(bench_attention, "reference", lambda *a, **k: None)
    bench_attention.run_case("tiny", 3, 4, 1, 2, 16, torch.float32, "cpu", ["dense"], 1, 8, 1.0,
                             progress=lambda case: seen.append(list(case["masks"])))
    assert seen == [["row"], ["row", "column"], ["row", "column", "conv"]]


def test_report_flops_and_floors(quick_report):
    report, _, _ = quick_report
    case = report["cases"][0]
    row = case["masks"]["row"]
    assert row["kept_elements"] == 124  # hand count above
    assert row["flops"]["fwd"] == 4 * 16 * 124 * 1 * 2
    assert row["flops"]["fwd_bwd"] == 3.5 * row["flops"]["fwd"]
    assert case["masks"]["column"]["kept_elements"] == 6 + 48 + 40  # query at image row r sees r + 1 keys
    rate = report["matmul_tflops"] * 1e12
    assert row["floor_ms"]["fwd"] == pytest.approx(row["flops"]["fwd"] / rate * 1e3)
    mix = case["mix"]
    assert mix["counts"] == {"row": 47, "column": 16, "conv": 1}
    expect = sum(mix["counts"][k] * case["masks"][k]["flops"]["fwd"] for k in mix["counts"]) / 64
    assert mix["flops"]["fwd"] == pytest.approx(expect)


def test_report_timings_and_speedups(quick_report):
    report, _, _ = quick_report
    case = report["cases"][0]
    for kind, entry in case["masks"].items():
        provs = entry["providers"]
        assert set(provs) == {"triton", "triton_fused", "flex", "sdpa_causal", "sdpa_mask", "dense"}
        for name in ("triton", "triton_fused", "sdpa_causal", "sdpa_mask", "dense"):
            res = provs[name]
            assert "error" not in res, (kind, name, res)
            for m in ("fwd", "bwd", "fwd_bwd"):
                assert res[f"{m}_ms"] > 0
                assert res["tflops"][m] == pytest.approx(entry["flops"][m] / (res[f"{m}_ms"] * 1e-3) / 1e12)
        # every provider but sdpa_causal (another mask) was checked against fp32 masked attention before timing:
        # output and gradients (FlexAttention on CPU: the output only)
        for name in ("triton", "triton_fused", "sdpa_mask", "dense"):  # triton_fused: dQ by atomic adds
            chk = provs[name]["check"]
            assert chk["ok"] and set(chk["max_rel_err"]) == {"out", "dq", "dk", "dv"}, (kind, name, chk)
            assert max(chk["max_rel_err"].values()) < 1e-4, (kind, name, chk)
        assert set(provs["flex"]["check"]["max_rel_err"]) == {"out"} and provs["flex"]["check"]["ok"]
        assert "check" not in provs["sdpa_causal"]
        # FlexAttention has no CPU backward: forward timed, the refusal recorded
        assert provs["flex"]["fwd_ms"] > 0 and "backward" in provs["flex"]["bwd_error"]
        sp = entry["triton_speedup"]["sdpa_causal"]["fwd_bwd"]
        assert sp == pytest.approx(provs["sdpa_causal"]["fwd_bwd_ms"] / provs["triton"]["fwd_bwd_ms"])
    tri_mix = case["mix"]["providers"]["triton"]
    per = [case["masks"][k]["providers"]["triton"]["fwd_ms"] for k in ("row", "column", "conv")]
    assert tri_mix["fwd_ms"] == pytest.approx((47 * per[0] + 16 * per[1] + 1 * per[2]) / 64)


def test_profile_on_cpu_places_the_time(quick_report):
    """--profile: each forward+backward's time by operator on CPU (by kernel on a GPU), in the JSON and the report."""
    report, md, _ = quick_report
    prof = report["cases"][0]["masks"]["row"]["providers"]["sdpa_mask"]["profile"]
    assert prof["unit"] == "op" and prof["total_ms"] > 0
    assert prof["top"] == sorted(prof["top"], key=lambda r: -r["ms"]) and len(prof["top"]) <= 8
    assert sum(r["ms"] for r in prof["top"]) <= prof["total_ms"] + 1e-9
    assert "Profile, tiny row sdpa_mask, forward+backward" in md


def test_summarize_profile_counts_only_gpu_kernels_per_call():
    from types import SimpleNamespace

    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, device_type, start, us):  # one profiler event (``prof.events()``) of ``us`` microseconds
        return SimpleNamespace(name=name, device_type=device_type, self_cpu_time_total=us,
                               time_range=SimpleNamespace(start=start, end=start + us, elapsed_us=lambda: us))

    events = ([ev("_attn_fwd", cuda, 1000 * i, 100.0) for i in range(5)]          # 500 us over 5 calls
              + [ev("_attn_bwd_dkdv", cuda, 1000 * i + 200, 300.0) for i in range(5)]  # 1500 us
              + [ev("aten::empty", cpu, 10 * i, 4.5) for i in range(20)])           # host op: not counted
    out = bench_attention.summarize_profile(events, iters=5, device="cuda")
    assert [r["name"] for r in out["top"]] == ["_attn_bwd_dkdv", "_attn_fwd"]
    assert out["top"][0]["ms"] == pytest.approx(0.3) and out["top"][1]["calls"] == 1
    assert out["total_ms"] == pytest.approx(0.4) and out["unit"] == "kernel"


def test_graphs_need_a_gpu():
    with pytest.raises(SystemExit):
        bench_attention.main(["--quick", "--graphs"])


def test_graph_timings_flow_into_the_mix_speedups_and_table(monkeypatch):
    """The GPU-only graph path, with graph_ms / host_us replaced (no CUDA here): the replay times reach the mix, the
    speedups and the second table; a provider that cannot be captured is reported, its eager numbers kept."""
    import torch

    fake_ms = {"sdpa_mask": 2.0, "triton": 1.0}
    current = {}

    def fake_graph_ms(fn, grad_to_none=None):  # forward: fake_ms; forward+backward (leaves given): 3x
        if current["prov"] == "broken":
            raise RuntimeError("capture failed")
        return fake_ms[current["prov"]] * (3 if grad_to_none else 1)

    real_make = bench_attention.make_provider

    def make(name, spec, device):
        current["prov"] = name
        return real_make("dense" if name in ("broken", "triton") else name, spec, device)  # triton: needs a GPU

    monkeypatch.setattr(bench_attention, "graph_ms", fake_graph_ms)
    monkeypatch.setattr(bench_attention, "host_us", lambda fn, grad_to_none=None, calls=20: 42.0)
    monkeypatch.setattr(bench_attention, "make_provider", make)
    monkeypatch.setattr(bench_attention, "MASKS", ("row", "column"))
    monkeypatch.setattr(bench_attention, "mix_counts", lambda layers: {"row": 3, "column": 1})
    case = bench_attention.run_case("t", 3, 4, 1, 1, 16, torch.float32, "cpu", ["triton", "sdpa_mask", "broken"],
                                    1, 4, 1.0, graphs=True)
    row = case["masks"]["row"]["providers"]
    assert row["sdpa_mask"]["graph_fwd_bwd_ms"] == 6.0 and row["sdpa_mask"]["host_fwd_bwd_us"] == 42.0
    assert row["sdpa_mask"]["graph_bwd_ms"] == 4.0  # the difference of the two captured graphs
    assert "graph_error" in row["broken"] and row["broken"]["fwd_ms"] > 0
    mix = case["mix"]["providers"]["sdpa_mask"]
    assert mix["graph_fwd_ms"] == 2.0 and "graph_pct_floor" in mix
    assert case["mix"]["triton_speedup"]["sdpa_mask"]["graph_fwd_bwd"] == 2.0
    report = {"cases": [case]}
    table = "\n".join(bench_attention.graph_table(report))
    assert "| t | mix | sdpa_mask | 2.000 | 4.000 | 6.000 |" in table and "| 42 | 2.00 |" in table
    assert "error: RuntimeError: capture failed" in table


def test_ncu_probe_runs_one_step_and_parses_tiles():
    """benchmarks/attn_ncu_probe.py (run under ncu on a GPU) on the interpreter: it runs forward+backward and says
    so."""
    import attn_ncu_probe

    assert attn_ncu_probe.parse_config("32x64:8:2") == attn_ncu_probe.tb.Config(32, 64, 8, 2)
    with pytest.raises(Exception, match="BMxBN:WARPS:STAGES"):
        attn_ncu_probe.parse_config("64x64")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "attn_ncu_probe.py"), "--kind", "conv"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'mask': 'conv_T3_W4" in proc.stdout and "'finite': True" in proc.stdout


def test_check_catches_a_wrong_provider():
    """The pre-timing check fails a provider whose output or gradients are off (here: attention with another mask)."""
    import torch

    from dalle_ds.ops.attention import MaskSpec

    spec = MaskSpec("row", 3, 4)
    q, k, v, dout = (torch.randn(1, 2, 19, 16) for _ in range(4))
    ref = bench_attention.reference(spec, q, k, v, dout)
    good = bench_attention.check(bench_attention.make_provider("sdpa_mask", spec, "cpu"), q, k, v, dout, ref)
    bad = bench_attention.check(bench_attention.make_provider("sdpa_causal", spec, "cpu"), q, k, v, dout, ref)
    assert good["ok"] and max(good["max_rel_err"].values()) < 1e-5
    assert not bad["ok"] and bad["max_rel_err"]["out"] > bad["tol"]
    report = {"cases": [{"name": "tiny", "masks": {"row": {"providers": {"x": {"check": bad}, "y": {"check": good}}}},
                         "mix": {"providers": {}}}]}
    assert bench_attention.failed_checks(report) == ["tiny row x"]
    assert "**FAIL**" in bench_attention.check_cell({"check": bad})


def test_charts_show_every_provider_per_mask(quick_report, tmp_path):
    """--out writes a bar chart per case (a bar per provider and mask, the mix included); --plot redraws it from
    the JSON alone."""
    report, _, _ = quick_report
    svg = bench_attention.charts(report)["tiny"]
    case = report["cases"][0]
    groups = [*case["masks"], "mix"]
    bars = sum(1 for e in [*case["masks"].values(), case["mix"]] for r in e["providers"].values()
               if r.get("fwd_bwd_ms") is not None)
    assert svg.count('<rect x=') - len(case["mix"]["providers"]) == bars  # minus the legend's swatches
    assert all(f">{g}</text>" in svg for g in groups) and "forward+backward" in svg
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    assert bench_attention.main(["--plot", str(path)]) == {"charts": [str(tmp_path / "run.tiny.svg")]}
    assert (tmp_path / "run.tiny.svg").read_text() == svg
