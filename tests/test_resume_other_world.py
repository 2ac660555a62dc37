"""Resuming on another number of ranks (EngineLoop._load_resharded, checkpoint.universal_tag): the data position
carries over in samples, ZeRO-3 EMA partitions are regrouped, and end to end a run stopped on 2 ranks and resumed on
1 (ZeRO-3), or stopped on 1 and resumed on 2 (ZeRO-2), trains on exactly like an uninterrupted 2-rank run."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from dalle_ds.train import checkpoint as ckpt
from dalle_ds.train import ema as ema_module
from dalle_ds.train.data_loading import ResumableSampler
from dalle_ds.train.ema import EMA


def _global_micro_batches(n: int, world: int, micro: int, epoch: int, skip_micro: int, count: int,
                          seed: int) -> list[set]:
    """The sample indices of ``count`` global micro-batches from position (epoch, skip_micro) at this world size:
    each rank's sampler, as StepBatches positions it, cut into micro-batches and merged rank by rank."""
    per_rank = []
    for r in range(world):
        s = ResumableSampler(list(range(n)), world, r, seed=seed)
        s.set_position(epoch, skip_micro * micro)
        idx = list(s)
        per_rank.append([idx[i * micro:(i + 1) * micro] for i in range(count)])
    return [set().union(*(per_rank[r][i] for r in range(world))) for i in range(count)]


@pytest.mark.parametrize("before,now", [((2, 4), (1, 8)), ((1, 8), (2, 4)), ((4, 2), (2, 2)), ((2, 2), (4, 2))])
def test_data_position_carries_over_in_samples(before, now):
    """(world, micro-batch) before and now. Each global micro-batch is the next block of the epoch's shuffled order,
    at any world size; after converting the position, the new ranks go on exactly where the old ones stopped."""
    n, epoch, seed = 96, 3, 7
    (w0, m0), (w1, m1) = before, now
    g = torch.Generator()
    g.manual_seed(seed + epoch)  # DistributedSampler's epoch order
    order = torch.randperm(n, generator=g).tolist()
    consumed_micro = 6  # per rank, at the old world size
    start = consumed_micro * m0 * w0
    position, repeated = ckpt.resume_data_position({"epoch": epoch, "index": consumed_micro}, m0 * w0, m1 * w1)
    assert repeated == 0 and position == {"epoch": epoch, "index": start // (m1 * w1)}
    for (w, m, skip) in [(w0, m0, consumed_micro), (w1, m1, position["index"])]:
        count = (n - start) // (m * w)
        got = _global_micro_batches(n, w, m, epoch, skip, count, seed)
        assert got == [set(order[start + k * m * w: start + (k + 1) * m * w]) for k in range(count)]


def test_data_position_off_the_new_grid_repeats_the_remainder():
    position, repeated = ckpt.resume_data_position({"epoch": 0, "index": 3}, 6, 4)  # 18 samples, new step 4
    assert position == {"epoch": 0, "index": 4} and repeated == 2


def _fake_zero3(numels: list[int], world: int) -> nn.Module:
    """A module whose parameters look ZeRO-3 partitioned for ``world`` ranks (``ds_tensor``: a zero share of
    ceil(numel / world) elements, ``ds_shape``: the full shape)."""
    m = nn.ParameterList([nn.Parameter(torch.zeros(k)) for k in numels])
    for p in m:
        p.ds_shape = p.shape
        p.ds_tensor = torch.zeros(math.ceil(p.numel() / world))
    return m


@pytest.mark.parametrize("old_world,new_world", [(3, 2), (2, 3), (1, 4), (4, 1)])
def test_ema_partitions_regrouped_for_another_world(monkeypatch, old_world, new_world):
    numels = [7, 12, 1, 30]
    full = [torch.randn(k) for k in numels]
    old_states = []
    for r in range(old_world):
        module = _fake_zero3(numels, old_world)
        e = EMA(module, 0.99)
        for shadow, t in zip(e.shadow, full):
            part = shadow.numel()
            padded = torch.cat([t, torch.full((part * old_world - t.numel(),), float("nan"))])  # padding: never read
            shadow.copy_(padded[r * part:(r + 1) * part])
        e.updates = 11
        old_states.append(e.state_dict())
    monkeypatch.setattr(ema_module.dist, "is_initialized", lambda: True)
    for r in range(new_world):
        monkeypatch.setattr(ema_module.dist, "get_rank", lambda r=r: r)
        e = EMA(_fake_zero3(numels, new_world), 0.5)
        for s in e.shadow:
            s.fill_(float("nan"))
        e.load_resharded(old_states)
        assert e.decay == 0.5 and e.updates == 11  # the decay stays this run's (its config), the count is loaded
        for shadow, t in zip(e.shadow, full):
            part = shadow.numel()
            want = torch.cat([t, torch.zeros(part * new_world - t.numel())])[r * part:(r + 1) * part]
            assert torch.equal(shadow, want)


def test_saved_layout(tmp_path):
    (tmp_path / "checkpoints" / "step00000004").mkdir(parents=True)
    assert ckpt.saved_layout(tmp_path, "dalle", "step00000004") is None
    # a checkpoint from before layout.json: the run's DeepSpeed config tells
    ds = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "zero_optimization": {"stage": 3}}
    (tmp_path / "dalle_ds_config.json").write_text(json.dumps(ds))
    assert ckpt.saved_layout(tmp_path, "dalle", "step00000004") == {
        "world_size": 4, "micro_batch": 4, "train_batch_size": 32, "zero_stage": 3}
    layout = {"world_size": 2, "micro_batch": 16, "train_batch_size": 32, "zero_stage": 2}
    (tmp_path / "checkpoints" / "step00000004" / "layout.json").write_text(json.dumps(layout))
    assert ckpt.saved_layout(tmp_path, "dalle", "step00000004") == layout
    for damaged in ("{", "[1, 2]", '{"world_size": "two"}'):  # one clear error, not json's or int()'s traceback
        (tmp_path / "checkpoints" / "step00000004" / "layout.json").write_text(damaged)
        with pytest.raises(ckpt.CheckpointError, match=r"step00000004/layout.json could not be read .*--no-resume"):
            ckpt.saved_layout(tmp_path, "dalle", "step00000004")


def test_an_unreadable_checkpoint_is_one_clear_error(tmp_path):
    """What DeepSpeed's load or torch.load raise on a damaged file becomes a CheckpointError naming the checkpoint."""
    class Engine:
        def load_checkpoint(self, load_dir, tag):
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint .*step00000004 could not be read \(RuntimeError: "
                                                   r"PytorchStreamReader failed.*earlier tag"):
        ckpt.load_checkpoint(Engine(), tmp_path, "step00000004")

    class Loads(Engine):
        def load_checkpoint(self, load_dir, tag):
            return load_dir, {}

    (tmp_path / "step00000004").mkdir()
    (tmp_path / "step00000004" / "rank0.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ckpt.CheckpointError, match=r"rank0.pt could not be read"):
        ckpt.load_checkpoint(Loads(), tmp_path, "step00000004")


def _losses(run) -> dict[int, float]:
    """The logged training losses by step; the CSV as an uninterrupted run writes it, also after a resume in the
    same folder (one header, each step once, in order: dalle_ds/train/monitor_resume.py)."""
    header, *rows = (run / "monitor" / "dalle" / "dalle_loss.csv").read_text().split()
    steps = [int(r.split(",")[0]) for r in rows]
    assert header == "step,loss" and steps == sorted(set(steps)), (header, steps)
    return {int(s): float(v) for s, v in (r.split(",") for r in rows)}


@pytest.mark.slow
@pytest.mark.distributed
def test_prior_resumes_on_another_number_of_ranks(tmp_path):
    """The paper's precision recipe (16-bit Adam moments, fp16 resblocks with per-resblock scaling), a global batch
    of 32: 2 ranks for 8 updates, ZeRO-3 (the reference); its checkpoint of update 4 resumed on 1 rank; ZeRO-2 on 1
    rank for 4 updates, then 2 ranks. Both resumed runs log the reference's losses and export its averaged weights, to float
    rounding: the same samples per update, the same optimizer state, the same EMA."""
    from launch_utils import ROOT, deepspeed_launch, single_process_env
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 256, 32)
    ds = json.loads(open("ds_configs/cpu_dalle.json").read())
    ds.pop("gradient_accumulation_steps")
    ds["train_batch_size"] = 32  # 16 per rank on 2 ranks, 2 micro-batches of 16 on 1
    (tmp_path / "ds.json").write_text(json.dumps(ds))

    def args(run, stage, *extra):
        return ["--deepspeed_config", str(tmp_path / "ds.json"), "--ds_set", f"zero_optimization.stage={stage}",
                "--preset", "test", "--set", f"data.train_tokens={shards / 'train'}",
                "--set", f"data.val_tokens={shards / 'val'}", "--set", "steps=8", "--set", "save_every=4",
                "--set", "eval_every=0", "--set", "log_every=1", "--set", "data.val_batches=1",
                "--set", "adam_moments=16bit", "--set", "model.resblock_grad_scaling=true",
                "--set", "model.resblock_dtype=float16", "--out", str(run), *extra]

    ref = tmp_path / "ref"
    deepspeed_launch("launch/train_dalle.py", args(ref, 3), num_procs=2)
    want = _losses(ref)
    want_weights = torch.load(ref / "dalle.pt", weights_only=False)["state_dict"]
    # ZeRO-3, 2 ranks -> 1: the reference's own checkpoint of update 4 (as if it had been stopped there)
    zero3 = tmp_path / "zero3_2to1"
    shutil.copytree(ref, zero3, ignore=shutil.ignore_patterns("step00000008", "dalle.pt", "monitor"))
    (zero3 / "checkpoints" / "latest").write_text("step00000004")
    # ZeRO-2, 1 rank -> 2
    zero2 = tmp_path / "zero2_1to2"
    deepspeed_launch("launch/train_dalle.py", args(zero2, 2, "--stop_at", "4"), num_procs=1)
    # its universal copy made ahead of the resume, as one would for a large model (the trainer then reuses it)
    listing = subprocess.run([sys.executable, "launch/checkpoints.py", "--run", str(zero2), "--universal"], cwd=ROOT,
                             env=single_process_env(), capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "| step00000004 | yes | 1 | 16 | 32 | 2 |" in listing.stdout, listing.stdout
    assert (zero2 / "checkpoints" / "step00000004" / "universal" / "zero").is_dir()
    for run, stage, first, then in [(zero3, 3, 2, 1), (zero2, 2, 1, 2)]:
        layout = json.loads((run / "checkpoints" / "step00000004" / "layout.json").read_text())
        assert layout["world_size"] == first
        proc = deepspeed_launch("launch/train_dalle.py", args(run, stage), num_procs=then)
        log = proc.stdout + proc.stderr
        assert f"resuming {run} on {then} rank(s); checkpoint step00000004 was written by {first}" in log
        assert (run / "checkpoints" / "step00000004" / "universal" / "zero").is_dir()
        got = _losses(run)
        assert sorted(got) == list(range(5 if run == zero3 else 1, 9))
        for step in range(5, 9):
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (stage, step, got, want)
        weights = torch.load(run / "dalle.pt", weights_only=False)["state_dict"]
        for k, v in want_weights.items():
            w = weights[k].float()
            # The key bias's gradient is zero but for rounding (softmax ignores a shift of all of a query's scores),
            # and Adam scales rounding noise up to lr-sized steps: compare the query and value biases only.
            if k.endswith("attn.fn.qkv.bias"):
                w, v = w.view(3, -1)[0::2], v.view(3, -1)[0::2]
            torch.testing.assert_close(w, v.float(), rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_another_micro_batch_on_the_same_ranks_resumes_at_the_same_samples(tmp_path):
    """One rank, a global batch of 32: stopped after update 1 with micro-batches of 16 (2 per update), resumed with
    micro-batches of 8 (4 per update). The position (saved in micro-batches) carries over in samples, so updates 2
    and 3 read the samples of an uninterrupted run and log its losses; loaded as saved it skipped ahead (index 2 of
    16-sample micro-batches read as 2 of 8)."""
    from launch_utils import ROOT, single_process_env
    from unit_shards import write_unit_splits

    shards = write_unit_splits(tmp_path / "shards", 256, 32)

    def train(run, micro, accumulation, *extra):
        cmd = [sys.executable, "launch/train_dalle.py", "--deepspeed_config", "ds_configs/cpu_dalle.json",
               "--ds_set", f"train_micro_batch_size_per_gpu={micro}", "--ds_set",
               f"gradient_accumulation_steps={accumulation}", "--preset", "test",
               "--set", f"data.train_tokens={shards / 'train'}", "--set", f"data.val_tokens={shards / 'val'}",
               "--set", "steps=3", "--set", "save_every=0", "--set", "eval_every=0", "--set", "log_every=1",
               "--set", "data.val_batches=1", "--out", str(run), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    full, part = tmp_path / "full", tmp_path / "part"
    train(full, 16, 2)
    train(part, 16, 2, "--stop_at", "1")
    log = train(part, 8, 4)
    assert "data position: 32 samples into epoch 0, from global micro-batches of 16 samples to 8" in log
    want, got = _losses(full), _losses(part)
    assert sorted(got) == [1, 2, 3]
    for step in (2, 3):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), (step, got, want)


def test_a_failed_conversion_says_why_and_leaves_nothing(tmp_path):
    (tmp_path / "step00000004").mkdir()
    (tmp_path / "step00000004" / "rank0.pt").write_bytes(b"not a DeepSpeed checkpoint")
    with pytest.raises(RuntimeError, match="converting .*step00000004 to a universal checkpoint failed"):
        ckpt.universal_tag(tmp_path, "step00000004")
    assert sorted(p.name for p in (tmp_path / "step00000004").iterdir()) == ["rank0.pt"]


def test_checkpoint_listing_and_its_errors(tmp_path, capsys):
    """launch/checkpoints.py on a folder of two checkpoints (one with layout.json, one from before it, read from the
    run's DeepSpeed config), and its refusals."""
    from launch_utils import load_script

    tool = load_script("launch/checkpoints.py", "launch_checkpoints")
    run = tmp_path / "run"
    for tag in ("step00000010", "step00000020"):
        (run / "checkpoints" / tag).mkdir(parents=True)
        (run / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 2**20)
    (run / "checkpoints" / "latest").write_text("step00000020")
    (run / "checkpoints" / "step00000020" / "layout.json").write_text(json.dumps(
        {"world_size": 8, "micro_batch": 2, "train_batch_size": 1024, "zero_stage": 3}))
    (run / "checkpoints" / "step00000020" / "universal").mkdir()
    (run / "checkpoints" / "step00000020" / "universal" / "fp32.pt").write_bytes(b"y" * 2**19)
    (run / "dalle_run_config.json").write_text("{}")
    (run / "dalle_ds_config.json").write_text(json.dumps(
        {"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
         "zero_optimization": {"stage": 2}}))
    assert tool.main(["--run", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == ["| step00000010 |  | 128 | 4 | 1024 | 2 | 1.0 MiB |  |",
                       "| step00000020 | yes | 8 | 2 | 1024 | 3 | 1.0 MiB | 0.5 MiB |"]
    assert tool.main(["--run", str(tmp_path / "nothing")]) == 2
    assert "holds no checkpoints folder" in capsys.readouterr().err
    (run / "checkpoints" / "latest").write_text("step00000030")
    assert tool.main(["--run", str(run), "--universal"]) == 2
    assert "names checkpoint 'step00000030', which does not exist" in capsys.readouterr().err
    (run / "checkpoints" / "latest").write_text("step00000010")
    (run / "checkpoints" / "step00000010" / "layout.json").write_text(json.dumps(
        {"world_size": 2, "micro_batch": 2, "train_batch_size": 4, "zero_stage": 0}))
    assert tool.main(["--run", str(run), "--universal"]) == 2
    assert "step00000010 is a ZeRO-0 checkpoint: it has no sharded optimizer state" in capsys.readouterr().err
    (run / "checkpoints" / "step00000010" / "layout.json").write_text("{")
    assert tool.main(["--run", str(run)]) == 2
    assert "step00000010/layout.json could not be read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.parse_args(["--run", str(run), "--tag", "step00000010"])
