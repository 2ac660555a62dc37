"""The prior's step-size schedule as the paper describes it (App. B.2): a linear warm-up over the first 5,000 updates,
then the step size halved "each time the training loss appeared to plateau", five times in all, ending 32 times below
the peak.

The paper gives no rule for "appeared to plateau"; the rule here is this project's: every ``interval`` updates the
mean training loss over those updates (averaged over ranks) is compared with the best such mean so far, counting
from the end of the warm-up. When ``patience`` interval means in a row fail to beat the best by the relative
``threshold``, the step size is multiplied by ``factor`` (0.5) and the count restarts; at most ``max_halvings`` (5)
times. Its defaults (1,000-update intervals, patience 5, threshold 0.2%) are a guess sized for the paper's 430k
updates, not a measured choice.

It is chosen in the DeepSpeed config, as a scheduler type of its own::

    "scheduler": {"type": "PlateauHalving",
                  "params": {"warmup_num_steps": "auto", "interval": 1000, "patience": 5, "threshold": 0.002}}

DeepSpeed has no scheduler of that name: :class:`PlateauExtension` takes the section out of the config DeepSpeed is
given and hands DeepSpeed this scheduler as a client scheduler instead. DeepSpeed then steps it after every applied
update (not after an update skipped for overflow), and saves and restores its state in its checkpoints.

Host syncs: each update's loss is added up on the device; only at an interval's end is the sum all-reduced and read,
one scalar all-reduce per ``interval`` updates. Before a checkpoint every rank folds its partial interval sum into
the (replicated) state with one more all-reduce, so a resumed run judges the same intervals as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

from dalle_ds.config import ConfigError
from dalle_ds.train.distributed import all_reduce_mean, is_rank0

log = logging.getLogger("dalle_ds.train")

SCHEDULER_TYPE = "PlateauHalving"
#: Parameters of the ``PlateauHalving`` scheduler section and their defaults (warm-up: the paper's 5,000 updates).
DEFAULTS: dict[str, Any] = {"warmup_num_steps": 5000, "interval": 1000, "patience": 5, "threshold": 0.002,
                            "max_halvings": 5, "factor": 0.5}


def plateau_params(ds_config: dict[str, Any], where: str = "deepspeed config") -> dict[str, Any] | None:
    """The checked parameters of a ``PlateauHalving`` scheduler section (defaults filled), or None for any other
    scheduler (or none)."""
    sched = ds_config.get("scheduler")
    if not isinstance(sched, dict) or sched.get("type") != SCHEDULER_TYPE:
        return None
    given = sched.get("params") or {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: scheduler {SCHEDULER_TYPE} has no parameter {', '.join(unknown)} "
                          f"(its parameters: {', '.join(DEFAULTS)})")
    p = {**DEFAULTS, **given}

    def check(name: str, ok: bool, want: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: scheduler.params.{name} must be {want}, got {p[name]!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    check("warmup_num_steps", is_int(p["warmup_num_steps"]) and p["warmup_num_steps"] >= 0, 'an int ≥ 0 (or "auto")')
    check("interval", is_int(p["interval"]) and p["interval"] >= 1, "an int ≥ 1 (updates per judged mean)")
    check("patience", is_int(p["patience"]) and p["patience"] >= 1, "an int ≥ 1 (interval means)")
    check("threshold", is_num(p["threshold"]) and 0 <= p["threshold"] < 1, "a number in [0, 1)")
    check("max_halvings", is_int(p["max_halvings"]) and p["max_halvings"] >= 0, "an int ≥ 0")
    check("factor", is_num(p["factor"]) and 0 < p["factor"] < 1, "a number in (0, 1)")
    return p


class PlateauHalving:
    """Linear warm-up, then the step size cut by ``factor`` when the interval-mean training loss stops improving.

    DeepSpeed calls :meth:`step` after each applied update; the trainer calls :meth:`observe` with every update's
    loss and :meth:`flush` on every rank before a checkpoint. Update ``n`` (1-based, counting applied updates) runs
    at ``lr · min(1, n / warmup_num_steps) · factor ** halvings``, ``lr`` being each param group's configured rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_num_steps: int, interval: int, patience: int,
                 threshold: float, max_halvings: int, factor: float):
        self.optimizer = optimizer
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.warmup, self.interval, self.patience = warmup_num_steps, interval, patience
        self.threshold, self.max_halvings, self.factor = threshold, max_halvings, factor
        self.updates = 0  # applied updates (DeepSpeed's step calls)
        self.halvings = 0
        self.best = math.inf  # best interval mean since the warm-up ended
        self.bad = 0  # interval means in a row that did not beat best by the threshold
        self.carried = 0.0  # the current interval's loss sum up to the last flush, averaged over ranks
        self._local: torch.Tensor | None = None  # this rank's loss sum since the last interval end or flush
        self._apply()

    # -- DeepSpeed's scheduler interface ------------------------------------------------------------------------
    def ratio(self) -> float:
        warm = 1.0 if self.warmup == 0 else min(1.0, (self.updates + 1) / self.warmup)
        return warm * self.factor ** self.halvings

    def _apply(self) -> None:
        r = self.ratio()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * r

    def step(self, *args, **kwargs) -> None:
        self.updates += 1
        self._apply()

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    get_last_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "halvings": self.halvings, "best": self.best, "bad": self.bad,
                "carried": self.carried, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.halvings = int(state["updates"]), int(state["halvings"])
        self.best, self.bad, self.carried = float(state["best"]), int(state["bad"]), float(state["carried"])
        # The base rates stay this run's (optimizer.params.lr of its DeepSpeed config), as DeepSpeed's own schedulers
        # keep theirs: a resume that changes the rate applies it, with the halvings so far, and says so.
        saved = [float(x) for x in state["base_lrs"]]
        if saved != [float(x) for x in self.base_lrs] and is_rank0():
            log.warning("%s: the base learning rate changes from %s (checkpoint) to %s (this run's optimizer.params.lr)"
                        "; %d halving(s) so far apply to it", SCHEDULER_TYPE, saved[0], self.base_lrs[0],
                        self.halvings)
        self._local = None
        self._apply()

    # -- fed by the trainer -------------------------------------------------------------------------------------
    def observe(self, loss: torch.Tensor | float, global_step: int) -> dict[str, float] | None:
        """Add this rank's loss of the update that made ``global_step``; when that step ends an interval, judge the
        interval (a collective: every rank calls this at every step) and return ``{"interval_loss", "halved"}``, the
        same on every rank (the halvings so far are logged with every log step's stats); otherwise None (no host
        sync)."""
        t = torch.as_tensor(loss, dtype=torch.float64).detach().reshape(())
        self._local = t if self._local is None else self._local + t.to(self._local.device)
        if global_step % self.interval:
            return None
        mean = (self.carried + self._reduce()) / self.interval
        self.carried = 0.0
        return self._judge(mean)

    def flush(self) -> None:
        """Fold every rank's partial interval sum into the replicated state (a collective: call on every rank,
        before DeepSpeed writes the checkpoint)."""
        self.carried += self._reduce()

    def _reduce(self) -> float:
        """This rank's sum since the last call, averaged over ranks (a collective, on the training device)."""
        s, self._local = self._local, None
        return all_reduce_mean({"sum": 0.0 if s is None else float(s)})["sum"]

    def _judge(self, mean: float) -> dict[str, float]:
        halved = False
        if self.updates >= self.warmup and math.isfinite(mean):
            if mean < self.best * (1.0 - self.threshold):
                self.best, self.bad = mean, 0
            else:
                self.bad += 1
                if self.bad >= self.patience and self.halvings < self.max_halvings:
                    self.halvings, self.bad, halved = self.halvings + 1, 0, True
                    self._apply()
        return {"interval_loss": mean, "halved": float(halved)}


class PlateauExtension:
    """Runs :class:`PlateauHalving` under DeepSpeed for an EngineLoop trainer (see the module docstring)."""

    name = "plateau"

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self.scheduler: PlateauHalving | None = None

    def client_lr_scheduler(self, ds_config: dict[str, Any]) -> tuple[dict[str, Any], Callable]:
        """The config DeepSpeed gets (without the scheduler section) and the scheduler factory it calls with the
        optimizer it built."""
        def build(optimizer: torch.optim.Optimizer) -> PlateauHalving:
            self.scheduler = PlateauHalving(optimizer, **self.params)
            return self.scheduler

        return {k: v for k, v in ds_config.items() if k != "scheduler"}, build

    def after_update(self, loop: Any, stats: dict[str, Any]) -> None:
        if "loss" not in stats:
            raise KeyError(f"the {SCHEDULER_TYPE} scheduler judges the training loss, but {type(loop).__name__}'s "
                           "train_step returns no 'loss'")
        step = loop.engine.global_steps
        judged = self.scheduler.observe(stats["loss"], step)
        if judged is not None:
            loop.log(loop.job_name, judged, step)
            if judged["halved"]:
                log.info("step %d: training loss plateaued (interval mean %.4g, best %.4g): step size halved, "
                         "%d of %d halvings", step, judged["interval_loss"], self.scheduler.best,
                         self.scheduler.halvings, self.scheduler.max_halvings)

    def before_save(self, loop: Any) -> None:
        self.scheduler.flush()

    def stats(self) -> dict[str, float]:
        return {"lr_halvings": float(self.scheduler.halvings)}
