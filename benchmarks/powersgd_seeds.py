"""Pool several PowerSGD-vs-stock comparisons (result files of benchmarks/powersgd_shapes.sh) into one gap with an
error bar: a single pair of runs is not enough when runs that differ only in a seed land several percent apart.

    python benchmarks/powersgd_seeds.py benchmarks/results/powersgd_shapes_cpu_20261205_r30_warm_750steps_s*[0-9].json \
        --tag cpu_20261205_r30_warm_750steps     # [0-9]: the seven runs, not the _fp32err ablation

The files must describe the same experiment (model, steps, PowerSGD rank, Q mode, error-buffer dtype); they may
differ in the run seed (initialization and data order, shared by the pair) and the Q seed. Reported:

* the gap of each file (PowerSGD over its own stock run, same run seed);
* the pooled gap: mean over PowerSGD runs / mean over the distinct stock runs - 1;
* the paired gaps' mean and its standard error (sample standard deviation / sqrt(n)), and a 95% interval from
  Student's t; with the spread of the stock runs over run seeds for scale.

Writes benchmarks/results/powersgd_seeds_<tag>.{md,json} and, from the files' along-the-run windows, an SVG of each
pair's train image-loss gap against the step (the 2% target drawn as a dotted line).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dalle_ds.utils.svg_plot import line_chart  # noqa: E402

# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df)); beyond 30, 1.96.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    known = [k for k in T975 if k <= df]
    return T975[max(known)] if df <= 30 else 1.96


def _experiment(r: dict) -> dict:
    """What must be equal across the pooled files."""
    p = r["powersgd_config"]
    for key in ("run_seed", "global_batch", "optimizer"):
        if key not in r:
            raise SystemExit(f"powersgd_seeds: a result file lacks {key!r}: regenerate it with "
                             "benchmarks/powersgd_report.py from its run folder")
    return {"model": r["model"], "steps": r["stock"]["steps"], "rank": p["rank"], "local_size": p["local_size"],
            "warm_start": p.get("warm_start", False), "error_dtype": p.get("error_dtype", "fp169"),
            "start_step": p.get("start_step", 0), "recenter_every": p.get("recenter_every", 0),
            "global_batch": r["global_batch"], "optimizer": r["optimizer"]}


def pool(results: list[dict]) -> dict:
    if len(results) < 2:
        raise SystemExit("powersgd_seeds: pool at least two result files")
    first = _experiment(results[0])
    for r in results[1:]:
        e = _experiment(r)
        diff = [k for k in first if first[k] != e[k]]
        if diff:
            raise SystemExit(f"powersgd_seeds: the files describe different experiments ({', '.join(diff)} differ)")
    rows, stock_by_seed = [], {}
    for r in results:
        run_seed, q_seed = r["run_seed"], r["powersgd_config"].get("seed", 0)
        stock, psgd = r["stock"]["val_loss"], r["powersgd"]["val_loss"]
        if run_seed in stock_by_seed and abs(stock_by_seed[run_seed] - stock) > 1e-9:
            raise SystemExit(f"powersgd_seeds: two different stock runs for run seed {run_seed}")
        stock_by_seed[run_seed] = stock
        rows.append({"run_seed": run_seed, "q_seed": q_seed, "stock": stock, "powersgd": psgd, "gap": psgd / stock - 1})
    if len({(r["run_seed"], r["q_seed"]) for r in rows}) != len(rows):
        raise SystemExit("powersgd_seeds: the same (run seed, Q seed) pair appears twice")
    gaps = [r["gap"] for r in rows]
    n = len(gaps)
    mean, sd = statistics.fmean(gaps), statistics.stdev(gaps)
    se = sd / math.sqrt(n)
    stocks = list(stock_by_seed.values())
    by_seed = [statistics.fmean(r["gap"] for r in rows if r["run_seed"] == k) for k in stock_by_seed]
    seed_level = None
    if len(by_seed) > 1:  # runs that share a run seed share their stock run: one mean gap per run seed
        m, se_s = statistics.fmean(by_seed), statistics.stdev(by_seed) / math.sqrt(len(by_seed))
        seed_level = {"n": len(by_seed), "mean": m, "se": se_s,
                      "ci95": [m - t975(len(by_seed) - 1) * se_s, m + t975(len(by_seed) - 1) * se_s]}
    # powersgd_report.run_compression wrote it; files from before it (no uncompressed start) have the per-step rate
    rate = results[0].get("run_compression_rate", results[0]["powersgd"].get("compression_rate", float("nan")))
    return {"experiment": first, "runs": rows, "n": n, "by_run_seed": seed_level, "run_compression_rate": rate,
            "pooled_gap": statistics.fmean(r["powersgd"] for r in rows) / statistics.fmean(stocks) - 1,
            "paired_mean_gap": mean, "paired_sd": sd, "paired_se": se,
            "ci95": [mean - t975(n - 1) * se, mean + t975(n - 1) * se],
            "stock_runs": len(stocks),
            "stock_spread": (max(stocks) / min(stocks) - 1) if len(stocks) > 1 else None}


def gap_curves(results: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """Per file, the train image-loss gap (percent) of each window, at the window's last step."""
    series, steps = {}, None
    for r in results:
        w = r.get("windows")
        if not w:
            return [], {}
        ends = [int(x["steps"].split("-")[1]) for x in w["stock"]]
        steps = steps or ends
        if ends != steps:
            return [], {}
        name = f"s{r['run_seed']} q{r['powersgd_config'].get('seed', 0)}"
        series[name] = [100 * (b["image_loss"] / a["image_loss"] - 1) for a, b in zip(w["stock"], w["powersgd"])]
    return steps or [], series


def markdown(out: dict, files: list[str]) -> str:
    e = out["experiment"]
    md = [f"# PowerSGD vs stock on the shapes prior, pooled over seeds ({out['date']})", "",
          f"{out['n']} PowerSGD runs against {out['stock_runs']} stock runs: d_model {e['model']['d_model']}, "
          f"{e['model']['n_layers']} layers, {e['steps']} steps, rank {e['rank']} per machine "
          f"({e['local_size']} GPUs a machine), Q {'warm-started' if e['warm_start'] else 'fixed (paper)'}, "
          f"error buffers {e['error_dtype']}"
          + (f" re-centered every {e['recenter_every']} steps" if e["recenter_every"] else "")
          + (f", the first {e['start_step']} steps uncompressed (compression over the whole run "
             f"{out['run_compression_rate']:.4f})" if e["start_step"] else "")
          + f", global batch {e['global_batch']}, "
          f"{e['optimizer']['type']} lr {e['optimizer']['params']['lr']}. Files: "
          + ", ".join(f"`{f}`" for f in files), "",
          "| run seed | Q seed | stock | PowerSGD | gap |", "|---:|---:|---:|---:|---:|"]
    for r in out["runs"]:
        md.append(f"| {r['run_seed']} | {r['q_seed']} | {r['stock']:.4f} | {r['powersgd']:.4f} | "
                  f"{100 * r['gap']:+.2f}% |")
    lo, hi = out["ci95"]
    md += ["", f"Paired gaps: mean **{100 * out['paired_mean_gap']:+.2f}%**, standard deviation "
           f"{100 * out['paired_sd']:.2f}%, standard error {100 * out['paired_se']:.2f}%, 95% interval "
           f"[{100 * lo:+.2f}%, {100 * hi:+.2f}%] (Student's t, {out['n'] - 1} degrees of freedom). Pooled: mean "
           f"PowerSGD / mean stock − 1 = {100 * out['pooled_gap']:+.2f}%."]
    if out["by_run_seed"] is not None:
        b = out["by_run_seed"]
        md.append(f"Runs that share a run seed share their stock run, so the gaps above are not independent; averaged "
                  f"per run seed first ({b['n']} values): mean {100 * b['mean']:+.2f}%, standard error "
                  f"{100 * b['se']:.2f}%, 95% interval [{100 * b['ci95'][0]:+.2f}%, {100 * b['ci95'][1]:+.2f}%].")
    if out["stock_spread"] is not None:
        md.append(f"Stock runs across run seeds: max / min − 1 = {100 * out['stock_spread']:.2f}%.")
    which = "per-run-seed"
    if out["by_run_seed"] is not None:
        lo, hi = out["by_run_seed"]["ci95"]
    else:
        which = "paired"
    verdict = (f"met: the whole {which} 95% interval lies below +2%" if hi <= 0.02 else
               f"missed: the whole {which} 95% interval lies above +2%" if lo > 0.02 else
               f"not decided: the {which} 95% interval contains +2%")
    md += ["", f"The 2% target: {verdict}."]
    return "\n".join(md) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--tag", required=True)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = [json.loads(f.read_text()) for f in args.files]
    out = pool(results)
    out["date"] = datetime.date.today().isoformat()
    names = [f.name for f in args.files]
    out["files"] = names
    dest = ROOT / "benchmarks" / "results" / f"powersgd_seeds_{args.tag}"
    dest.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    md = markdown(out, names)
    steps, curves = gap_curves(results)
    if curves:
        dest.with_suffix(".svg").write_text(line_chart(
            steps, curves, "PowerSGD vs stock: train image-loss gap along the run (window means)",
            "image-loss gap, %", hline=2.0))
        md += f"\nAlong the run: `{dest.with_suffix('.svg').name}` (train image-loss gap per pair, window means).\n"
    dest.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
