"""DeepSpeed's CSV monitor, continued cleanly by a resumed run.

A run resumes from its last checkpoint, but it may have logged steps after it before it stopped (a job killed
outright logs every ``log_every`` updates and saves every ``save_every``; a stop by signal saves first). DeepSpeed's
CSV monitor only appends, and heads every file it first writes to in a process, so a resumed run's files would hold
a second header in the middle and, after a kill, the steps between the checkpoint and the kill twice (from the lost
and the replayed updates). :func:`continue_logs` makes them read like an uninterrupted run's: each file keeps its
header and the rows up to the checkpoint (rewritten atomically). The x-axis is the update for the trainers' own
files (``<job>_*.csv``) and the sample count for DeepSpeed's ``Train_Samples_*.csv``.

TensorBoard is left alone: its files (event format 2) hide superseded events only on a ``SessionLog.START`` marker
(``SummaryWriter(purge_step=...)``), which hides every tag's events from that x on, and DeepSpeed's sample-keyed
tags would lose their whole history to it. After a kill, TensorBoard shows the replayed steps twice. Weights & Biases
and Comet follow their own resume settings.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def trim_csv(path: Path, step: int) -> int:
    """Keep ``path``'s first header line and its rows with a step ≤ ``step`` (later headers dropped); returns how
    many rows were dropped. Rewritten through a temporary file, so a crash leaves the old or the new file."""
    lines = path.read_text().splitlines()
    if not lines:
        return 0
    kept, dropped = [lines[0]], 0
    for line in lines[1:]:
        first = line.split(",", 1)[0]
        if not first.isdigit():  # a header written again by an earlier resume
            continue
        if int(first) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    os.replace(tmp, path)
    return dropped


def continue_logs(monitor: Any, step: int, samples: int) -> int:
    """On the rank that writes the logs (DeepSpeed's ``engine.monitor``, a ``MonitorMaster``), after a resume from
    update ``step`` (``samples`` consumed): trim the CSV files and tell the monitor they are headed (above). Returns
    the rows dropped."""
    dropped = 0
    csv_monitor = getattr(monitor, "csv_monitor", None)
    if csv_monitor is not None and csv_monitor.enabled and csv_monitor.log_dir:
        for path in sorted(Path(csv_monitor.log_dir).glob("*.csv")):
            dropped += trim_csv(path, samples if path.name.startswith("Train_Samples_") else step)
            if path.stem not in csv_monitor.filenames:  # headed already: the monitor must not head it again
                csv_monitor.filenames.append(path.stem)
    return dropped
