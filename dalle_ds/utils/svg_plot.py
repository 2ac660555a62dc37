"""Line and grouped-bar charts as plain SVG text (no plotting library): used by launch/plot_scales.py,
launch/plot_metrics.py, launch/evaluate.py, benchmarks/powersgd_seeds.py, benchmarks/precision_compare.py and
benchmarks/bench_attention.py."""
from __future__ import annotations

from typing import Callable


def colour(i: int, n: int) -> str:
    t = i / max(1, n - 1)  # blue → red
    return f"rgb({int(40 + 200 * t)},{int(90 + 40 * (1 - abs(2 * t - 1)))},{int(220 - 180 * t)})"


def _frame(W, H, L, R, T, B, title: str, ylabel: str, xlabel: str, lo: float, hi: float,
           fmt: str = ".2f") -> tuple[list[str], Callable[[float], float]]:
    """SVG header, title, axes, axis labels and six labelled horizontal grid lines from ``lo`` to ``hi``; and the
    value -> pixel map ``y`` of that axis."""

    def y(v: float) -> float:
        return T + (hi - v) / (hi - lo) * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
           f'text-anchor="middle">{ylabel}</text>']
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        out.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:{fmt}}</text>')
        out.append(f'<line x1="{L}" y1="{y(v):.1f}" x2="{W - R}" y2="{y(v):.1f}" stroke="#eee"/>')
    return out, y


def line_chart(steps: list[int], series: dict[str, list[float]], title: str, ylabel: str, *,
               ticks: list[int] = (), dashed: Callable[[str], bool] = lambda name: False,
               hline: float | None = None, xlabel: str = "step", xticks: list[float] | None = None,
               yfmt: str = ".2f") -> str:
    """One polyline per series against ``steps`` (NaN values skipped), a legend on the right, red ticks on the step
    axis at ``ticks``, and an optional grey horizontal reference line at ``hline``. The x axis is labelled ``xlabel``
    at six even values, or at ``xticks``; the y axis's labels are formatted by ``yfmt``."""
    W, H, L, R, T, B = 900, 520, 70, 150, 40, 50
    vals = [v for vs in series.values() for v in vs if v == v] + ([hline] if hline is not None else [])
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def x(s: float) -> float:
        return L + (s - s0) / (s1 - s0) * (W - L - R)

    out, y = _frame(W, H, L, R, T, B, title, ylabel, xlabel, lo, hi, yfmt)
    for s in (xticks if xticks is not None else [s0 + (s1 - s0) * i / 5 for i in range(6)]):
        out.append(f'<text x="{x(s):.1f}" y="{H - B + 16}" text-anchor="middle">{s:.{0 if s == int(s) else 1}f}</text>')
    if hline is not None:
        out.append(f'<line x1="{L}" y1="{y(hline):.1f}" x2="{W - R}" y2="{y(hline):.1f}" stroke="#888" '
                   'stroke-dasharray="2,3"/>')
    for s in ticks:
        out.append(f'<line x1="{x(s):.1f}" y1="{H - B}" x2="{x(s):.1f}" y2="{H - B + 6}" stroke="red"/>')
    n = len(series)
    for i, (name, vs) in enumerate(series.items()):
        pts = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, vs) if v == v)
        dash = ' stroke-dasharray="5,3"' if dashed(name) else ""
        out.append(f'<polyline fill="none" stroke="{colour(i, n)}" stroke-width="1.3"{dash} points="{pts}"/>')
        if n <= 32 or i % max(1, n // 32) == 0:
            ly = T + 10 + i * min(14, (H - T - B) / n)
            out.append(f'<text x="{W - R + 8}" y="{ly:.1f}" fill="{colour(i, n)}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def bar_chart(groups: list[str], series: dict[str, list[float | None]], title: str, ylabel: str, *,
              xlabel: str = "") -> str:
    """Grouped bars from zero: one group per entry of ``groups``, one bar per series in each (None: no bar), the
    value printed above each bar, a legend on the right."""
    W, H, L, R, T, B = 900, 480, 70, 170, 40, 60
    vals = [v for vs in series.values() for v in vs if v is not None]
    lo, hi = 0.0, max(vals + [1e-9]) * 1.12
    out, y = _frame(W, H, L, R, T, B, title, ylabel, xlabel, lo, hi, ".3g")
    n, group_w = len(series), (W - L - R) / max(1, len(groups))
    bar_w = 0.8 * group_w / max(1, n)
    for g, name in enumerate(groups):
        gx = L + g * group_w
        out.append(f'<text x="{gx + group_w / 2:.1f}" y="{H - B + 16}" text-anchor="middle">{name}</text>')
        for i, vs in enumerate(series.values()):
            v = vs[g]
            if v is None:
                continue
            bx = gx + 0.1 * group_w + i * bar_w
            out.append(f'<rect x="{bx:.1f}" y="{y(v):.1f}" width="{bar_w * 0.92:.1f}" height="{y(0) - y(v):.1f}" '
                       f'fill="{colour(i, n)}"/>')
            out.append(f'<text x="{bx + bar_w * 0.46:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" '
                       f'font-size="9">{v:.3g}</text>')
    for i, name in enumerate(series):
        out.append(f'<rect x="{W - R + 8}" y="{T + 4 + i * 16}" width="10" height="10" fill="{colour(i, n)}"/>')
        out.append(f'<text x="{W - R + 22}" y="{T + 13 + i * 16}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
