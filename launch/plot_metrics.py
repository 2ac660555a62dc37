"""Draw a training run's curves from its DeepSpeed CSV monitor files: training losses, held-out losses, the pace.

    python launch/plot_metrics.py runs/demo/dalle [runs/demo/dvae ...] [--out DIR]

A trainer's ``csv_monitor`` (on in every shipped DeepSpeed config) writes ``RUN/monitor/<job>/<job>_<metric>.csv``,
one ``step,value`` row per logged step, continued across resumes (``dalle_ds/train/monitor_resume.py``). For each
job this writes up to four SVG charts beside the run (or in ``--out``): ``curves_<job>_train.svg`` (the training
losses), ``curves_<job>_heldout.svg`` (the losses of the evaluations), ``curves_<job>_pace.svg`` (samples per
second) and ``curves_<job>_data_wait.svg`` (the share of the time the loop waited for batches); in ``--out``, runs
of the same job get ``curves_<run folder>_<job>_*.svg``. TensorBoard reads
the same run (``tensorboard --logdir RUN``); these are for a look without a server, and for reports.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dalle_ds.train.cli import check_out_dir
from dalle_ds.train.monitor_resume import read_csv_series
from dalle_ds.utils.svg_plot import line_chart

# (chart, title, y label, which metric names it shows)
CHARTS = (
    ("train", "training loss", "loss",  # and the dVAE's two terms
     lambda name: (name.endswith("loss") or name in ("nll", "kl")) and not name.startswith("eval_")),
    ("heldout", "held-out loss", "loss", lambda name: name.startswith("eval_") and name.endswith("loss")),
    ("pace", "samples per second", "samples/s", lambda name: name == "perf_samples_per_second"),
    ("data_wait", "share of the time spent waiting for data", "fraction",
     lambda name: name == "perf_data_wait_fraction"),
)


def job_series(monitor: Path) -> dict[str, dict[str, dict[int, float]]]:
    """``{job: {metric: {step: value}}}`` for every ``<job>/<job>_<metric>.csv`` under ``monitor``."""
    jobs: dict[str, dict[str, dict[int, float]]] = {}
    for folder in sorted(p for p in monitor.iterdir() if p.is_dir()):
        prefix = folder.name + "_"
        for f in sorted(folder.glob(prefix + "*.csv")):
            series = read_csv_series(f)
            if series:
                jobs.setdefault(folder.name, {})[f.stem[len(prefix):]] = series
    return jobs


def charts(run: Path) -> dict[str, str]:
    """``{file name: SVG}`` for a run folder's monitor files; empty when there are none."""
    monitor = run / "monitor"
    if not monitor.is_dir():
        return {}
    out = {}
    for job, metrics in job_series(monitor).items():
        for key, title, ylabel, pick in CHARTS:
            chosen = {name: s for name, s in metrics.items() if pick(name)}
            if not chosen:
                continue
            steps = sorted({step for s in chosen.values() for step in s})
            series = {name: [s.get(step, math.nan) for step in steps] for name, s in sorted(chosen.items())}
            out[f"curves_{job}_{key}.svg"] = line_chart(steps, series, f"{job}: {title} ({run.name})", ylabel,
                                                        yfmt=".3g")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each with the monitor/ folder its trainer wrote)")
    p.add_argument("--out", default=None, help="where to write the SVGs (default: each run folder)")
    args = p.parse_args(argv)
    if args.out is not None:
        check_out_dir(p, "--out", args.out)
    return args


def destinations(runs: list[Path], drawn: list[dict[str, str]], out: str | None) -> list[dict[str, Path]]:
    """Where each run's charts go: beside the run, or in ``out``. Two runs of one job (two priors compared) draw
    the same file names; in one ``out`` the second run's charts replaced the first's without a word, so there each
    name then also carries its run folder's name (``curves_<run>_<job>_train.svg``). None when even that repeats."""
    if out is None:
        return [{name: run / name for name in charts} for run, charts in zip(runs, drawn)]
    names = [name for charts in drawn for name in charts]
    shared = {name for name in names if names.count(name) > 1}
    plan = [{name: Path(out) / (name.replace("curves_", f"curves_{run.resolve().name}_", 1) if name in shared else name)
             for name in charts} for run, charts in zip(runs, drawn)]
    paths = [p for files in plan for p in files.values()]
    return plan if len(set(paths)) == len(paths) else None


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    runs, drawn = list(map(Path, args.runs)), []
    for run in runs:
        try:
            drawn.append(charts(run))
        except ValueError as e:  # a CSV row that does not read (read_csv_series names the file and line)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        if not drawn[-1]:
            print(f"error: {run} has no CSV monitor files (monitor/<job>/<job>_*.csv: a run folder of train_dvae.py, "
                  "train_dalle.py or train_clip.py with csv_monitor on in its DeepSpeed config)", file=sys.stderr)
            raise SystemExit(2)
    plan = destinations(runs, drawn, args.out)
    if plan is None:
        print(f"error: --out {args.out}: runs with the same folder name and job would write the same charts; give "
              "each its own --out, or leave --out out (each run's charts go beside it)", file=sys.stderr)
        raise SystemExit(2)
    written = []
    for charts_of_run, files in zip(drawn, plan):
        for name, svg in charts_of_run.items():
            files[name].parent.mkdir(parents=True, exist_ok=True)
            files[name].write_text(svg)
            written.append(files[name])
            print(f"wrote {files[name]}")
    return written


if __name__ == "__main__":
    main()
