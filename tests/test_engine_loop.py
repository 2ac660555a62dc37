"""The shared training loop's statistics (dalle_ds/train/engine_loop.py) without host syncs: the per-update means and
gradient-norm statistics stay on the device until a logged step reads them, with the numbers the former per-step
``float()`` conversions gave; and an update keeps no micro-batch's outputs beyond that micro-batch."""
import functools
import gc
import math
import operator
import weakref
from types import SimpleNamespace

import pytest
import torch

from dalle_ds.train.ema import EMA
from dalle_ds.train.engine_loop import EngineLoop


class _Engine:
    """What micro_steps / grad_norm_stats use of a DeepSpeed engine."""

    def __init__(self, accumulation, norms, clip):
        self.module = torch.nn.Linear(3, 2)
        self.accumulation, self.norms, self.clip = accumulation, list(norms), clip
        self.backwards = self.micro_steps = self.global_steps = 0

    def gradient_accumulation_steps(self):
        return self.accumulation

    def backward(self, loss):
        self.backwards += 1

    def step(self):  # an optimizer update at the last micro-step of an accumulation, as DeepSpeed counts them
        self.micro_steps += 1
        self.global_steps += self.micro_steps % self.accumulation == 0

    def get_global_grad_norm(self):
        return self.norms.pop(0)

    def get_lr(self):  # the scheduler steps inside step(): the rate an update ran with is the one before it
        return [0.25 / (1 + self.global_steps)]

    def gradient_clipping(self):
        return self.clip


def _loop(accumulation, norms, clip):
    loop = EngineLoop.__new__(EngineLoop)  # the machinery alone: no data, run folder or process group
    loop.engine = _Engine(accumulation, norms, clip)
    loop.extensions = []
    loop.ema = EMA(loop.engine.module, 0.9)
    loop._grad_norms = None
    return loop


def _outputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [SimpleNamespace(loss=torch.rand((), generator=g) * 3, nll=torch.rand((), generator=g, dtype=torch.float64),
                            kl=torch.rand((), generator=g).to(torch.bfloat16), logits=torch.randn(64, 64, generator=g))
            for _ in range(n)]


def test_update_means_are_the_former_float_means_and_stay_tensors():
    accumulation, keys = 3, ("loss", "nll", "kl")
    loop = _loop(accumulation, [torch.tensor(1.0)] * 4, 0.0)
    for step in range(4):
        outs = _outputs(accumulation, step)
        feed = iter(outs)
        stats = loop.micro_steps(iter(range(accumulation)), lambda b, i: next(feed), keys)
        assert stats.pop("lr") == 0.25 / (1 + step)  # read before the update's engine.step() calls
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
        # the former trainers' running float sum in micro-batch order (not sum(): Python 3.12's compensates)
        former = {k: functools.reduce(operator.add, (float(getattr(o, k).detach()) for o in outs)) / len(outs)
                  for k in keys}
        assert EngineLoop.to_floats({**stats, "lr": 0.5}) == {**former, "lr": 0.5}  # exactly, not approximately
    assert loop.engine.backwards == 4 * accumulation and loop.ema.updates == 4


def test_a_micro_batch_output_is_released_before_the_next_forward():
    loop = _loop(4, [None], 0.0)
    alive = []

    def forward(batch, micro):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        logits = torch.randn(256, 256, requires_grad=True)
        refs.append(weakref.ref(logits))
        return SimpleNamespace(loss=logits.sum() * 0, logits=logits)  # the loss holds the graph back to them

    refs: list = []
    loop.micro_steps(iter(range(4)), forward, ("loss",))
    gc.collect()
    assert alive == [0, 0, 0, 0] and all(r() is None for r in refs)


def _former_grad_norm_stats(norms, clip):
    finite = [float(n) for n in norms if n is not None and math.isfinite(float(n))]
    if not finite:
        return {}
    out = {"grad_norm": sum(finite) / len(finite)}
    if clip > 0:
        out["grad_clipped"] = sum(n > clip for n in finite) / len(finite)
    return out


def test_grad_norm_stats_are_the_former_ones():
    g = torch.Generator().manual_seed(0)
    norms = [torch.rand((), generator=g) * 8 for _ in range(7)]
    norms[2], norms[5] = torch.tensor(float("inf")), torch.tensor(float("nan"))  # skipped updates: not counted
    norms.insert(3, 3.25)  # DeepSpeed hands some norms over as Python floats
    norms.insert(4, float("inf"))
    for clip in (0.0, 4.0):
        loop = _loop(1, list(norms) + [float("inf"), None], clip)
        for _ in norms:
            loop.micro_steps(iter([0]), lambda b, i: SimpleNamespace(loss=torch.tensor(0.0)), ("loss",))
        assert loop.grad_norm_stats() == _former_grad_norm_stats(norms, clip)  # exactly
        assert loop.grad_norm_stats() == {}  # nothing since the last call
        for _ in range(2):  # only a skipped update and one without a norm: nothing to report
            loop.micro_steps(iter([0]), lambda b, i: SimpleNamespace(loss=torch.tensor(0.0)), ("loss",))
        assert loop.grad_norm_stats() == {}


def test_to_floats_reads_tensors_and_keeps_numbers():
    stats = {"loss": torch.tensor(1.5, dtype=torch.float64), "logit_scale": torch.tensor([14.25]), "lr": 1e-3,
             "skip": 0.0, "name": "x"}
    assert EngineLoop.to_floats(stats) == {"loss": 1.5, "logit_scale": 14.25, "lr": 1e-3, "skip": 0.0, "name": "x"}


def test_pace_counts_updates_samples_and_the_wait_for_batches(monkeypatch):
    """perf/*: seconds per update, global samples per second and the share of the time spent waiting in next()
    for a batch, over the interval since the last restart (a fake clock: each batch takes 0.25 s to arrive, each
    update 0.75 s of work)."""
    from dalle_ds.train import engine_loop

    clock = [100.0]
    monkeypatch.setattr(engine_loop.time, "perf_counter", lambda: clock[0])

    def slow_batches():
        while True:
            clock[0] += 0.25
            yield {}

    batches = engine_loop.WaitTimed(slow_batches())
    pace = engine_loop.Pace(10, batches)
    for _ in range(4):  # updates 11..14
        next(batches)
        clock[0] += 0.75
    got = pace.stats(14, global_batch=32)
    assert got == pytest.approx({"perf/step_seconds": 1.0, "perf/samples_per_second": 32.0,
                                 "perf/data_wait_fraction": 0.25})
    clock[0] += 60.0  # a save or an evaluation
    pace.restart(14)
    next(batches)
    clock[0] += 0.75
    assert pace.stats(15, global_batch=32)["perf/step_seconds"] == pytest.approx(1.0)
    assert pace.stats(15, 32)["perf/data_wait_fraction"] == pytest.approx(0.25) and pace.stats(14, 32) == {}
