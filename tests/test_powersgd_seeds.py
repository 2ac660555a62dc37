"""benchmarks/powersgd_seeds.py pools PowerSGD-vs-stock result files into a mean gap with a t interval, and refuses
files that do not describe the same experiment."""
import math

import pytest

from launch_utils import ROOT, load_script

seeds = load_script("benchmarks/powersgd_seeds.py", "powersgd_seeds")


def _result(run_seed, q_seed, stock, psgd, **psgd_cfg):
    cfg = {"rank": 30, "local_size": 2, "warm_start": True, "seed": q_seed, **psgd_cfg}
    return {"model": {"d_model": 128, "n_layers": 4}, "run_seed": run_seed, "global_batch": 64,
            "optimizer": {"type": "AdamW", "params": {"lr": 2e-3}}, "powersgd_config": cfg,
            "stock": {"steps": 750, "val_loss": stock}, "powersgd": {"steps": 750, "val_loss": psgd}}


def test_pool_means_interval_and_refusals():
    files = [_result(1, 0, 0.20, 0.21), _result(1, 1, 0.20, 0.202), _result(2, 0, 0.25, 0.26)]
    out = seeds.pool(files)
    gaps = [0.05, 0.01, 0.04]
    mean = sum(gaps) / 3
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / 2)
    assert out["n"] == 3 and out["stock_runs"] == 2
    assert out["paired_mean_gap"] == pytest.approx(mean) and out["paired_sd"] == pytest.approx(sd)
    assert out["ci95"] == pytest.approx([mean - 4.303 * sd / math.sqrt(3), mean + 4.303 * sd / math.sqrt(3)])
    assert out["pooled_gap"] == pytest.approx((0.21 + 0.202 + 0.26) / 3 / 0.225 - 1)
    assert out["stock_spread"] == pytest.approx(0.25 / 0.20 - 1)
    per_seed = [0.03, 0.04]  # run seed 1: mean of +5% and +1%; run seed 2: +4%
    assert out["by_run_seed"]["mean"] == pytest.approx(0.035)
    assert out["by_run_seed"]["se"] == pytest.approx(abs(per_seed[1] - per_seed[0]) / math.sqrt(2) / math.sqrt(2))
    assert out["by_run_seed"]["ci95"][1] == pytest.approx(0.035 + 12.706 * out["by_run_seed"]["se"])
    assert "interval contains +2%" in seeds.markdown({**out, "date": "d"}, ["a", "b", "c"])

    with pytest.raises(SystemExit, match="warm_start"):
        seeds.pool([files[0], _result(3, 0, 0.2, 0.2, warm_start=False)])
    with pytest.raises(SystemExit, match="two different stock runs"):
        seeds.pool([files[0], _result(1, 5, 0.3, 0.3)])
    with pytest.raises(SystemExit, match="appears twice"):
        seeds.pool([files[0], files[0]])
    old = dict(files[0])
    del old["run_seed"]
    with pytest.raises(SystemExit, match="regenerate"):
        seeds.pool([old, files[1]])
    assert seeds.t975(4) == 2.776 and seeds.t975(11) == 2.228 and seeds.t975(100) == 1.96


def test_gap_curves_follow_the_windows():
    w = {"stock": [{"steps": "1-75", "image_loss": 1.0}, {"steps": "76-150", "image_loss": 0.5}],
         "powersgd": [{"steps": "1-75", "image_loss": 1.1}, {"steps": "76-150", "image_loss": 0.51}]}
    steps, curves = seeds.gap_curves([{**_result(1, 0, 0.2, 0.21), "windows": w}])
    assert steps == [75, 150] and list(curves) == ["s1 q0"]
    assert curves["s1 q0"] == pytest.approx([10.0, 2.0])
    assert seeds.gap_curves([_result(1, 0, 0.2, 0.21)]) == ([], {})  # an old file without windows: no plot


def test_report_refuses_pairs_that_differ_in_more_than_powersgd(tmp_path):
    import json
    report = load_script("benchmarks/powersgd_report.py", "powersgd_report")

    def run(name, batch, rank, out):
        d = tmp_path / name
        d.mkdir()
        (d / "dalle_run_config.json").write_text(json.dumps({"seed": 1, "steps": 10, "powersgd": {"rank": rank}}))
        (d / "dalle_ds_config.json").write_text(json.dumps({
            "train_batch_size": batch, "csv_monitor": {"output_path": out},
            "zero_optimization": {"stage": 2, **({"reduce_scatter": False} if rank else {})}}))
        return d

    stock, psgd = run("stock", 64, 0, "a/"), run("psgd", 64, 30, "b/")
    report.check_same_run(stock, psgd)  # PowerSGD settings, monitor paths and reduce_scatter may differ
    with pytest.raises(SystemExit, match="train_batch_size"):
        report.check_same_run(stock, run("psgd256", 256, 30, "c/"))


def test_report_counts_the_uncompressed_start_and_weights_bytes_by_window(tmp_path):
    import json
    report = load_script("benchmarks/powersgd_report.py", "powersgd_report")
    hist = [{"step": 10, "loss": 1.0, "powersgd/bytes_sent": 100.0, "powersgd/compression_rate": 0.8},
            {"step": 30, "loss": 1.0, "powersgd/bytes_sent": 40.0, "powersgd/compression_rate": 0.8}]
    ev = {"val_loss": 1.0, "val_image_loss": 1.0, "val_text_loss": 1.0, "val_ema_loss": 1.0}
    (tmp_path / "dalle_metrics.json").write_text(json.dumps(
        {"steps": 40, "world_size": 4, "train_seconds": 1.0, "history": hist, "eval": ev}))
    s = report._summary(tmp_path)
    assert s["bytes_sent_run_mean"] == pytest.approx((100 * 10 + 40 * 20) / 30)  # windows of 10 and 20 steps
    assert report.run_compression(s, {"start_step": 10}) == pytest.approx(0.8 * 30 / 40)
    assert report.run_compression(s, {}) == pytest.approx(0.8)


def test_the_usage_example_pools_the_committed_files():
    """The module docstring's command (the README's too) names one experiment's files: its glob, expanded as the
    shell would from the repository root, pools to the README's mean gap (+4.73% over 7 runs). A glob that also took
    the _fp32err ablation was refused as two experiments."""
    import json
    import re
    import shlex

    line = next(l for l in seeds.__doc__.splitlines() if "powersgd_seeds.py" in l)
    pattern = next(w for w in shlex.split(line.rstrip("\\"), comments=True) if w.endswith(".json"))
    files = sorted(ROOT.glob(pattern))
    assert len(files) == 7, [f.name for f in files]
    out = seeds.pool([json.loads(f.read_text()) for f in files])
    assert out["n"] == 7 and round(100 * out["paired_mean_gap"], 2) == 4.73
    readme = (ROOT / "README.md").read_text()
    assert re.search(re.escape(f"python benchmarks/powersgd_seeds.py {pattern} "), readme), pattern
