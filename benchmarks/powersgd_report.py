"""Compare a stock and a PowerSGD prior run (benchmarks/powersgd_shapes.sh) and write the result files.

    python benchmarks/powersgd_report.py RUNS_DIR --tag cpu_20261123 [--command "..."]

Reads RUNS_DIR/{stock,powersgd}/dalle_metrics.json and writes benchmarks/results/powersgd_shapes_<tag>.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dalle_ds.utils.dicts import flatten  # noqa: E402


def _summary(run: Path) -> dict:
    m = json.loads((run / "dalle_metrics.json").read_text())
    hist = m["history"]
    last = hist[-1]
    tail = hist[-5:]
    wall = run / "wall_seconds.txt"
    out = {"steps": m["steps"], "world_size": m["world_size"], "train_seconds": round(m["train_seconds"], 1),
           "wall_seconds": int(wall.read_text()) if wall.is_file() else None,
           "train_loss_last5": sum(h["loss"] for h in tail) / len(tail),
           "val_loss": m["eval"]["val_loss"], "val_image_loss": m["eval"]["val_image_loss"],
           "val_text_loss": m["eval"]["val_text_loss"], "val_ema_loss": m["eval"]["val_ema_loss"]}
    for k, v in last.items():
        if k.startswith("powersgd/"):
            out[k.split("/", 1)[1]] = v
    if any("powersgd/zeroed_buffers" in h for h in hist):  # logged per window: the run's total
        out["zeroed_buffers"] = sum(h.get("powersgd/zeroed_buffers", 0) for h in hist)
    if any("powersgd/bytes_sent" in h for h in hist):  # per-step means since the previous log: weight by the window
        prev, sent, steps = 0, 0.0, 0
        for h in hist:
            if "powersgd/bytes_sent" in h:
                sent += h["powersgd/bytes_sent"] * (h["step"] - prev)
                steps += h["step"] - prev
            prev = h["step"]
        out["bytes_sent_run_mean"] = sent / steps
    return out


def run_compression(psgd: dict, powersgd_cfg: dict) -> float:
    """The compression rate over the whole run: steps before ``start_step`` are reduced uncompressed (rate 0)."""
    steps, start = psgd["steps"], min(int(powersgd_cfg.get("start_step", 0)), psgd["steps"])
    return psgd.get("compression_rate", 0.0) * (steps - start) / steps


# Keys allowed to differ: the PowerSGD settings, where each run writes its monitor files, and the reduce-scatter
# switch the PowerSGD extension turns off (dalle_ds/dist/deepspeed_powersgd.py).
ALLOWED_DIFFERENCES = ("run.powersgd.", "ds.tensorboard.output_path", "ds.csv_monitor.output_path",
                       "ds.zero_optimization.reduce_scatter")


def check_same_run(stock_run: Path, psgd_run: Path) -> None:
    """The two runs must differ only in their PowerSGD settings (a stock run reused through PSGD_STOCK_RUN must have
    the same tokens, steps, seed, model, batch and optimizer): compares their run and DeepSpeed configs."""
    def configs(run: Path) -> dict:
        return flatten({"run": json.loads((run / "dalle_run_config.json").read_text()),
                        "ds": json.loads((run / "dalle_ds_config.json").read_text())})
    a, b = configs(stock_run), configs(psgd_run)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(ALLOWED_DIFFERENCES))
    if diff:
        raise SystemExit("powersgd_report: the stock and PowerSGD runs differ in more than PowerSGD: "
                         + ", ".join(f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in diff))


WINDOW_KEYS = ("loss", "image_loss", "text_loss", "grad_norm", "grad_clipped", "powersgd/delayed_norm",
               "powersgd/spread_norm", "powersgd/spread_recentered", "powersgd/sent_fraction",
               "powersgd/rounding_ratio", "powersgd/swamped_fraction")


def windows(run: Path, width: int) -> list[dict]:
    """Means of the logged values over consecutive windows of ``width`` steps."""
    hist = json.loads((run / "dalle_metrics.json").read_text())["history"]
    out: dict[int, dict[str, list[float]]] = {}
    for h in hist:
        w = out.setdefault((h["step"] - 1) // width, {})
        for k in WINDOW_KEYS:
            if k in h:
                w.setdefault(k, []).append(h[k])
    return [{"steps": f"{i * width + 1}-{(i + 1) * width}", **{k: sum(v) / len(v) for k, v in w.items()}}
            for i, w in sorted(out.items())]


def window_table(stock: list[dict], psgd: list[dict]) -> list[str]:
    cols = [("train-loss gap", None), ("image-loss gap", None), ("grad norm stock / PowerSGD", "grad_norm"),
            ("clipped stock / PowerSGD", "grad_clipped"), ("delayed norm", "powersgd/delayed_norm"),
            ("spread norm", "powersgd/spread_norm"), ("spread re-centered", "powersgd/spread_recentered"),
            ("sent fraction", "powersgd/sent_fraction"),
            ("rounding ratio", "powersgd/rounding_ratio"), ("swamped", "powersgd/swamped_fraction")]
    md = ["| steps | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for a, b in zip(stock, psgd):
        cells = [f"{100 * (b['loss'] / a['loss'] - 1):+.1f}%", f"{100 * (b['image_loss'] / a['image_loss'] - 1):+.1f}%"]
        for _, key in cols[2:4]:
            cells.append(f"{a[key]:.3g} / {b[key]:.3g}" if key in a and key in b else "-")
        cells += [f"{b[key]:.3g}" if key in b else "-" for _, key in cols[4:]]
        md.append(f"| {a['steps']} | " + " | ".join(cells) + " |")
    return md


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--command", default="benchmarks/powersgd_shapes.sh")
    ap.add_argument("--window", type=int, default=75, help="steps per row of the along-the-run table")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    stock, psgd = _summary(args.runs / "stock"), _summary(args.runs / "powersgd")
    cfg = json.loads((args.runs / "powersgd" / "dalle_run_config.json").read_text())
    check_same_run(args.runs / "stock", args.runs / "powersgd")
    along = {"stock": windows(args.runs / "stock", args.window), "powersgd": windows(args.runs / "powersgd", args.window)}
    ds = json.loads((args.runs / "powersgd" / "dalle_ds_config.json").read_text())
    gap = psgd["val_loss"] / stock["val_loss"] - 1
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU ({platform.machine()}), gloo, 4 ranks as "
              "2 machines x 2 GPUs", "command": args.command, "powersgd_config": cfg["powersgd"],
              "model": cfg["model"], "run_seed": cfg.get("seed"), "global_batch": ds.get("train_batch_size"),
              "optimizer": ds.get("optimizer"), "stock": stock, "powersgd": psgd, "val_loss_gap": gap,
              "within_2_percent": abs(gap) <= 0.02, "run_compression_rate": run_compression(psgd, cfg["powersgd"]),
              "windows": along}
    out = ROOT / "benchmarks" / "results" / f"powersgd_shapes_{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [("validation loss (live weights)", "val_loss", "{:.4f}"), ("validation image loss", "val_image_loss",
            "{:.4f}"), ("validation text loss", "val_text_loss", "{:.4f}"), ("validation loss (EMA)", "val_ema_loss",
            "{:.4f}"), ("train loss, mean of last 5 logged", "train_loss_last5", "{:.4f}"),
            ("training seconds", "train_seconds", "{}")]
    md = [f"# PowerSGD vs the stock all-reduce on the shapes prior ({result['date']})", "",
          f"Device: {result['device']}. Command: `{args.command}`.", "",
          f"Model: d_model {cfg['model']['d_model']}, {cfg['model']['n_layers']} layers; {stock['steps']} steps; "
          f"run seed {cfg.get('seed')} (both runs), Q seed {cfg['powersgd'].get('seed')}; "
          f"PowerSGD rank {cfg['powersgd']['rank']} per machine ({cfg['powersgd']['rank'] // 2} per GPU), "
          f"compression rate {psgd.get('compression_rate', float('nan')):.4f} of the resblock matrices; Q "
          f"{'warm-started from the last Q (not the paper)' if cfg['powersgd'].get('warm_start') else 'fixed (paper)'}"
          + (f"; the first {cfg['powersgd']['start_step']} steps reduced uncompressed (fp32), so "
             f"{result['run_compression_rate']:.4f} over the whole run"
             if cfg["powersgd"].get("start_step") else "") + "; "
          f"error buffers in {cfg['powersgd'].get('error_dtype', 'fp169')}"
          + (f", re-centered over machines every {cfg['powersgd']['recenter_every']} steps (not the paper)"
             if cfg["powersgd"].get("recenter_every") else "") + ".",
          "",
          "| | stock fp32 all-reduce | hierarchical PowerSGD |", "|---|---|---|"]
    for label, key, fmt in rows:
        md.append(f"| {label} | {fmt.format(stock[key])} | {fmt.format(psgd[key])} |")
    md.append(f"| bytes sent per rank per step (intra + inter + fp32 rest), last window | "
              f"{psgd.get('bytes_baseline_fp32', 0):.0f} (fp32 ring) | {psgd.get('bytes_sent', 0):.0f} |")
    if "bytes_sent_run_mean" in psgd:
        md.append(f"| the same, mean over the run | {psgd.get('bytes_baseline_fp32', 0):.0f} | "
                  f"{psgd['bytes_sent_run_mean']:.0f} |")
    md.append(f"| of which across machines (P, Q' in 1-6-9) | - | {psgd.get('bytes_inter_machine', 0):.0f} |")
    if "zeroed_buffers" in psgd:
        md.append(f"| error buffers zeroed for overflow (rank 0, whole run) | - | {psgd['zeroed_buffers']:.0f} |")
    md += ["", f"Validation-loss gap: {100 * gap:+.2f}% ({'within' if abs(gap) <= 0.02 else 'outside'} the 2% "
           "target). Times on a 2-core CPU with 4 ranks are not throughput numbers.", "",
           f"Along the run, means over {args.window}-step windows of the logged steps (gaps: PowerSGD over stock; the "
           "norms are of the averaged gradient, before clipping; delayed norm: of the error buffers summed over "
           "machines, the gradient not yet applied; spread norm: their machine-specific part, which is never sent; "
           "spread re-centered: the machine-specific part the latest re-centering removed; "
           "sent fraction: the share of the delayed gradient's squared norm one step sends; rounding ratio: norm of "
           "the buffer updates' rounding over the norm of the gradients added; swamped: share of gradient elements "
           "whose add left the buffer unchanged):", "",
           *window_table(along["stock"], along["powersgd"])]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
