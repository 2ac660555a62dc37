"""A resumed run's logs read like an uninterrupted run's (dalle_ds/train/monitor_resume.py): DeepSpeed's CSV
monitor heads each file once, and the rows and TensorBoard events logged past the checkpoint are dropped, by update
for the trainers' own logs and by sample count for DeepSpeed's Train/Samples ones. DeepSpeed's own csvMonitor and
torch's SummaryWriter do the writing, TensorBoard's own reader the reading."""
import types

from dalle_ds.train.monitor_resume import continue_logs, trim_csv

BATCH = 16  # samples per update


def _start(log_dir):
    """What DeepSpeed's MonitorMaster holds on rank 0 after a (re)start: a fresh csvMonitor (built without a process
    group: its constructor asks deepspeed.comm for the rank)."""
    from deepspeed.monitor.csv_monitor import csvMonitor

    mon = csvMonitor.__new__(csvMonitor)
    mon.filenames, mon.enabled, mon.log_dir = [], True, str(log_dir)
    return types.SimpleNamespace(csv_monitor=mon, tb_monitor=None)


def _log(monitor, steps, offset, monkeypatch):
    """Each update: the trainer's loss and lr (x = update), and DeepSpeed's sample-keyed lr (x = samples after it)."""
    import deepspeed.comm as dist

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    for s in steps:
        monitor.csv_monitor.write_events([("job/loss", float(s) + offset, s), ("job/lr", 0.1 * s, s),
                                          ("Train/Samples/lr", 0.1 * s, s * BATCH)])


def test_resumed_csv_logs_read_like_an_uninterrupted_run(tmp_path, monkeypatch):
    _log(_start(tmp_path), range(1, 8), offset=0.0, monkeypatch=monkeypatch)  # logged 1..7; checkpoint 4; killed
    second = _start(tmp_path)
    assert continue_logs(second, 4, 4 * BATCH) == 3 * 3  # updates 5, 6, 7 in the three files
    _log(second, range(5, 9), offset=100.0, monkeypatch=monkeypatch)  # the replayed updates (other values)
    want = [f"{s},{float(s) + (100.0 if s > 4 else 0.0)}" for s in range(1, 9)]
    assert (tmp_path / "job_loss.csv").read_text().splitlines() == ["step,loss", *want]
    assert [r.split(",")[0] for r in (tmp_path / "Train_Samples_lr.csv").read_text().splitlines()] == \
        ["step", *(str(s * BATCH) for s in range(1, 9))]
    # a clean stop (no rows past the checkpoint), resumed again: only the header is kept from writing twice
    third = _start(tmp_path)
    untouched = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.csv")}
    assert continue_logs(third, 8, 8 * BATCH) == 0
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # nothing to drop: no file rewritten
    _log(third, [9], offset=0.0, monkeypatch=monkeypatch)
    lines = (tmp_path / "job_lr.csv").read_text().splitlines()
    assert lines[0] == "step,lr" and [r.split(",")[0] for r in lines[1:]] == [str(s) for s in range(1, 10)]


def test_files_with_headers_written_twice_and_no_csv_monitor(tmp_path):
    f = tmp_path / "job_loss.csv"
    f.write_text("step,loss\n1,3.0\n2,2.5\nstep,loss\n3,2.0\n")  # an earlier resume, before this module existed
    assert trim_csv(f, 2) == 1 and f.read_text() == "step,loss\n1,3.0\n2,2.5\n"
    (tmp_path / "empty.csv").write_text("")
    assert trim_csv(tmp_path / "empty.csv", 3) == 0
    assert continue_logs(types.SimpleNamespace(csv_monitor=None), 4, 64) == 0  # csv_monitor off


def test_resumed_tensorboard_logs_read_like_an_uninterrupted_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    def start():
        return types.SimpleNamespace(csv_monitor=None, tb_monitor=types.SimpleNamespace(
            enabled=True, summary_writer=SummaryWriter(log_dir=str(tmp_path))))

    def log(monitor, steps, offset):
        for s in steps:
            monitor.tb_monitor.summary_writer.add_scalar("job/loss", float(s) + offset, s)
            monitor.tb_monitor.summary_writer.add_scalar("Train/Samples/lr", 0.1 * s, s * BATCH)
        monitor.tb_monitor.summary_writer.flush()

    first = start()
    log(first, range(1, 8), offset=0.0)  # logged 1..7; checkpoint 4; killed (the file is left as it is)
    second = start()
    assert continue_logs(second, 4, 4 * BATCH) == 2 * 3
    log(second, range(5, 9), offset=100.0)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("job/loss")] == \
        [(s, float(s) + (100.0 if s > 4 else 0.0)) for s in range(1, 9)]
    assert [e.step for e in acc.Scalars("Train/Samples/lr")] == [s * BATCH for s in range(1, 9)]
    third = start()  # a clean resume: nothing to drop, no file rewritten
    files = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*tfevents*")}
    assert continue_logs(third, 8, 8 * BATCH) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == files
