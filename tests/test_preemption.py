"""Stop on a signal with a checkpoint (dalle_ds.train.preemption): the handlers, the agreement among ranks, and a
prior under the deepspeed launcher stopped by a signal to one of its ranks, then resumed to the end."""
import json
import os
import signal
import subprocess
import time

import pytest

from dalle_ds.train.preemption import StopSignals, parse_signals
from launch_utils import ROOT


def test_parse_signals():
    assert parse_signals("SIGTERM,usr1, INT") == (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    assert parse_signals("15,SIGTERM") == (signal.SIGTERM,)
    assert parse_signals("none") == () == parse_signals("")
    for bad in ("SIGNOPE", "SIGKILL", "99999"):
        with pytest.raises(ValueError):
            parse_signals(bad)


def test_first_signal_is_recorded_and_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals((signal.SIGUSR1, signal.SIGUSR2)) as stop:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # a different one later: still the first is kept
        assert stop.received == signal.SIGUSR2 and stop.agreed() == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR1) is before


def test_the_same_signal_twice_goes_to_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals((signal.SIGUSR1,)) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == [] and stop.received == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == [signal.SIGUSR1]  # handed on: for SIGINT that is Python's KeyboardInterrupt
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_no_signals_no_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(()) as stop:
        assert signal.getsignal(signal.SIGTERM) is before and stop.agreed() == 0


def _only_rank1_is_signalled(rank, world):
    """Step 1 ends, rank 1 is signalled during step 2; agreed() after steps 1, 2, 3 (its all-reduce is read one
    call later: the stop comes after step 3 on every rank)."""
    with StopSignals((signal.SIGUSR1,)) as stop:
        after_1 = stop.agreed()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return [after_1, stop.agreed(), stop.agreed(), stop.received]


def test_one_rank_signalled_every_rank_agrees():
    from dalle_ds.dist.local_ranks import run_local_ranks

    assert run_local_ranks(_check_agreement, 3, timeout=120) == [0, 0, signal.SIGUSR1, 0]


def _check_agreement(rank, world):
    got = _only_rank1_is_signalled(rank, world)
    assert got[:3] == [0, 0, signal.SIGUSR1], (rank, got)
    assert got[3] == (signal.SIGUSR1 if rank == 1 else 0), (rank, got)
    return got


@pytest.mark.distributed
@pytest.mark.slow
def test_prior_stopped_by_a_signal_to_one_rank_checkpoints_and_resumes(tmp_path):
    """SIGTERM to rank 1 alone (as a scheduler's or the launcher's, which reaches the ranks one by one): both ranks
    stop after the same step, the checkpoint is complete, the job exits with 128 + 15, and the same command
    resumes from that step."""
    import psutil

    from launch_utils import deepspeed_launch, deepspeed_start
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 256, 32)
    out = tmp_path / "run"
    args = ["--deepspeed_config", "ds_configs/cpu_dalle.json", "--preset", "test",
            "--set", f"data.train_tokens={shards / 'train'}", "--set", f"data.val_tokens={shards / 'val'}",
            "--set", "steps=2000", "--set", "save_every=0", "--set", "eval_every=0", "--set", "log_every=1",
            "--set", "data.val_batches=1", "--out", str(out)]
    launcher = deepspeed_start("launch/train_dalle.py", args, num_procs=2)
    try:
        losses = out / "monitor" / "dalle" / "dalle_loss.csv"
        deadline = time.time() + 300
        while not (losses.is_file() and len(losses.read_text().splitlines()) >= 6):  # a few steps in
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[0][-3000:]
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "train_dalle.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        assert len(ranks) == 1, ranks
        ranks[0].send_signal(signal.SIGTERM)
        log, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "received SIGTERM: stopping after the next step" in log
    stopped = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    assert 5 <= stopped < 2000, stopped
    shards_saved = sorted(p.name for p in (out / "checkpoints" / f"step{stopped:08d}").glob("zero_pp_rank_*"))
    assert shards_saved == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]  # both ranks saved

    deepspeed_launch("launch/train_dalle.py", [*args, "--stop_at", str(stopped + 3)], num_procs=2)
    resumed = json.loads((out / "dalle_partial_metrics.json").read_text())
    assert resumed["resumed_from"] == stopped and [h["step"] for h in resumed["history"]] == [
        stopped + 1, stopped + 2, stopped + 3]


def test_trainer_flag(capsys):
    from dalle_ds.config import DALLE_RUN_PRESETS
    from dalle_ds.train.cli import build_parser

    p = build_parser("t", DALLE_RUN_PRESETS, "demo")
    assert p.parse_args(["--out", "x"]).stop_signals == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    assert p.parse_args(["--out", "x", "--stop_signals", "none"]).stop_signals == ()
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--out", "x", "--stop_signals", "SIGNOPE"])
    assert e.value.code == 2 and "--stop_signals: unknown signal 'SIGNOPE'" in capsys.readouterr().err


def test_demo_says_how_to_continue_after_a_signal(tmp_path):
    """launch/demo.sh passes a stage's 128 + signal exit on, with how to continue (a stub deepspeed stops at once)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "deepspeed"
    stub.write_text("#!/bin/sh\nexit 143\n")
    stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh"), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stdout + proc.stderr
    assert "stopped by signal 15; run the demo again to continue from its checkpoints" in proc.stdout
