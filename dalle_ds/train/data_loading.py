"""A data order that is a pure function of (seed, epoch, rank), so a resumed run sees exactly the batches an
uninterrupted one would have seen."""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dalle_ds.config import ConfigError


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed + epoch, split across ranks) that can start mid-epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class StepBatches:
    """Yields micro-batches forever, tracking (epoch, micro-batch index within the epoch) for checkpoints."""

    def __init__(self, dataset: Dataset, micro_batch: int, num_replicas: int, rank: int, seed: int,
                 num_workers: int, collate_fn):
        if len(dataset) < micro_batch * num_replicas:
            raise ConfigError(f"the dataset has {len(dataset)} samples, fewer than one global micro-batch "
                             f"({micro_batch} × {num_replicas} ranks)")
        self.sampler = ResumableSampler(dataset, num_replicas, rank, seed)
        self.micro_batch = micro_batch
        self.batches_per_epoch = len(self.sampler) // micro_batch
        self.loader_args = dict(batch_size=micro_batch, num_workers=num_workers, collate_fn=collate_fn,
                                drop_last=True, persistent_workers=False)
        self.dataset = dataset
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
            loader = DataLoader(self.dataset, sampler=self.sampler, **self.loader_args)
            for batch in loader:
                self.index += 1
                yield batch


def step_generator(seed: int, step: int, rank: int, micro: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, step, rank, micro-step): random noise that does not depend on history."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro}".encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g
