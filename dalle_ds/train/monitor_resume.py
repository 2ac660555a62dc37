"""DeepSpeed's CSV and TensorBoard logs, continued cleanly by a resumed run.

A run resumes from its last checkpoint, but it may have logged steps after it before it stopped (a job killed
outright logs every ``log_every`` updates and saves every ``save_every``; a stop by signal saves first). DeepSpeed's
monitors only append, and its CSV monitor heads every file it first writes to in a process, so a resumed run's CSV
files would hold a second header in the middle and, after a kill, both they and TensorBoard would hold the steps
between the checkpoint and the kill twice (from the lost and the replayed updates). :func:`continue_logs` makes the
logs read like an uninterrupted run's: each CSV file keeps its header and the rows up to the checkpoint, and the
earlier TensorBoard event files lose their events past it (both rewritten atomically, only when something is
dropped). The x-axis is the update for the trainers' own logs (``<job>/...``) and the sample count for DeepSpeed's
``Train/Samples/...``. (TensorBoard's own remedy, the ``SessionLog.START`` marker that ``SummaryWriter(purge_step=)``
writes, hides every tag's events from one x on, and would hide the sample-keyed tags' whole history.) Weights &
Biases and Comet follow their own resume settings.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def read_csv_series(path: Path) -> dict[int, float]:
    """``{step: value}`` from one CSV monitor file: its ``step,value`` rows (headers, a resumed run's included,
    skipped; a step written twice keeps its last value). What :func:`trim_csv` keeps is what this reads."""
    out: dict[int, float] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        first, _, value = line.partition(",")
        if first.isdigit() and value:
            try:
                out[int(first)] = float(value)
            except ValueError:
                raise ValueError(f"{path}, line {number}: want step,value, got {line!r}") from None
    return out


def trim_csv(path: Path, step: int) -> int:
    """Keep ``path``'s first header line and its rows with a step ≤ ``step`` (later headers dropped); returns how
    many rows were dropped. Rewritten through a temporary file (a crash leaves the old or the new file), and only
    when a line goes."""
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
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(kept) + "\n")
        os.replace(tmp, path)
    return dropped


def trim_event_file(path: Path, step: int, samples: int) -> int:
    """Drop the scalar events of a TensorBoard event file past ``step`` (``samples`` for ``Train/Samples/`` tags);
    returns how many. The file is rewritten (through a temporary file) only when something is dropped; a record cut
    short by a kill ends the reading and is not copied."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    kept, dropped = [], 0
    for raw in RawEventFileLoader(str(path)).Load():
        event = Event.FromString(raw)
        if event.HasField("summary") and event.summary.value:
            by_samples = all(v.tag.startswith("Train/Samples/") for v in event.summary.value)
            if event.step > (samples if by_samples else step):
                dropped += 1
                continue
        kept.append(raw)
    if dropped:
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "wb") as fh:
            writer = RecordWriter(fh)
            for raw in kept:
                writer.write(raw)
        os.replace(tmp, path)
    return dropped


def continue_logs(monitor: Any, step: int, samples: int) -> int:
    """On the rank that writes the logs (DeepSpeed's ``engine.monitor``, a ``MonitorMaster``), after a resume from
    update ``step`` (``samples`` consumed): trim the CSV files and tell the monitor they are headed, and trim the
    earlier TensorBoard event files (above). Returns the CSV rows and events dropped."""
    dropped = 0
    csv_monitor = getattr(monitor, "csv_monitor", None)
    if csv_monitor is not None and csv_monitor.enabled and csv_monitor.log_dir:
        for path in sorted(Path(csv_monitor.log_dir).glob("*.csv")):
            dropped += trim_csv(path, samples if path.name.startswith("Train_Samples_") else step)
            if path.stem not in csv_monitor.filenames:  # headed already: the monitor must not head it again
                csv_monitor.filenames.append(path.stem)
    tb_monitor = getattr(monitor, "tb_monitor", None)
    writer = getattr(tb_monitor, "summary_writer", None)
    if tb_monitor is not None and tb_monitor.enabled and writer is not None:
        writer.flush()
        for path in sorted(Path(writer.get_logdir()).glob("*tfevents*")):
            dropped += trim_event_file(path, step, samples)  # this process's new file holds no events yet
    return dropped
