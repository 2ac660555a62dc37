"""Fashion-MNIST from the Debian package (skipped with a reason when absent), plus the IDX reader on tiny files."""
import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dalle_ds.data.fashion_mnist import APT_PACKAGE, CLASS_NAMES, DEFAULT_ROOT, FashionMNIST, is_available
from dalle_ds.data.images import collate_samples
from dalle_ds.data.registry import build_dataset, dataset_captions

AVAILABLE, REASON = is_available(DEFAULT_ROOT)
needs_package = pytest.mark.skipif(not AVAILABLE, reason=REASON)


def _write_idx(root, prefix, images, labels):
    """Write gzipped IDX files exactly as the original release lays them out (big-endian header)."""
    n, h, w = images.shape
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_root(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path, "train", rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10)
    _write_idx(tmp_path, "t10k", rng.integers(0, 256, (5, 28, 28)), np.array([9, 0, 1, 8, 3]))
    return tmp_path


def test_reader_on_tiny_idx_files(tiny_root):
    train = FashionMNIST("train", image_size=28, root=tiny_root)
    test = FashionMNIST("test", image_size=28, root=tiny_root)
    assert (len(train), len(test)) == (12, 5)
    sample = test[0]
    assert sample["label"] == 9 and "ankle boot" in sample["caption"]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 28, 28)
    # at the native size the pixels are the file's bytes, repeated over 3 channels
    raw = test.images[0]
    assert all(torch.equal(sample["image"][c], torch.from_numpy(raw.copy())) for c in range(3))
    assert test[-1]["label"] == 3
    with pytest.raises(IndexError):
        test[5]


def test_captions_templates_and_articles(tiny_root):
    ds = FashionMNIST("train", root=tiny_root, caption_templates=("a photo of {a} {name}", "{name}!"))
    captions = ds.captions()
    assert captions == [ds[i]["caption"] for i in range(len(ds))]
    assert captions[0] == "a photo of a t-shirt" and captions[1] == "pair of trousers!"
    assert captions[9] == "ankle boot!" and ds.caption(8) == "a photo of a bag"
    assert FashionMNIST("test", root=tiny_root).caption(0) == "a photo of an ankle boot"
    assert ds.captions(limit=3) == captions[:3]
    with pytest.raises(ValueError, match="no \\{name\\} placeholder"):
        FashionMNIST("train", root=tiny_root, caption_templates=("a photo",))


def test_corrupt_and_missing_files(tiny_root, tmp_path_factory):
    with gzip.open(tiny_root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x803, 5) + bytes(5))  # wrong magic
    with pytest.raises(ValueError, match="magic"):
        FashionMNIST("test", root=tiny_root)
    empty = tmp_path_factory.mktemp("empty")
    ok, reason = is_available(empty)
    assert not ok and APT_PACKAGE in reason and "train-images-idx3-ubyte.gz" in reason
    with pytest.raises(FileNotFoundError, match=f"apt-get install {APT_PACKAGE}"):
        FashionMNIST("train", root=empty)
    with pytest.raises(ValueError, match="valid splits: train, test"):
        FashionMNIST("validation", root=tiny_root)


@needs_package
def test_full_dataset_sizes_and_captions():
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert np.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    for ds in (train, test):
        for i in (0, 1, 2, 3, len(ds) - 1):
            sample = ds[i]
            assert CLASS_NAMES[sample["label"]] in sample["caption"]
            assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 32, 32)
    assert len({test.caption(i) for i in range(40)}) > 10  # templates vary across samples
    assert test.caption(123) == FashionMNIST("test").caption(123)  # deterministic


@needs_package
def test_full_dataset_through_registry_and_dataloader():
    ds = build_dataset("fashion_mnist", "test", 16)
    assert isinstance(ds, FashionMNIST) and ds.image_size == 16
    assert dataset_captions(ds, limit=5) == [ds[i]["caption"] for i in range(5)]
    batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate_samples)))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert [CLASS_NAMES[label] in cap for label, cap in zip(batch["label"], batch["caption"])] == [True] * 8
