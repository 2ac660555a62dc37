"""A data order that is a pure function of (seed, epoch, rank), so a resumed run sees exactly the batches an
uninterrupted one would have seen."""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dalle_ds.config import ConfigError, DataConfig
from dalle_ds.train.distributed import is_rank0
from dalle_ds.utils.seeds import sample_seed, seed63

__all__ = ["ResumableSampler", "EpochTagged", "StepBatches", "sample_seed", "step_generator", "loader_kwargs",
           "to_device", "warn_if_evaluating_on_training_data"]

log = logging.getLogger("dalle_ds.train")


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed + epoch, split across ranks) that can start mid-epoch.

    With ``tag_epoch`` it yields ``(epoch, index)`` pairs instead of indices, for an :class:`EpochTagged` dataset:
    samples then know which pass over the data they belong to (per-sample randomness such as BPE dropout is seeded
    by it), and a worker process learns the epoch with each index, whatever it was when the workers started.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = True,
                 tag_epoch: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.skip = 0
        self.tag_epoch = tag_epoch

    def set_position(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())[self.skip:]
        if self.tag_epoch:
            epoch = self.epoch
            return ((epoch, i) for i in indices)  # lazily: no second list of the epoch's size
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EpochTagged(Dataset):
    """``dataset[(epoch, index)]`` → ``dataset[index]`` (a dict) plus ``"sample_key": (epoch, index)``.

    A dataset whose ``takes_sample_key`` is true gets the whole key instead of the index: its own per-sample
    randomness (the paper's random crops, :mod:`dalle_ds.data.augment`) is then seeded by it too."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        item = self.dataset[(epoch, index)] if getattr(self.dataset, "takes_sample_key", False) else self.dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"EpochTagged needs samples that are dicts, got {type(item).__name__}")
        return {**item, "sample_key": (int(epoch), int(index))}


def loader_kwargs(device: torch.device | str, num_workers: int) -> dict[str, Any]:
    """The DataLoader settings for batches bound for ``device``.

    On CUDA the batches come in pinned (page-locked) host memory, so that :func:`to_device` can copy them
    asynchronously and the host goes on queueing the step's kernels meanwhile; on the CPU nothing changes.
    ``persistent_workers`` keeps the worker processes (and whatever each opened: shard files, a tar stream) from one
    epoch to the next instead of starting ``num_workers`` fresh ones per epoch; it needs workers.
    """
    cuda = torch.device(device).type == "cuda"
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": num_workers > 0}


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)``, without waiting when the copy goes to a GPU: from pinned memory (:func:`loader_kwargs`)
    the copy then runs on the current stream, ordered before the kernels that read it, while the host moves on
    (the caching host allocator keeps the pinned buffer until the copy is done)."""
    return t.to(device, non_blocking=torch.device(device).type == "cuda")


def too_few_samples(samples: int, micro_batch: int, ranks: int) -> str:
    """The error for a dataset smaller than one global micro-batch, with the settings that would fit it."""
    msg = f"the dataset has {samples} samples, fewer than one global micro-batch ({micro_batch} × {ranks} ranks)"
    fixes = []
    if samples >= ranks:
        fit = samples // ranks
        # DeepSpeed derives gradient accumulation from train_batch_size when a config sets it too (ds_config.py),
        # so that needs dividing by the new global micro-batch
        fixes.append(f"lower the micro-batch with --ds_set train_micro_batch_size_per_gpu=N for an N ≤ {fit} "
                     f"({samples} samples // {ranks} ranks; if the DeepSpeed config also sets train_batch_size, "
                     f"N × {ranks} must divide it)")
    if ranks > 1 and samples >= micro_batch:
        fixes.append(f"run on at most {samples // micro_batch} ranks")
    return f"{msg}: {', or '.join(fixes) if fixes else 'use a larger dataset'}"


class StepBatches:
    """Yields micro-batches forever, tracking (epoch, micro-batch index within the epoch) for checkpoints.

    One DataLoader serves every epoch: its sampler is repositioned before each pass (:meth:`ResumableSampler.
    set_position`), and with workers they persist across epochs (:func:`loader_kwargs`).
    """

    def __init__(self, dataset: Dataset, micro_batch: int, num_replicas: int, rank: int, seed: int,
                 num_workers: int, collate_fn, device: torch.device | str = "cpu", tag_epoch: bool = False):
        if len(dataset) < micro_batch * num_replicas:
            raise ConfigError(too_few_samples(len(dataset), micro_batch, num_replicas))
        self.dataset = dataset
        # With tag_epoch each sample carries its "sample_key" (epoch, index): see ResumableSampler. A dataset that
        # draws its own per-sample randomness from that key (takes_sample_key: the paper's random crops) is always
        # served tagged, or it would fall back to its deterministic samples.
        tag_epoch = tag_epoch or getattr(dataset, "takes_sample_key", False)
        served = EpochTagged(dataset) if tag_epoch else dataset
        self.sampler = ResumableSampler(served, num_replicas, rank, seed, tag_epoch=tag_epoch)
        self.micro_batch = micro_batch
        self.batches_per_epoch = len(self.sampler) // micro_batch
        self.loader_args = dict(batch_size=micro_batch, collate_fn=collate_fn, drop_last=True,
                                **loader_kwargs(device, num_workers))
        # The loader's own generator: making an iterator draws its workers' base seed from it, which would otherwise
        # come from torch's global one, which the training loop re-seeds per update (an iterator made on resume, in
        # the middle of an epoch, would shift that update's dropout masks against the uninterrupted run's).
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator()
        self.loader = DataLoader(served, sampler=self.sampler, generator=self.generator, **self.loader_args)
        self.epoch = 0
        self.index = 0  # micro-batches consumed in the current epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        while True:
            if self.index >= self.batches_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
            self.sampler.set_position(self.epoch, self.index * self.micro_batch)
            self.generator.manual_seed(seed63(f"{self.seed}/loader/{self.epoch}/{self.rank}"))
            for batch in self.loader:
                self.index += 1
                yield batch


def step_generator(seed: int, step: int, rank: int, micro: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, step, rank, micro-step): random noise that does not depend on history."""
    g = torch.Generator(device=device)
    g.manual_seed(seed63(f"{seed}/{step}/{rank}/{micro}"))
    return g


def warn_if_evaluating_on_training_data(data: DataConfig, where: str = "data") -> None:
    """Warn once per job (rank 0) when evaluation reads the training images by default: an image folder without
    ``eval_split`` resolves to its ``train`` split (config.py), and WebDataset shards are one set read for every
    split. The eval metrics then measure fit, not generalization, and nothing else in the log says so. An
    ``eval_split`` the user set to the training split is their choice and passes silently."""
    if not is_rank0():
        return
    if data.name == "webdataset":
        log.warning("evaluating on the training images: %s.path names one set of WebDataset shards, read for "
                    "evaluation too, so the eval metrics measure fit, not generalization", where)
    elif data.name == "imagefolder" and data.eval_split is None and data.resolved_eval_split == data.train_split:
        log.warning("evaluating on the training split %r (%s.eval_split is not set and an image folder has no "
                    "held-out default), so the eval metrics measure fit, not generalization: give the folder train/ "
                    "and test/ (or val/) subfolders, each with its metadata file, and set %s.eval_split=test (or "
                    "validation)", data.train_split, where, where)
