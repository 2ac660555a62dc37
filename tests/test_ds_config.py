import json

import pytest

from dalle_ds.config import ConfigError
from dalle_ds.train.ds_config import apply_ds_overrides, load_ds_config, prepare_ds_config, resolve_batch_sizes


def test_batch_sizes_are_resolved_and_checked():
    assert resolve_batch_sizes({"train_micro_batch_size_per_gpu": 4}, 2) == (8, 4, 1)
    assert resolve_batch_sizes({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2) == (32, 4, 4)
    assert resolve_batch_sizes({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 2) == (32, 8, 2)
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_batch_sizes({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2)
    with pytest.raises(ConfigError, match="≠"):
        resolve_batch_sizes({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                             "gradient_accumulation_steps": 2}, 2)
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_batch_sizes({"train_micro_batch_size_per_gpu": 0}, 1)


def test_auto_values_are_filled_and_unfillable_autos_rejected(tmp_path):
    raw = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 5}},
           "tensorboard": {"enabled": True, "output_path": "auto", "job_name": "auto"}}
    cfg = prepare_ds_config(raw, steps=100, run_dir=tmp_path, job_name="dvae", world_size=2, accelerator="cpu")
    assert cfg["scheduler"]["params"]["total_num_steps"] == 100
    assert cfg["tensorboard"]["output_path"].startswith(str(tmp_path))
    assert cfg["tensorboard"]["job_name"] == "dvae" and cfg["train_batch_size"] == 4
    assert raw["scheduler"]["params"]["total_num_steps"] == "auto"  # input untouched
    with pytest.raises(ConfigError, match="optimizer.params.lr"):
        prepare_ds_config({**raw, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, steps=10,
                          run_dir=tmp_path, job_name="x", world_size=1, accelerator="cpu")
    with pytest.raises(ConfigError, match="fp16"):
        prepare_ds_config({**raw, "fp16": {"enabled": True}}, steps=10, run_dir=tmp_path, job_name="x",
                          world_size=1, accelerator="cpu")
    with pytest.raises(ConfigError, match="warmup_num_steps 5 exceeds"):
        prepare_ds_config(raw, steps=3, run_dir=tmp_path, job_name="x", world_size=1, accelerator="cpu")


def test_shipped_configs_parse_and_prepare(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shipped = sorted(root.joinpath("ds_configs").glob("*.json"))
    experiments = sorted(root.joinpath("benchmarks/configs").glob("*.json"))
    assert shipped and experiments  # a moved folder must fail here, not pass on an empty list
    for path in shipped + experiments:
        raw = load_ds_config(path)
        accel = "cuda" if raw.get("fp16", {}).get("enabled") else "cpu"
        prepare_ds_config(raw, steps=1000, run_dir=tmp_path, job_name="t", world_size=2, accelerator=accel)
        # a monitor turned off from the command line keeps its "auto" values: still a valid config (the GPU
        # session's precision stage runs with --ds_set tensorboard.enabled=false)
        for mon in ("tensorboard", "csv_monitor"):
            if isinstance(raw.get(mon), dict):
                off = apply_ds_overrides(raw, [f"{mon}.enabled=false"])
                prepare_ds_config(off, steps=1000, run_dir=tmp_path, job_name="t", world_size=2, accelerator=accel)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_ds_config(tmp_path / "nope.json")
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_ds_config(p)


def test_ds_set_overrides_existing_keys_and_adds_only_with_plus():
    raw = {"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW", "params": {"lr": 2e-3}},
           "scheduler": {"params": {"warmup_num_steps": "auto"}}}
    cfg = apply_ds_overrides(raw, ["optimizer.params.lr=1e-3", "scheduler.params.warmup_num_steps=30",
                                   "optimizer.type=Adam", "+optimizer.params.betas=[0.9, 0.95]",
                                   "+zero_optimization.stage=2"])
    assert cfg["optimizer"] == {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}}
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 30 and cfg["zero_optimization"] == {"stage": 2}
    assert raw["optimizer"]["params"] == {"lr": 2e-3}  # input untouched
    assert apply_ds_overrides(raw, []) == raw
    with pytest.raises(ConfigError, match="no 'optimizer.params.lrr'.*keys there: lr"):
        apply_ds_overrides(raw, ["optimizer.params.lrr=1e-3"])
    with pytest.raises(ConfigError, match="no 'bf16'"):
        apply_ds_overrides(raw, ["bf16.enabled=true"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_ds_overrides(raw, ["optimizer=1"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_ds_overrides(raw, ["+train_micro_batch_size_per_gpu.x=1"])
    with pytest.raises(ConfigError, match="--ds_set expects key=value"):
        apply_ds_overrides(raw, ["optimizer.params.lr"])


def test_batch256_experiment_configs_are_the_shipped_config_with_overrides():
    """The tracked experiment configs are ds_configs/cpu_dalle.json plus a few values; --ds_set derives the same."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    base = load_ds_config(root / "ds_configs/cpu_dalle.json")
    b256 = ["train_micro_batch_size_per_gpu=64"]
    wu30 = b256 + ["scheduler.params.warmup_num_steps=30"]
    for name, sets in [("cpu_dalle_b256", b256), ("cpu_dalle_b256_wu30", wu30),
                       ("cpu_dalle_b256_wu30_lr1e-3", wu30 + ["optimizer.params.lr=1e-3"])]:
        assert apply_ds_overrides(base, sets) == load_ds_config(root / f"benchmarks/configs/{name}.json"), name


def test_train_cli_reports_a_bad_ds_set_before_starting(tmp_path):
    """The shared training CLI (here the dVAE's, whose shapes preset needs no data) refuses it with exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "launch/train_dvae.py", "--deepspeed_config", "ds_configs/cpu_dvae.json",
                           "--out", str(tmp_path / "run"), "--ds_set", "optimizer.params.lrr=1e-3"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: --ds_set optimizer.params.lrr: the config has no" in proc.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / "a_file").write_text("x")  # --out under a file: the parser says so (it was a NotADirectoryError)
    proc = subprocess.run([sys.executable, "launch/train_dvae.py", "--deepspeed_config", "ds_configs/cpu_dvae.json",
                           "--out", str(tmp_path / "a_file" / "run")], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "--out" in proc.stderr and "is a file, not a folder" in proc.stderr, proc.stderr


def test_near_miss_keys_missing_optimizer_bad_params_and_clipping(tmp_path, caplog):
    """What DeepSpeed would ignore or only fail on late: refused here with the key named."""
    raw = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3,
           "betas": [0.9, 0.95], "torch_adam": True}}, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}

    def prep(cfg):
        return prepare_ds_config(cfg, steps=10, run_dir=tmp_path, job_name="x", world_size=1, accelerator="cpu")

    prep(raw)
    for bad, needle in [
        ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation' \\(did you mean 'zero_optimization'"),
        ({"gradient_cliping": 1.0}, "did you mean 'gradient_clipping'"),
        ({"gradient_clipping": -1}, "gradient_clipping must be a finite number ≥ 0"),
        ({"gradient_clipping": float("nan")}, "gradient_clipping must be a finite number ≥ 0"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}}, "optimizer.params.lr must be a number"),
        ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, "x"]}}}, "optimizer.params.betas"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": float("inf")}}}, "optimizer.params.lr must be finite"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": -1e-3}}}, "optimizer.params.lr must be ≥ 0"),
        ({"optimizer": {"type": "NoSuchOpt", "params": {"lr": 1e-3}}}, "optimizer.type 'NoSuchOpt' is not one"),
        ({"optimizer": None}, "needs an \"optimizer\" section"),
        ({"scheduler": {"type": "NoSuchLR"}}, "scheduler.type 'NoSuchLR' is not a scheduler DeepSpeed knows"),
        ({"scheduler": "WarmupLR"}, "'scheduler' must be a JSON object"),
        ({"scheduler": {"type": "WarmupLR", "params": 5}}, "'scheduler.params' must be a JSON object"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "abc"}}},
         "scheduler.params.warmup_num_steps must be an int ≥ 0"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": -3}}},
         "scheduler.params.warmup_num_steps must be an int ≥ 0"),
        ({"fp16": True}, "'fp16' must be a JSON object"),
        ({"bf16": "yes"}, "'bf16' must be a JSON object"),
        ({"zero_optimization": 2}, "'zero_optimization' must be a JSON object"),
        ({"zero_optimization": "null"}, "'zero_optimization' must be a JSON object .*got null"),
        ({"optimizer": {"type": "AdamW", "params": [1]}}, "'optimizer.params' must be a JSON object"),
    ]:
        bad = {k: (None if v == "null" else v) for k, v in bad.items()}
        if "zero_optimization" in bad and bad["zero_optimization"] is None:
            with pytest.raises(ConfigError, match=needle):
                prep({**raw, **bad})
            continue
        with pytest.raises(ConfigError, match=needle):
            prep({k: v for k, v in {**raw, **bad}.items() if v is not None})
    for good in ({"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}},
                 {"type": "StepLR", "params": {"step_size": 2}}, {"type": "PlateauHalving"}):
        prep({**raw, "scheduler": good})  # DeepSpeed's, torch's and this project's own
    prep({**raw, "optimizer": {"type": "adam", "params": {"lr": 1e-3}}})  # DeepSpeed's names in any case
    prep({**raw, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}})   # a torch.optim class
    with caplog.at_level("WARNING", logger="dalle_ds.train"):
        prep({**raw, "my_own_section": {}})  # unlike any known key: a warning, not an error
    assert "my_own_section" in caplog.text


def _lr_at(ds_config: dict, step: int) -> float:
    """The learning rate DeepSpeed's scheduler of ``ds_config`` gives at update ``step``."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    params = ds_config["optimizer"]["params"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=params["lr"])
    sched = WarmupCosineLR(opt, **ds_config["scheduler"]["params"])
    sched.step(step)
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("steps, warmup", [(430_000, 5000), (100_000, 5000), (1500, 75), (10, 2), (2, 2), (1, 1)])
def test_auto_warmup_is_the_papers_5000_updates_or_a_twentieth(steps, warmup):
    raw = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}}}
    cfg = prepare_ds_config(raw, steps=steps, run_dir="/tmp/x", job_name="j", world_size=1, accelerator="cpu")
    assert cfg["scheduler"]["params"] == {"total_num_steps": steps, "warmup_num_steps": warmup}


def test_paper_schedules():
    """dVAE (paper App. A.2): cosine from 1e-4 to 1.25e-6 over 1,200,000 updates, then held for the rest of the
    3,000,000. Prior (App. B.2): linear warm-up over 5,000 updates from 4.5e-4, ending 32x lower (the paper halves
    the step size five times on plateaus; here a cosine)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ds_configs"
    dvae = prepare_ds_config(json.loads((root / "dvae_paper.json").read_text()), steps=3_000_000, run_dir="/tmp/x",
                             job_name="j", world_size=64, accelerator="cuda")
    assert _lr_at(dvae, 2) == pytest.approx(1e-4)
    assert _lr_at(dvae, 600_000) == pytest.approx(1e-4 * (0.0125 + 0.9875 * 0.5), rel=1e-3)  # halfway
    assert _lr_at(dvae, 1_200_000) == pytest.approx(1.25e-6) and _lr_at(dvae, 2_999_999) == pytest.approx(1.25e-6)
    for name in ("zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json", "zero2_fp16_resblock.json"):
        prior = prepare_ds_config(json.loads((root / name).read_text()), steps=430_000, run_dir="/tmp/x",
                                  job_name="j", world_size=64, accelerator="cuda")
        assert _lr_at(prior, 2500) == pytest.approx(4.5e-4 / 2), name
        assert _lr_at(prior, 5000) == pytest.approx(4.5e-4, rel=1e-6), name
        assert _lr_at(prior, 430_000) == pytest.approx(4.5e-4 / 32), name


def test_a_missing_config_names_the_closest_file_of_its_folder(tmp_path):
    (tmp_path / "cpu_dvae.json").write_text("{}")
    (tmp_path / "zero3_bf16.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"file not found: .*cpu_dave.json; did you mean "
                                          f"{tmp_path / 'cpu_dvae.json'}\\?$"):
        load_ds_config(tmp_path / "cpu_dave.json")
    with pytest.raises(ConfigError) as e:
        load_ds_config(tmp_path / "nothing_alike.json")
    assert "file not found" in str(e.value) and "did you mean" not in str(e.value)


def test_precision_mode():
    from dalle_ds.train.ds_config import precision_mode

    assert precision_mode({"bf16": {"enabled": True}, "fp16": {"enabled": False}}) == "bf16"
    assert precision_mode({"bfloat16": {"enabled": True}}) == "bf16"  # DeepSpeed's older name
    assert precision_mode({"fp16": {"enabled": True}}) == "fp16"
    assert precision_mode({"bf16": {"enabled": False}}) == precision_mode({}) == "fp32"
    with pytest.raises(ConfigError, match="both true"):
        precision_mode({"bf16": {"enabled": True}, "fp16": {"enabled": True}})


def test_nonfinite_check_off():
    from dalle_ds.train.ds_config import nonfinite_check_off

    def cfg(stage, **extra):
        return {"zero_optimization": {"stage": stage, **extra.pop("zero", {})}, **extra}

    assert nonfinite_check_off(cfg(2)) is None and nonfinite_check_off(cfg(1, bf16={"enabled": True})) is None
    assert nonfinite_check_off(cfg(2, zero={"compute_grad_norm": False})) == "zero_optimization.compute_grad_norm=false"
    assert nonfinite_check_off(cfg(1, bf16={"enabled": True, "check_grad_overflow": False})) == \
        "bf16.check_grad_overflow=false"
    assert nonfinite_check_off(cfg(2, bf16={"enabled": True}, zero={"compute_grad_norm": False})) is None
    assert nonfinite_check_off(cfg(3, zero={"compute_grad_norm": False})) is None  # ZeRO-3 always checks
    assert nonfinite_check_off(cfg(0, zero={"compute_grad_norm": False})) is None  # ZeRO-0: the callers' matter
