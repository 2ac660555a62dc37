"""The paper's step-size schedule (dalle_ds/train/plateau.py): linear warm-up, then halving when the interval-mean
training loss stops improving, at most five times; its state survives a checkpoint taken mid-interval; its
DeepSpeed-config section is checked before a run starts."""
import math

import pytest
import torch

from dalle_ds.config import ConfigError
from dalle_ds.train.ds_config import prepare_ds_config
from dalle_ds.train.plateau import DEFAULTS, PlateauHalving, plateau_params


def _sched(**kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.02})
    params = {**DEFAULTS, "warmup_num_steps": 4, "interval": 2, "patience": 2, "threshold": 0.01, **kw}
    return opt, PlateauHalving(opt, **params)


def _run(sched, losses, start=0):
    """Feed one loss per update as the trainer does (DeepSpeed steps the scheduler, then the trainer observes);
    returns the learning rates used by each update and the judged intervals."""
    lrs, judged = [], []
    for i, loss in enumerate(losses, start=start + 1):
        lrs.append(sched.get_lr())
        sched.step()
        out = sched.observe(torch.tensor(loss, dtype=torch.float64), i)
        if out is not None:
            judged.append((i, out))
    return lrs, judged


def test_linear_warmup_then_the_configured_rate_per_group():
    opt, s = _sched(warmup_num_steps=4)
    lrs, _ = _run(s, [1.0 / (i + 1) for i in range(8)])  # improving: no halving
    assert [lr[0] for lr in lrs] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert [lr[1] for lr in lrs] == pytest.approx([0.005, 0.01, 0.015, 0.02, 0.02, 0.02, 0.02, 0.02])
    _, none = _sched(warmup_num_steps=0)
    assert none.get_lr() == pytest.approx([0.1, 0.02])


def test_halves_after_patience_flat_intervals_and_at_most_max_halvings():
    # intervals of 2 updates; warm-up 4 updates (intervals 1-2 not judged), then the loss improves for 2
    # intervals and goes flat: 2 flat intervals (patience) halve the rate, twice more flat halve again...
    losses = [5, 5, 4, 4, 3, 3, 2, 2] + [2] * 40
    _, s = _sched(max_halvings=3)
    lrs, judged = _run(s, losses)
    halved_at = [i for i, out in judged if out["halved"]]
    assert halved_at == [12, 16, 20]  # intervals ending at 10, 12 flat -> halve at 12; then 14, 16; 18, 20
    assert s.halvings == 3 and lrs[-1][0] == pytest.approx(0.1 / 8)
    assert [out["interval_loss"] for i, out in judged[:4]] == [5, 4, 3, 2]
    # a gain smaller than the threshold counts as flat
    _, s = _sched(threshold=0.1, patience=1)
    _, judged = _run(s, [5, 5, 4, 4, 3, 3, 2.9, 2.9, 2.0, 2.0])
    assert [i for i, out in judged if out["halved"]] == [8]


def test_warmup_intervals_are_not_judged_and_nonfinite_means_are_skipped():
    _, s = _sched(warmup_num_steps=10, patience=1)
    _, judged = _run(s, [1.0] * 10)  # flat, but inside the warm-up
    assert s.halvings == 0 and len(judged) == 5
    _, s = _sched(patience=1)
    _, judged = _run(s, [3, 3, 2, 2, 1, 1, math.inf, 1, 0.5, 0.5])
    assert s.halvings == 0 and math.isinf(judged[3][1]["interval_loss"])


def test_state_survives_a_checkpoint_taken_mid_interval():
    losses = [5, 5, 4, 4, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2]  # flat from update 7: halved at 15
    _, full = _sched(patience=2, interval=3)
    lrs_full, judged_full = _run(full, losses)
    assert full.halvings >= 1
    _, first = _sched(patience=2, interval=3)
    lrs_a, judged_a = _run(first, losses[:8])  # update 8 is mid-interval (intervals end at 3, 6, 9...)
    first.flush()
    state = first.state_dict()
    opt, resumed = _sched(patience=2, interval=3)
    for g in opt.param_groups:
        g["lr"] = 123.0  # whatever the optimizer holds, the loaded state sets the rates
    resumed.load_state_dict(state)
    lrs_b, judged_b = _run(resumed, losses[8:], start=8)
    assert lrs_a + lrs_b == lrs_full and judged_a + judged_b == judged_full


def test_config_section_is_checked_and_filled(tmp_path):
    base = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    assert plateau_params(base) is None
    assert plateau_params({**base, "scheduler": {"type": "WarmupCosineLR", "params": {}}}) is None
    cfg = {**base, "scheduler": {"type": "PlateauHalving", "params": {"interval": 10}}}
    ready = prepare_ds_config(cfg, steps=1000, run_dir=tmp_path, job_name="dalle", world_size=1, accelerator="cpu")
    assert ready["scheduler"]["params"] == {"interval": 10, "warmup_num_steps": 50}  # "auto": 1/20 of the run
    assert plateau_params(ready) == {**DEFAULTS, "interval": 10, "warmup_num_steps": 50}
    for params, match in (({"patiense": 3}, "no parameter patiense"), ({"interval": 0}, "interval"),
                          ({"threshold": 1.0}, "threshold"), ({"factor": 1}, "factor"),
                          ({"max_halvings": True}, "max_halvings"), ({"warmup_num_steps": 2000}, "exceeds")):
        bad = {**base, "scheduler": {"type": "PlateauHalving", "params": params}}
        with pytest.raises(ConfigError, match=match):
            prepare_ds_config(bad, steps=1000, run_dir=tmp_path, job_name="dalle", world_size=1, accelerator="cpu")



def test_a_resume_with_another_base_rate_applies_it(caplog):
    """optimizer.params.lr changed on resume: the halvings so far apply to the new base rate (DeepSpeed's own
    schedulers also take the new rate), with a warning; the checkpoint's base rate used to win silently."""
    _, first = _sched(patience=1)
    _run(first, [3.0] * 10)  # flat after the warm-up: halved
    assert first.halvings >= 1
    state = first.state_dict()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)  # the new run's config: 10x the rate
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2})
    resumed = PlateauHalving(opt, **{**DEFAULTS, "warmup_num_steps": 4, "interval": 2, "patience": 1,
                                     "threshold": 0.01})
    with caplog.at_level("WARNING", logger="dalle_ds.train"):
        resumed.load_state_dict(state)
    assert resumed.get_lr() == pytest.approx([1.0 * 0.5 ** first.halvings, 0.2 * 0.5 ** first.halvings])
    assert "the base learning rate changes from 0.1 (checkpoint) to 1.0" in caplog.text
