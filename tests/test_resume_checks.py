"""What a run folder must satisfy before a run resumes from it (dalle_ds.train.checkpoint): ``latest`` names a
checkpoint that exists; the folder is this job's; the model and ZeRO stage are unchanged (the rank count may change:
tests/test_resume_other_world.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dalle_ds.config import ConfigError
from dalle_ds.train.checkpoint import check_resume, latest_tag
from launch_utils import ROOT

RUN = {"model": {"d_model": 32, "n_layers": 2, "attn_backend": "auto"}, "steps": 20, "seed": 1}
DS = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 2}}


def _folder(tmp_path, job="dalle", tags=("step00000010",), latest="step00000010"):
    ckpt = tmp_path / "checkpoints"
    for t in tags:
        (ckpt / t).mkdir(parents=True)
    if latest is not None:
        (ckpt / "latest").write_text(latest)
    (tmp_path / f"{job}_run_config.json").write_text(json.dumps(RUN))
    (tmp_path / f"{job}_ds_config.json").write_text(json.dumps(DS))
    return tmp_path


def test_latest_must_name_an_existing_checkpoint(tmp_path):
    run = _folder(tmp_path, tags=("step00000005", "step00000010"))
    assert latest_tag(run / "checkpoints") == "step00000010"
    (run / "checkpoints" / "latest").write_text("step00000020")  # e.g. deleted by hand: resuming from 0 would prune
    with pytest.raises(ConfigError, match=r"'step00000020', which does not exist \(present: step00000005, "
                                          r"step00000010\)"):
        latest_tag(run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("")
    with pytest.raises(ConfigError, match="names checkpoint ''"):
        latest_tag(run / "checkpoints")
    (run / "checkpoints" / "latest").unlink()
    assert latest_tag(run / "checkpoints") is None  # never committed: a fresh start


def test_what_may_and_may_not_change(tmp_path):
    run = _folder(tmp_path)
    assert check_resume(run, "dalle", RUN, DS) == []
    more = {**RUN, "steps": 40, "model": {**RUN["model"], "attn_backend": "dense"}}
    assert check_resume(run, "dalle", more, DS) == ["model.attn_backend", "steps"]
    wider = {**RUN, "model": {**RUN["model"], "d_model": 64}}
    with pytest.raises(ConfigError, match="model differs.*model.d_model 32 -> 64"):
        check_resume(run, "dalle", wider, DS)
    with pytest.raises(ConfigError, match="holds fp32 Adam moments, this run asks for 16bit"):
        check_resume(run, "dalle", {**RUN, "adam_moments": "16bit"}, DS)
    # a folder written before the key existed held fp32 moments: resuming it with the default is fine
    assert check_resume(run, "dalle", {**RUN, "adam_moments": "fp32"}, DS) == ["adam_moments"]
    with pytest.raises(ConfigError, match="another run \\(dalle\\), not of a dvae run"):
        check_resume(run, "dvae", RUN, DS)
    with pytest.raises(ConfigError, match="ZeRO stage 2, this run uses 0"):
        check_resume(run, "dalle", RUN, {**DS, "zero_optimization": {"stage": 0}})
    # another number of ranks is no refusal (tests/test_resume_other_world.py)
    assert check_resume(run, "dalle", RUN, {**DS, "train_batch_size": 4}) == []
    # the checkpoint's own layout wins over the run's DeepSpeed config, which every start rewrites
    (run / "checkpoints" / "step00000010" / "layout.json").write_text(json.dumps(
        {"world_size": 2, "micro_batch": 4, "train_batch_size": 8, "zero_stage": 3}))
    with pytest.raises(ConfigError, match="ZeRO stage 3, this run uses 2"):
        check_resume(run, "dalle", RUN, DS)
    # DeepSpeed keeps its optimizer state per precision mode: another one was reported as a damaged checkpoint
    (run / "checkpoints" / "step00000010" / "layout.json").write_text(json.dumps(
        {"world_size": 2, "micro_batch": 4, "train_batch_size": 8, "zero_stage": 2, "precision": "fp32"}))
    assert check_resume(run, "dalle", RUN, DS) == []
    with pytest.raises(ConfigError, match="written in DeepSpeed's fp32 mode, this run asks for bf16"):
        check_resume(run, "dalle", RUN, {**DS, "bf16": {"enabled": True}})


def test_no_checkpoint_no_checks(tmp_path):
    run = _folder(tmp_path, tags=(), latest=None)
    assert check_resume(run, "dvae", {"model": {"d_model": 1}}, {}) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_prior_run_refuses_to_resume_with_another_model(tmp_path):
    """End to end on 2 ranks: a 2-step test prior, then the same folder with a wider model: every rank stops with
    the config error (none is left waiting in a collective), exit 2, and the folder's run config is still the first
    run's."""
    import shutil

    from launch_utils import free_port
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 64, 16)
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")

    def train(*extra):
        return subprocess.run([exe, "--num_gpus", "2", "--master_port", str(free_port()), "launch/train_dalle.py",
                               "--deepspeed_config", "ds_configs/cpu_dalle.json", "--preset", "test",
                               "--set", f"data.train_tokens={shards / 'train'}", "--set", "steps=2",
                               "--set", "save_every=2", "--ds_set", "train_micro_batch_size_per_gpu=2",
                               "--out", str(tmp_path / "run"), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    first = train()
    assert first.returncode == 0, first.stderr[-3000:]
    second = train("--set", "model.d_model=64")
    out = second.stdout + second.stderr
    assert second.returncode == 2, out[-3000:]
    assert "config error: cannot resume" in out and "model.d_model 32 -> 64" in out and "Traceback" not in out
    assert json.loads((tmp_path / "run" / "dalle_run_config.json").read_text())["model"]["d_model"] == 32


@pytest.mark.slow
@pytest.mark.distributed
def test_a_file_only_one_rank_reads_damaged_ends_every_rank(tmp_path):
    """2 ranks, ZeRO-3, stopped after update 2; then, in a copy of the run each, one file that rank 1 alone reads is
    cut short: this project's per-rank state (read after DeepSpeed's load: all ranks raise the error together, rank 0
    prints it once) or DeepSpeed's optimizer shard (read inside its load: rank 1 says it and leaves, the launcher
    stops rank 0). Either way the job ends with exit 2 and the file named; it used to wait forever in the final
    barrier."""
    import shutil

    from launch_utils import _launch_command, _launcher_env, deepspeed_launch, free_port
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 64, 8)

    def args(run):
        return ["--deepspeed_config", "ds_configs/cpu_dalle.json", "--ds_set", "zero_optimization.stage=3",
                "--preset", "test", "--set", f"data.train_tokens={shards / 'train'}",
                "--set", f"data.val_tokens={shards / 'val'}", "--set", "steps=4", "--set", "save_every=0",
                "--set", "eval_every=0", "--set", "data.val_batches=1", "--out", str(run)]

    first = tmp_path / "first"
    deepspeed_launch("launch/train_dalle.py", [*args(first), "--stop_at", "2"], num_procs=2)
    for damaged in ("rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        run = tmp_path / damaged
        shutil.copytree(first, run)
        f = run / "checkpoints" / "step00000002" / damaged
        f.write_bytes(f.read_bytes()[:100])
        proc = subprocess.run(_launch_command("launch/train_dalle.py", args(run), 2, free_port()), cwd=ROOT,
                              env=_launcher_env(), capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 2, log[-3000:]
        named = [line for line in log.splitlines() if "could not be read" in line and str(f.parent) in line]
        assert named, log[-3000:]
        if damaged == "rank1.pt":
            assert len(named) == 1 and named[0].startswith("config error: ") and damaged in named[0], named
        else:
            assert any(line.startswith("config error on rank 1: ") for line in named), named


@pytest.mark.slow
def test_a_checkpoint_is_written_once_per_step(tmp_path):
    """--stop_at on a save_every multiple, then a rerun whose steps= is the checkpoint's step: the step's checkpoint
    is written once. The final save used to write it again, in place, while `latest` named it (a crash then would
    have damaged the checkpoint to resume)."""
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 64, 8)
    driver = (
        "import atexit, runpy, sys\n"
        "from dalle_ds.train import checkpoint as ck\n"
        "calls, save = [], ck.save_checkpoint\n"
        "def counting(engine, ckpt_dir, step, *a, **k):\n"
        "    calls.append(step)\n"
        "    return save(engine, ckpt_dir, step, *a, **k)\n"
        "ck.save_checkpoint = counting\n"
        "atexit.register(lambda: print('saved at steps', calls))\n"
        "sys.argv = ['launch/train_dalle.py', *sys.argv[1:]]\n"
        "runpy.run_path('launch/train_dalle.py', run_name='__main__')\n")
    common = ["--deepspeed_config", "ds_configs/cpu_dalle.json", "--preset", "test",
              "--set", f"data.train_tokens={shards / 'train'}", "--set", "save_every=2", "--set", "eval_every=0",
              "--set", "data.val_batches=0", "--out", str(tmp_path / "run")]
    from launch_utils import single_process_env

    for extra, want in ((["--set", "steps=4", "--stop_at", "2"], "saved at steps [2]"),
                        (["--set", "steps=2"], "saved at steps []")):
        proc = subprocess.run([sys.executable, "-c", driver, *common, *extra], cwd=ROOT, env=single_process_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert want in proc.stdout, (proc.stdout[-2000:], proc.stderr[-2000:])


@pytest.mark.slow
def test_a_prior_with_dropout_resumes_exactly(tmp_path):
    """model.dropout draws from torch's global generator, which the loop re-seeds per (seed, update, rank), and the
    data loader's iterator takes its seed from a generator of its own: a run stopped after update 4 and resumed
    logs the uninterrupted run's losses bit for bit. Before, the resumed run's generator replayed the stream from
    the start (step 5: 2.871503 uninterrupted, 2.859283 resumed)."""
    from launch_utils import single_process_env
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 64, 8)

    def train(run, *extra):
        cmd = [sys.executable, "launch/train_dalle.py", "--deepspeed_config", "ds_configs/cpu_dalle.json",
               "--ds_set", "train_micro_batch_size_per_gpu=4", "--preset", "test",
               "--set", f"data.train_tokens={shards / 'train'}", "--set", "data.val_batches=0", "--set", "steps=8",
               "--set", "save_every=4", "--set", "eval_every=0", "--set", "log_every=1", "--set", "model.dropout=0.1",
               "--out", str(run), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train(tmp_path / "full")
    train(tmp_path / "part", "--stop_at", "4")
    train(tmp_path / "part")

    def losses(run):
        return {h["step"]: h["loss"] for h in json.loads((run / "dalle_metrics.json").read_text())["history"]}

    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(part) == [5, 6, 7, 8] and all(part[s] == full[s] for s in part), (full, part)


def test_later_tags_than_the_resumed_one_are_set_aside(tmp_path):
    """latest pointed back at step 4 (as the damaged-checkpoint message advises) with steps 8 and 12 still there:
    they move aside before the resumed run saves into their folders (a stale universal/ copy among them would be
    trusted later)."""
    from dalle_ds.train.checkpoint import list_tags, set_aside_later_tags

    for step in (4, 8, 12):
        (tmp_path / "checkpoints" / f"step{step:08d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step00000008" / "universal").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000004")
    assert set_aside_later_tags(tmp_path, "step00000012") is None
    aside = set_aside_later_tags(tmp_path, "step00000004")
    assert list_tags(tmp_path / "checkpoints") == ["step00000004"]
    assert sorted(p.name for p in aside.iterdir()) == ["step00000008", "step00000012"]
    assert (aside / "step00000008" / "universal").is_dir()
