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
import sys
from pathlib import Path

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
            with f.open() as fh:
                for line in csv.reader(fh):
                    if line and line[0].isdigit():
                        rows.setdefault(int(line[0]), {})[key] = float(line[1])
    steps = sorted(s for s, r in rows.items() if any(k.startswith(PREFIX) for k in r))
    if not steps:
        raise SystemExit(f"{run}: no per-resblock scales found (was the run trained with "
                         "model.resblock_grad_scaling=true and log_every > 0?)")
    keys = sorted({k for s in steps for k in rows[s] if k.startswith(PREFIX)})
    series = {k[len(PREFIX):]: [float(rows[s].get(k, float("nan"))) for s in steps] for k in keys}
    skipped = [s for s in steps if rows[s].get("grad_scale_skip", 0) > 0]
    return steps, series, skipped


def _colour(i: int, n: int) -> str:
    t = i / max(1, n - 1)  # blue → red
    return f"rgb({int(40 + 200 * t)},{int(90 + 40 * (1 - abs(2 * t - 1)))},{int(220 - 180 * t)})"


def svg(steps: list[int], series: dict[str, list[float]], skipped: list[int], title: str) -> str:
    W, H, L, R, T, B = 900, 520, 70, 150, 40, 50
    vals = [v for vs in series.values() for v in vs if v == v]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def x(s: float) -> float:
        return L + (s - s0) / (s1 - s0) * (W - L - R)

    def y(v: float) -> float:
        return T + (hi - v) / (hi - lo) * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">step</text>',
           f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
           'text-anchor="middle">log2 gradient scale</text>']
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        out.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        out.append(f'<line x1="{L}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#eee"/>')
        s = s0 + (s1 - s0) * i / 5
        out.append(f'<text x="{x(s):.1f}" y="{H - B + 16}" text-anchor="middle">{s:.0f}</text>')
    for s in skipped:
        out.append(f'<line x1="{x(s):.1f}" y1="{H - B}" x2="{x(s):.1f}" y2="{H - B + 6}" stroke="red"/>')
    n = len(series)
    for i, (name, vs) in enumerate(series.items()):
        pts = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, vs) if v == v)
        dash = ' stroke-dasharray="5,3"' if name.endswith("mlp") else ""
        out.append(f'<polyline fill="none" stroke="{_colour(i, n)}" stroke-width="1.3"{dash} points="{pts}"/>')
        if n <= 32 or i % max(1, n // 32) == 0:
            ly = T + 10 + i * min(14, (H - T - B) / n)
            out.append(f'<text x="{W - R + 8}" y="{ly:.1f}" fill="{_colour(i, n)}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the prior's run folder (--out of launch/train_dalle.py)")
    p.add_argument("--out", default=None, help="writes OUT.svg and OUT.csv (default: <run>/grad_scales)")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        p.error(f"no such run folder: {run}")
    steps, series, skipped = load_scales(run)
    out = Path(args.out) if args.out else run / "grad_scales"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"per-resblock gradient scales, {len(series)} blocks, {len(skipped)} skipped of {len(steps)} logged"
    out.with_suffix(".svg").write_text(svg(steps, series, skipped, title))
    with out.with_suffix(".csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *series])
        for i, s in enumerate(steps):
            w.writerow([s, *(f"{series[k][i]:.6f}" for k in series)])
    print(f"{title}: wrote {out.with_suffix('.svg')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
