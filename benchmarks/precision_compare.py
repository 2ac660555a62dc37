"""Issue 7's fp16 check: the same prior trained with fp16 resblocks under per-resblock gradient scaling, with bf16
resblocks and with fp32 resblocks; their loss curves side by side.

    python benchmarks/precision_compare.py TOKENS_DIR OUT_DIR [--steps 300] [--gpus 2] [--precisions fp16,bf16,fp32]
        [--set KEY=VALUE ...] [--ds_set KEY=VALUE ...] [--tag cpu_20261205] [--port 29560]

Each run is ``deepspeed --num_gpus N launch/train_dalle.py --preset demo`` on the token shards (TOKENS_DIR/train,
TOKENS_DIR/test_id for validation) with the same seed, data order, model, batch and optimizer; only the resblock
precision differs:

* ``fp16``: ``model.resblock_dtype=float16`` + ``model.resblock_grad_scaling=true`` (the paper's scheme, §2.4 and App. D);
* ``bf16``: ``model.resblock_dtype=bfloat16``;
* ``fp32``: ``model.resblock_dtype=float32`` (the reference the gaps are measured against).

DeepSpeed stays in its fp32 mode in all three (fp32 parameters, gradients and Adam moments; the model computes the
resblock branches in the chosen dtype), so the comparison isolates the resblock arithmetic. A run folder that already
holds its metrics is reused, so an interrupted comparison resumes. Writes benchmarks/results/precision_<tag>.{md,json}
and the loss curves as .svg. On CPU (no CUDA device) the ranks run on gloo with ``DS_ACCELERATOR=cpu``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from dalle_ds.utils.svg_plot import line_chart  # noqa: E402
from timing import comma_list  # noqa: E402  (benchmarks/timing.py, beside this script)

PRECISIONS = {
    "fp16": ["model.resblock_dtype=float16", "model.resblock_grad_scaling=true"],
    "bf16": ["model.resblock_dtype=bfloat16"],
    "fp32": ["model.resblock_dtype=float32"],
}
REFERENCE_ORDER = ("fp32", "bf16", "fp16")  # the first one present is the reference


def run_command(precision: str, args, out: Path) -> list[str]:
    cmd = ["deepspeed", "--num_gpus", str(args.gpus), "--master_port", str(args.port), "launch/train_dalle.py",
           "--deepspeed_config", args.ds_config, "--preset", "demo",
           "--set", f"steps={args.steps}", "--set", "eval_every=0", "--set", f"seed={args.seed}",
           "--set", f"log_every={args.log_every}",
           "--set", f"data.train_tokens={args.tokens / 'train'}", "--set", f"data.val_tokens={args.tokens / 'test_id'}",
           "--set", f"data.val_batches={args.val_batches}"]
    for item in PRECISIONS[precision] + list(args.set):
        cmd += ["--set", item]
    for item in args.ds_set:
        cmd += ["--ds_set", item]
    return cmd + ["--out", str(out / precision)]


def train(precision: str, args) -> None:
    run = args.out / precision
    if (run / "dalle_metrics.json").is_file():
        print(f"# {precision}: reusing {run}", file=sys.stderr)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = run_command(precision, args, args.out)
    print("# " + shlex.join(cmd), file=sys.stderr)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    (run / "wall_seconds.txt").write_text(f"{time.time() - t0:.0f}\n")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
def summarize(run: Path) -> dict:
    """Validation losses, the train-loss curve and, for fp16, the scaler's record from one run folder."""
    m = json.loads((run / "dalle_metrics.json").read_text())
    hist = m["history"]
    tail = hist[-5:]
    last = hist[-1]
    out = {"steps": m["steps"], "world_size": m["world_size"], "train_seconds": round(m["train_seconds"], 1),
           "val_loss": m["eval"]["val_loss"], "val_image_loss": m["eval"]["val_image_loss"],
           "val_text_loss": m["eval"]["val_text_loss"],
           "train_loss_last5": sum(h["loss"] for h in tail) / len(tail),
           "nonfinite_losses": sum(1 for h in hist if not math.isfinite(h["loss"])),
           "curve": {"step": [h["step"] for h in hist], "loss": [h["loss"] for h in hist],
                     "image_loss": [h["image_loss"] for h in hist]}}
    scales = [v for k, v in last.items() if k.startswith("grad_scale_log2/")]
    if scales:
        out["scaler"] = {"blocks": len(scales), "final_log2_min": min(scales), "final_log2_max": max(scales),
                         "skipped_updates": last.get("grad_scale_skipped_total"),
                         "skip_mismatches": sum(h.get("grad_scale_skip_mismatch", 0) for h in hist)}
    return out


def report(results: dict[str, dict], cfg: dict, command: str, device: str, svg_file: str) -> tuple[dict, str, str]:
    ref_name = next(p for p in REFERENCE_ORDER if p in results)
    ref = results[ref_name]
    gaps = {p: r["val_loss"] / ref["val_loss"] - 1 for p, r in results.items()}
    model = cfg["model"]
    out = {"date": datetime.date.today().isoformat(), "device": device, "command": command, "model": model,
           "seed": cfg.get("seed"), "reference": ref_name, "val_loss_gap": gaps, "runs": results}
    cols = list(results)
    md = [f"# Resblock precision: {', '.join(cols)} on the shapes prior ({out['date']})", "",
          f"Device: {device}. Command: `{command}`.", "",
          f"Model: d_model {model['d_model']}, {model['n_layers']} layers, {model['n_heads']} heads, grid "
          f"{model['image_grid']}x{model['image_grid']}; {ref['steps']} steps on {ref['world_size']} rank(s), run seed "
          f"{cfg.get('seed')} in every run. DeepSpeed in fp32 mode in all runs (fp32 master weights, gradients, Adam); "
          "only the resblock branches' arithmetic differs (fp16 with per-resblock gradient scaling, bf16, fp32).", "",
          "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    rows = [("validation loss", "val_loss", "{:.4f}"), ("validation image loss", "val_image_loss", "{:.4f}"),
            ("validation text loss", "val_text_loss", "{:.4f}"), ("train loss, mean of last 5 logged",
                                                                   "train_loss_last5", "{:.4f}"),
            ("nonfinite logged losses", "nonfinite_losses", "{}"), ("training seconds", "train_seconds", "{}")]
    for label, key, fmt in rows:
        md.append(f"| {label} | " + " | ".join(fmt.format(results[p][key]) for p in cols) + " |")
    md.append(f"| validation-loss gap vs {ref_name} | " + " | ".join(f"{100 * gaps[p]:+.2f}%" for p in cols) + " |")
    scaler_rows = (  # "-": the run has no scaler (bf16, fp32)
        ("updates skipped for nonfinite gradients",
         lambda sc: "n/a" if sc["skipped_updates"] is None else f"{sc['skipped_updates']:.0f}"),
        ("final block scales, log2 min / max", lambda sc: f"{sc['final_log2_min']:.2f} / {sc['final_log2_max']:.2f}"),
        ("skip decisions that DeepSpeed disagreed with", lambda sc: f"{sc['skip_mismatches']:.0f}"))
    for label, cell in scaler_rows:
        md.append(f"| {label} | " + " | ".join("-" if results[p].get("scaler") is None else cell(results[p]["scaler"])
                                                for p in cols) + " |")
    steps = ref["curve"]["step"]
    series = {p: [_at(results[p]["curve"], s) for s in steps] for p in cols}
    svg = line_chart(steps, series, f"train loss: {', '.join(cols)} resblocks", "train loss")
    md += ["", f"Along the run: `{svg_file}` (the train loss at every logged step, each precision).", ""]
    return out, "\n".join(md) + "\n", svg


def _at(curve: dict, step: int) -> float:
    try:
        return curve["loss"][curve["step"].index(step)]
    except ValueError:
        return float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokens", type=Path, help="token shards: TOKENS/train and TOKENS/test_id (make demo writes them)")
    ap.add_argument("out", type=Path, help="run folders go to OUT/<precision>")
    ap.add_argument("--precisions", type=comma_list(PRECISIONS), default="fp16,bf16,fp32")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gpus", type=int, default=2, help="ranks (GPUs, or CPU processes without CUDA)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--ds-config", dest="ds_config", default="ds_configs/cpu_dalle.json")
    ap.add_argument("--set", action="append", default=[], help="run-config override for every run (repeatable)")
    ap.add_argument("--ds_set", action="append", default=[], help="DeepSpeed-config override (repeatable)")
    ap.add_argument("--port", type=int, default=29560)
    ap.add_argument("--tag", default=None, help="result name: benchmarks/results/precision_<tag>.*")
    ap.add_argument("--report-only", action="store_true", help="write the report from existing runs, train nothing")
    args = ap.parse_args(argv)
    if not (args.tokens / "train" / "meta.json").is_file():
        ap.error(f"no token shards in {args.tokens / 'train'} (make demo writes them; or pass another folder)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    precisions = args.precisions
    if not args.report_only:
        for p in precisions:
            train(p, args)
    missing = [p for p in precisions if not (args.out / p / "dalle_metrics.json").is_file()]
    if missing:
        raise SystemExit(f"precision_compare: no finished run for {missing} in {args.out}")
    results = {p: summarize(args.out / p) for p in precisions}
    cfg = json.loads((args.out / precisions[0] / "dalle_run_config.json").read_text())
    ranks = results[precisions[0]]["world_size"]
    if _has_cuda():
        import torch

        name = torch.cuda.get_device_name()
        device, short = f"{name} x {ranks}", name.split()[-1].lower()
    else:
        device, short = f"CPU ({platform.machine()}), gloo, {ranks} ranks", "cpu"
    command = "python " + shlex.join(["benchmarks/precision_compare.py", *(argv if argv is not None else sys.argv[1:])])
    dest = ROOT / "benchmarks" / "results" / f"precision_{args.tag or f'{short}_{datetime.date.today():%Y%m%d}'}"
    out, md, svg = report(results, cfg, command, device, dest.name + ".svg")
    dest.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    dest.with_suffix(".md").write_text(md)
    dest.with_suffix(".svg").write_text(svg)
    print(md)
    return out


if __name__ == "__main__":
    main()
