"""benchmarks/precision_compare.py: the run commands differ only in the resblock precision, and the report's numbers
come from the run folders (synthetic metrics here; the real runs are in benchmarks/results/precision_*)."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import precision_compare as pc  # noqa: E402


def _write_run(run: Path, val_loss: float, losses: list[float], scales=None, skipped=None):
    run.mkdir(parents=True)
    hist = []
    for i, loss in enumerate(losses):
        h = {"step": 5 * (i + 1), "loss": loss, "image_loss": loss * 0.9}
        if scales is not None:
            h.update({f"grad_scale_log2/{k:03d}_{'attn' if k % 2 == 0 else 'mlp'}": v for k, v in enumerate(scales)})
            h["grad_scale_skipped_total"] = skipped
            h["grad_scale_skip_mismatch"] = 0.0
        hist.append(h)
    metrics = {"steps": 5 * len(losses), "world_size": 2, "train_seconds": 12.34, "history": hist,
               "eval": {"val_loss": val_loss, "val_image_loss": val_loss * 0.9, "val_text_loss": val_loss * 2}}
    (run / "dalle_metrics.json").write_text(json.dumps(metrics))
    cfg = {"model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "image_grid": 4}, "seed": 7}
    (run / "dalle_run_config.json").write_text(json.dumps(cfg))


def test_commands_differ_only_in_precision(tmp_path):
    args = pc.argparse.Namespace(gpus=2, port=29999, ds_config="ds_configs/cpu_dalle.json", steps=10, seed=3,
                                 log_every=5, tokens=tmp_path, val_batches=4, set=["model.d_model=64"],
                                 ds_set=["optimizer.params.lr=1e-3"])
    cmds = {p: pc.run_command(p, args, tmp_path / "out") for p in pc.PRECISIONS}
    precision_items = {item for items in pc.PRECISIONS.values() for item in items}

    def common(cmd):  # the command without its --out folder and without the precision's own --set items
        rest, i = [], 0
        while i < len(cmd):
            if cmd[i] in ("--set", "--out") and (cmd[i] == "--out" or cmd[i + 1] in precision_items):
                i += 2
                continue
            rest.append(cmd[i])
            i += 1
        return rest

    assert common(cmds["fp16"]) == common(cmds["bf16"]) == common(cmds["fp32"])
    assert "model.resblock_grad_scaling=true" in cmds["fp16"] and "model.resblock_dtype=float16" in cmds["fp16"]
    assert "model.resblock_dtype=bfloat16" in cmds["bf16"] and cmds["fp32"][-1] == str(tmp_path / "out" / "fp32")
    assert "model.d_model=64" in cmds["bf16"] and "optimizer.params.lr=1e-3" in cmds["fp32"]


def test_report_numbers_come_from_the_runs(tmp_path):
    _write_run(tmp_path / "fp32", 2.0, [4.0, 3.0, 2.5])
    _write_run(tmp_path / "bf16", 2.02, [4.0, 3.1, float("nan")])
    _write_run(tmp_path / "fp16", 1.99, [4.0, 3.0, 2.4], scales=[14.0, 13.5, 14.2, 12.0], skipped=3.0)
    results = {p: pc.summarize(tmp_path / p) for p in ("fp16", "bf16", "fp32")}
    cfg = json.loads((tmp_path / "fp16" / "dalle_run_config.json").read_text())
    out, md, svg = pc.report(results, cfg, "cmd", "CPU", "precision_x.svg")
    assert out["reference"] == "fp32"
    assert out["val_loss_gap"]["bf16"] == pytest.approx(0.01) and out["val_loss_gap"]["fp16"] == pytest.approx(-0.005)
    assert results["bf16"]["nonfinite_losses"] == 1 and math.isnan(results["bf16"]["train_loss_last5"])
    sc = results["fp16"]["scaler"]
    assert (sc["blocks"], sc["final_log2_min"], sc["final_log2_max"], sc["skipped_updates"]) == (4, 12.0, 14.2, 3.0)
    assert "| validation-loss gap vs fp32 | -0.50% | +1.00% | +0.00% |" in md
    assert "| updates skipped for nonfinite gradients | 3 | - | - |" in md
    assert "| final block scales, log2 min / max | 12.00 / 14.20 | - | - |" in md
    assert svg.count("<polyline") == 3 and "precision_x.svg" in md


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        pc.main([str(tmp_path), str(tmp_path / "out"), "--precisions", "fp8"])
    with pytest.raises(SystemExit):  # no token shards there
        pc.main([str(tmp_path), str(tmp_path / "out")])
