"""The training data order (dalle_ds/train/data_loading.py): the loader settings chosen for the device, and one
loader reused across epochs (workers persisting) yields exactly the batches of a fresh loader per epoch."""
import logging

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dalle_ds.config import ConfigError, DataConfig
from dalle_ds.train.data_loading import (
    ResumableSampler, StepBatches, loader_kwargs, to_device, too_few_samples, warn_if_evaluating_on_training_data,
)


class _Numbers(Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return {"x": torch.tensor([i]), "caption": f"n{i}"}


def _collate(samples):
    return {"x": torch.cat([s["x"] for s in samples]), "caption": [s["caption"] for s in samples]}


def test_loader_kwargs_pin_on_cuda_only_and_persist_workers():
    assert loader_kwargs(torch.device("cuda", 1), 4) == {"num_workers": 4, "pin_memory": True,
                                                         "persistent_workers": True}
    assert loader_kwargs("cuda", 0) == {"num_workers": 0, "pin_memory": True, "persistent_workers": False}
    assert loader_kwargs("cpu", 2) == {"num_workers": 2, "pin_memory": False, "persistent_workers": True}
    assert loader_kwargs(torch.device("cpu"), 0) == {"num_workers": 0, "pin_memory": False,
                                                     "persistent_workers": False}


def test_to_device_waits_only_off_the_gpu(monkeypatch):
    seen = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking"))
        return real_to(self, "cpu")

    monkeypatch.setattr(torch.Tensor, "to", spy)
    to_device(torch.zeros(2), torch.device("cuda", 0))
    to_device(torch.zeros(2), "cpu")
    assert seen == [True, False]


def _old_order(dataset, mb, world, rank, seed, epoch, index):
    """The batches of one epoch from ``index`` on, as a fresh DataLoader per epoch gave them."""
    sampler = ResumableSampler(dataset, world, rank, seed)
    sampler.set_position(epoch, index * mb)
    loader = DataLoader(dataset, sampler=sampler, batch_size=mb, collate_fn=_collate, drop_last=True)
    return [b["x"].tolist() for b in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_loader_gives_the_per_epoch_order_and_resumes(num_workers):
    ds, mb, world, rank, seed = _Numbers(), 3, 2, 1, 7
    sb = StepBatches(ds, mb, world, rank, seed, num_workers, _collate)
    assert sb.loader.persistent_workers == (num_workers > 0) and not sb.loader.pin_memory
    per_epoch = sb.batches_per_epoch
    want = [x for e in range(3) for x in _old_order(ds, mb, world, rank, seed, e, 0)]
    it = iter(sb)
    got = [next(it)["x"].tolist() for _ in range(3 * per_epoch)]
    assert got == want and sb.epoch == 2 and sb.index == per_epoch
    # a resumed run: a new StepBatches positioned mid-epoch continues the same order
    resumed = StepBatches(ds, mb, world, rank, seed, num_workers, _collate)
    resumed.load_state_dict({"epoch": 1, "index": 2})
    it = iter(resumed)
    rest = [next(it)["x"].tolist() for _ in range(per_epoch - 2 + per_epoch)]
    assert rest == want[per_epoch + 2: 3 * per_epoch]


def test_too_small_a_dataset_names_the_micro_batch_that_fits():
    with pytest.raises(ConfigError, match="fewer than one global micro-batch") as err:
        StepBatches(_Numbers(), 16, 2, 0, 7, 0, _collate)
    assert "--ds_set train_micro_batch_size_per_gpu=N for an N ≤ 11 (23 samples // 2 ranks" in str(err.value)
    assert "run on at most 1 ranks" in str(err.value)
    assert "run on" not in too_few_samples(40, 64, 2)  # no rank count holds 64


def test_evaluating_on_the_training_images_is_warned(caplog, tmp_path):
    folder = DataConfig(name="imagefolder", path=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="dalle_ds.train"):
        warn_if_evaluating_on_training_data(folder, "data.images")
        warn_if_evaluating_on_training_data(DataConfig(name="imagefolder", path=str(tmp_path), eval_split="test"))
        warn_if_evaluating_on_training_data(DataConfig(name="imagefolder", path=str(tmp_path), eval_split="train"))
        warn_if_evaluating_on_training_data(DataConfig())  # shapes: test_id
    assert len(caplog.records) == 1
    assert "evaluating on the training split 'train'" in caplog.text and "data.images.eval_split=test" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalle_ds.train"):
        warn_if_evaluating_on_training_data(DataConfig(name="webdataset", path="s.tar", eval_split="test"))
    assert "data.path names one set of WebDataset shards" in caplog.text
