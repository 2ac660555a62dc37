"""Plot the per-resblock gradient scales of a prior run against the step, like the paper's Figure 12.

A run with ``model.resblock_grad_scaling`` logs each block's log2 scale as ``grad_scale_log2/<k>_<attn|mlp>`` on
every logged step. This reads them from the run folder (``dalle_partial_metrics.json`` and ``dalle_metrics.json``
histories, so a preempted and resumed run is plotted whole; or the DeepSpeed CSV monitor files under
``monitor/dalle/`` when the JSON histories are missing) and writes

* ``<out>.svg``: one line per block (attention blocks solid, MLP blocks dashed; colour runs from the first block to
  the last), log2 scale vs step, skipped updates ticked on the step axis. Plain SVG, no plotting library needed;
* ``<out>.csv``: step, then one column per block.

    python launch/plot_scales.py --run runs/dalle --out runs/dalle/grad_scales
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from dalle_ds.train.cli import check_out_dir
from dalle_ds.train.monitor_resume import read_csv_series
from dalle_ds.utils.svg_plot import line_chart

PREFIX = "grad_scale_log2/"


def load_scales(run: Path) -> tuple[list[int], dict[str, list[float]], list[int]]:
    """(steps, {block key: log2 scales per step}, skipped steps) from a run folder."""
    rows: dict[int, dict] = {}
    for name in ("dalle_partial_metrics.json", "dalle_metrics.json"):
        p = run / name
        if p.is_file():
            for r in json.loads(p.read_text()).get("history", []):
                rows[int(r["step"])] = r
    if not rows:
        mon = run / "monitor" / "dalle"
        for f in sorted(mon.glob(f"dalle_{PREFIX.rstrip('/')}*.csv")) + sorted(mon.glob("dalle_grad_scale_skip.csv")):
            key = f.stem[len("dalle_"):]
            key = key.replace("grad_scale_log2_", PREFIX, 1) if key.startswith("grad_scale_log2_") else key
            for step, value in read_csv_series(f).items():
                rows.setdefault(step, {})[key] = value
    steps = sorted(s for s, r in rows.items() if any(k.startswith(PREFIX) for k in r))
    if not steps:
        raise SystemExit(f"{run}: no per-resblock scales found (was the run trained with "
                         "model.resblock_grad_scaling=true and log_every > 0?)")
    keys = sorted({k for s in steps for k in rows[s] if k.startswith(PREFIX)})
    series = {k[len(PREFIX):]: [float(rows[s].get(k, float("nan"))) for s in steps] for k in keys}
    skipped = [s for s in steps if rows[s].get("grad_scale_skip", 0) > 0]
    return steps, series, skipped


def svg(steps: list[int], series: dict[str, list[float]], skipped: list[int], title: str) -> str:
    return line_chart(steps, series, title, "log2 gradient scale", ticks=skipped,
                      dashed=lambda name: name.endswith("mlp"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the prior's run folder (--out of launch/train_dalle.py)")
    p.add_argument("--out", default=None, help="writes OUT.svg and OUT.csv (default: <run>/grad_scales)")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        p.error(f"no such run folder: {run}")
    if args.out is not None:
        check_out_dir(p, "--out", str(Path(args.out).parent))  # a prefix: OUT.svg and OUT.csv go in its folder
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    steps, series, skipped = load_scales(run)
    out = Path(args.out) if args.out else run / "grad_scales"
    if out.suffix.lower() in (".svg", ".csv"):  # one of the two files named: the prefix is its stem
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    # OUT is a prefix, not a file name: Path.with_suffix would cut "scales_lr1.5e-3" to "scales_lr1" (two runs'
    # figures then overwrite each other)
    svg_file, csv_file = out.parent / f"{out.name}.svg", out.parent / f"{out.name}.csv"
    title = f"per-resblock gradient scales, {len(series)} blocks, {len(skipped)} skipped of {len(steps)} logged"
    svg_file.write_text(svg(steps, series, skipped, title))
    with csv_file.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *series])
        for i, s in enumerate(steps):
            w.writerow([s, *(f"{series[k][i]:.6f}" for k in series)])
    print(f"{title}: wrote {svg_file} and {csv_file}")
    return 0


if __name__ == "__main__":
    from dalle_ds.utils.exit import exit_process

    exit_process(main())
