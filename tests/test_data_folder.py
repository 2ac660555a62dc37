"""Image-folder and WebDataset loaders (through HF datasets, offline), bad-image accounting, and the registry."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from dalle_ds.data.folder import ImageTextFolder, WebDatasetShards, _expand_braces
from dalle_ds.data.images import collate_samples
from dalle_ds.data.registry import DATASETS, build_dataset, dataset_captions

S = 16


pytestmark = pytest.mark.usefixtures("hf_tmp_home")  # tests/conftest.py


def _noise(seed, size=(30, 20), mode="RGB"):
    w, h = size
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def _encode(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


GOOD = {  # file → (image, caption as written to metadata.jsonl; None means JSON null)
    "g0.png": (lambda: _noise(0, (40, 30)), "A red square"),
    "g1.png": (lambda: _noise(1, (16, 16), "L"), None),
    "g2.png": (lambda: _noise(2, (20, 20), "RGBA"), ""),
    "g3.png": (lambda: _noise(3, (64, 64)), "   "),
    "g4.jpg": (lambda: _noise(4, (10, 50)), "a blue circle"),
}
BAD = {"trunc.png": "x", "notimage.png": "y", "missing.png": "z"}  # truncated, text file, listed but absent
N_TOTAL, N_KEPT, N_UNREADABLE, N_EMPTY = 8, 5, 3, 3  # g1, g2, g3 have empty captions


def make_folder(root, fmt="jsonl"):
    """An image folder with 5 good images, 3 unreadable rows and one image that has no metadata row."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, (make, caption)) in enumerate(GOOD.items()):
        make().save(root / name)
        rows.append({"file_name": name, "text": caption, "idx": i})
    big = _encode(_noise(9, (64, 64)))
    (root / "trunc.png").write_bytes(big[: len(big) // 2])
    (root / "notimage.png").write_text("this is not a png\n")
    for j, (name, caption) in enumerate(BAD.items()):
        rows.append({"file_name": name, "text": caption, "idx": 10 + j})
    _noise(7).save(root / "orphan.png")  # on disk, in no metadata row
    if fmt == "jsonl":
        with open(root / "metadata.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:  # csv, with the caption column named "caption"; empty fields for None
        with open(root / "metadata.csv", "w") as f:
            f.write("file_name,caption,idx\n")
            for r in rows:
                cap = "" if r["text"] is None else r["text"]
                f.write(f'{r["file_name"]},"{cap}",{r["idx"]}\n')
    return root


def _iterate(ds, num_workers):
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_samples)
    images, captions = [], []
    for batch in loader:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, S, S)
        images.append(batch["image"])
        captions += batch["caption"]
    return torch.cat(images), captions


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_counts_and_samples(tmp_path, caplog, fmt):
    root = make_folder(tmp_path / "data", fmt)
    with caplog.at_level(logging.WARNING, logger="dalle_ds.data.folder"):
        ds = ImageTextFolder(root, image_size=S, cache_dir=tmp_path / "cache")
    st = ds.stats
    assert (st["total"], st["kept"], st["unreadable"], st["empty_caption"]) == (N_TOTAL, N_KEPT, N_UNREADABLE, N_EMPTY)
    assert sorted(st["unreadable_examples"]) == sorted(BAD)
    assert st["not_in_metadata"] == 1
    assert len(ds) == N_KEPT
    assert ds.caption_column == ("text" if fmt == "jsonl" else "caption")
    # one summary warning naming the bad files, one about the orphan
    text = caplog.text
    assert "skipped 3 of 8 images" in text and "trunc.png" in text and "notimage.png" in text
    assert "orphan.png" in text
    sample = ds[0]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, S, S)
    assert sample["caption"] == "A red square" and sample["idx"] == 0
    assert [ds[i]["caption"] for i in range(len(ds))] == ["A red square", "", "", "", "a blue circle"]
    assert ds.captions() == ["A red square", "", "", "", "a blue circle"]
    assert ds.captions(limit=2) == ["A red square", ""]
    # the decoded pixels are those of the file (g3 is 64x64 noise; spot-check the exact-size path via g1 == gray)
    g1 = ds[1]["image"]
    assert torch.equal(g1[0], g1[1]) and torch.equal(g1[1], g1[2])
    # nothing was written into the data folder: the cache went where we asked
    assert not (root / ".dalle_ds_cache").exists() and any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_imagefolder_dataloader_never_raises(tmp_path, num_workers):
    ds = ImageTextFolder(make_folder(tmp_path / "data"), image_size=S, cache_dir=tmp_path / "cache")
    images, captions = _iterate(ds, num_workers)
    assert images.shape == (N_KEPT, 3, S, S)
    assert captions == ["A red square", "", "", "", "a blue circle"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unvalidated_bad_images_are_replaced_and_counted(tmp_path, caplog, num_workers):
    ds = ImageTextFolder(make_folder(tmp_path / "data"), image_size=S, cache_dir=tmp_path / "cache", validate=False)
    assert len(ds) == N_TOTAL and ds.stats["unreadable"] == 0
    with caplog.at_level(logging.WARNING, logger="dalle_ds.data.folder"):
        images, captions = _iterate(ds, num_workers)
    assert images.shape == (N_TOTAL, 3, S, S)  # every index yields a readable sample
    if num_workers == 0:  # counted in this process (workers count in their own copies)
        assert ds.stats["unreadable"] == N_UNREADABLE
        assert sorted(set(ds.stats["unreadable_examples"])) == sorted(BAD)
        assert "trunc.png" in caplog.text and "replaced by the next sample" in caplog.text


def test_only_rank_0_reports_before_the_process_group_starts(tmp_path, caplog, monkeypatch):
    """launch/tokenize_images.py builds its data on every rank before torch.distributed starts: the launcher's RANK
    then picks the one process that warns, and every rank keeps the same stats."""
    root = make_folder(tmp_path / "data")
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO, logger="dalle_ds.data.folder"):
        ds = ImageTextFolder(root, image_size=S, cache_dir=tmp_path / "cache", across_ranks=True)
    assert caplog.text == ""
    assert (ds.stats["unreadable"], ds.stats["not_in_metadata"]) == (N_UNREADABLE, 1)
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.INFO, logger="dalle_ds.data.folder"):
        ImageTextFolder(root, image_size=S, cache_dir=tmp_path / "cache", across_ranks=True)
    assert "skipped 3 of 8 images" in caplog.text and "orphan.png" in caplog.text


def test_image_broken_after_validation_does_not_crash(tmp_path, caplog):
    root = make_folder(tmp_path / "data")
    ds = ImageTextFolder(root, image_size=S, cache_dir=tmp_path / "cache")
    (root / "g0.png").write_bytes(b"corrupted later")
    with caplog.at_level(logging.WARNING, logger="dalle_ds.data.folder"):
        sample = ds[0]
    assert sample["caption"] == ""  # g1's sample stands in for g0
    assert ds.stats["unreadable"] == N_UNREADABLE + 1 and "g0.png" in caplog.text


def test_imagefolder_splits_caption_column_and_errors(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 3), ("test", 2)):
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.jsonl", "w") as f:
            for i in range(n):
                _noise(i).save(root / split / f"{i}.png")
                f.write(json.dumps({"file_name": f"{i}.png", "text": f"{split} {i}", "alt": f"alt {i}"}) + "\n")
    cache = tmp_path / "cache"
    train = ImageTextFolder(root, "train", image_size=S, cache_dir=cache)
    test = ImageTextFolder(root, "test", image_size=S, cache_dir=cache)
    assert (len(train), len(test)) == (3, 2)
    assert sorted(test.captions()) == ["test 0", "test 1"]
    assert train.stats["not_in_metadata"] == 0
    alt = ImageTextFolder(root, "test", image_size=S, caption_column="alt", cache_dir=cache)
    assert sorted(alt.captions()) == ["alt 0", "alt 1"] and "text" in alt[0]
    with pytest.raises(ValueError, match="split 'validation' not found"):
        ImageTextFolder(root, "validation", image_size=S, cache_dir=cache)
    with pytest.raises(ValueError, match="caption column 'nope' not found"):
        ImageTextFolder(root, "train", image_size=S, caption_column="nope", cache_dir=cache)
    with pytest.raises(FileNotFoundError):
        ImageTextFolder(tmp_path / "absent", image_size=S, cache_dir=cache)


def test_folder_without_captions(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    for i in range(3):
        _noise(i).save(root / f"{i}.png")
    with pytest.raises(ValueError, match="no caption column") as err:
        ImageTextFolder(root, image_size=S, cache_dir=tmp_path / "cache")
    for remedy in ("add a metadata.jsonl", '{"file_name": "0001.png", "text":', "--caption_key NAME",
                   "--set data.caption_key=NAME"):
        assert remedy in str(err.value)
    ds = ImageTextFolder(root, image_size=S, cache_dir=tmp_path / "cache", require_caption=False)
    assert len(ds) == 3 and ds.captions() == ["", "", ""] and ds.stats["empty_caption"] == 3


def test_dvae_trains_on_a_folder_without_captions(tmp_path):
    """Stage 1 needs images only: its datasets load a caption-less folder (the prior's tokenizing still needs them)."""
    from dalle_ds.config import DVAE_RUN_PRESETS, apply_overrides
    from dalle_ds.train.dvae_trainer import build_datasets

    root = tmp_path / "plain"
    root.mkdir()
    for i in range(3):
        _noise(i).save(root / f"{i}.png")
    cfg = apply_overrides(DVAE_RUN_PRESETS["test"], {"data.name": "imagefolder", "data.path": str(root),
                                                      "model.image_size": S}).validate()
    train, evals = build_datasets(cfg)
    assert len(train) == 3 and train[0]["image"].shape[-1] == S


def test_default_cache_dir_is_under_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    root = make_folder(tmp_path / "data")
    ds = ImageTextFolder(root, image_size=S)
    assert len(ds) == N_KEPT and (root / ".dalle_ds_cache").is_dir() and any((root / ".dalle_ds_cache").iterdir())
    assert ImageTextFolder(root, image_size=S).stats["not_in_metadata"] == 1  # the cache is not scanned as data


# ----- WebDataset ---------------------------------------------------------------------------------------------


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(root):
    """Two shards, 9 samples: 6 readable (one .jpg, only in shard 1), 3 unreadable; 2 empty captions."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "shard-000000.tar", "w") as tf:
        for i in range(4):  # every sample in the first shard has the same members (datasets requires it)
            _add(tf, f"a{i}.png", _encode(_noise(i)))
            _add(tf, f"a{i}.txt", ("" if i == 1 else f"Caption {i}").encode())
            _add(tf, f"a{i}.json", json.dumps({"caption": f"json {i}", "n": i}).encode())
    with tarfile.open(root / "shard-000001.tar", "w") as tf:
        _add(tf, "b0.jpg", _encode(_noise(10), "JPEG"))  # an extension the first shard never has
        _add(tf, "b0.txt", b"a jpeg sample")
        _add(tf, "b0.json", b'{"caption": "json b0", "n": 10}')
        big = _encode(_noise(11, (64, 64)))
        _add(tf, "b1.png", big[: len(big) // 2])  # truncated
        _add(tf, "b1.txt", b"truncated")
        _add(tf, "b2.png", b"garbage bytes")  # not an image
        _add(tf, "b2.txt", b"garbage")
        _add(tf, "b3.txt", b"no image at all")  # no image member
        _add(tf, "b4.png", _encode(_noise(12)))  # no caption member
        _add(tf, "b4.json", b'{"caption": "json b4", "n": 14}')
    return root


def test_webdataset_counts_and_samples(tmp_path, caplog):
    root = make_shards(tmp_path / "wds")
    with caplog.at_level(logging.WARNING, logger="dalle_ds.data.folder"):
        ds = WebDatasetShards(str(root / "shard-*.tar"), image_size=S, cache_dir=tmp_path / "cache")
    st = ds.stats
    assert (st["total"], st["kept"], st["unreadable"], st["empty_caption"]) == (9, 6, 3, 2)
    assert sorted(st["unreadable_examples"]) == ["shard-000001.tar:b1", "shard-000001.tar:b2", "shard-000001.tar:b3"]
    assert "skipped 3 of 9 images" in caplog.text and "shard-000001.tar:b1" in caplog.text
    assert ds.captions() == ["Caption 0", "", "Caption 2", "Caption 3", "a jpeg sample", ""]
    assert [ds[i]["caption"] for i in range(len(ds))] == ds.captions()
    s = ds[4]
    assert s["__key__"] == "b0" and s["caption"] == "a jpeg sample" and s["json"] == {"caption": "json b0", "n": 10}
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, S, S)


def test_webdataset_patterns_and_keys(tmp_path):
    root = make_shards(tmp_path / "wds")
    cache = tmp_path / "cache"
    files = [str(root / "shard-000000.tar"), str(root / "shard-000001.tar")]
    by_brace = WebDatasetShards(str(root / "shard-{000000..000001}.tar"), image_size=S, cache_dir=cache)
    by_list = WebDatasetShards(files, image_size=S, cache_dir=cache)
    assert by_brace.files == by_list.files == files
    assert by_brace.captions() == by_list.captions()
    via_json = WebDatasetShards(files, image_size=S, caption_key="json.caption", cache_dir=cache)
    assert via_json.captions() == ["json 0", "json 1", "json 2", "json 3", "json b0", "json b4"]
    only_png = WebDatasetShards(files, image_size=S, image_key="png", cache_dir=cache)
    assert only_png.stats["unreadable"] == 4  # b0 has only a .jpg
    first = WebDatasetShards(files[0], image_size=S, cache_dir=cache)
    assert len(first) == 4 and first.stats["unreadable"] == 0
    with pytest.raises(FileNotFoundError, match="no WebDataset shard matches"):
        WebDatasetShards(str(root / "nothing-*.tar"), image_size=S, cache_dir=cache)
    with pytest.raises(ValueError, match="image_key 'webp'"):
        WebDatasetShards(files, image_size=S, image_key="webp", cache_dir=cache)
    assert _expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert _expand_braces("{a,b}/x-{1..2}") == ["a/x-1", "a/x-2", "b/x-1", "b/x-2"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_dataloader_never_raises(tmp_path, num_workers):
    root = make_shards(tmp_path / "wds")
    for validate in (True, False):
        ds = WebDatasetShards(str(root / "*.tar"), image_size=S, cache_dir=tmp_path / "cache", validate=validate)
        images, captions = _iterate(ds, num_workers)
        assert images.shape == (len(ds), 3, S, S) and len(captions) == len(ds)
        assert len(ds) == (6 if validate else 9)


# ----- registry -------------------------------------------------------------------------------------------------


def test_registry_builds_loaders_and_reads_captions(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = build_dataset("imagefolder", "train", S, path=root, cache_dir=tmp_path / "cache")
    assert isinstance(ds, ImageTextFolder) and ds.image_size == S and len(ds) == N_KEPT
    assert dataset_captions(ds) == ["A red square", "", "", "", "a blue circle"]
    assert dataset_captions(ds, limit=1) == ["A red square"]
    assert dataset_captions(Subset(ds, [4, 0])) == ["a blue circle", "A red square"]
    shards = make_shards(tmp_path / "wds")
    wds = build_dataset("webdataset", "test", S, path={"test": str(shards / "*.tar")}, cache_dir=tmp_path / "cache")
    assert isinstance(wds, WebDatasetShards) and len(wds) == 6

    class Plain(torch.utils.data.Dataset):  # no captions() method: falls back to __getitem__
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "caption": f"plain {i}"}

    assert dataset_captions(Plain(), limit=2) == ["plain 0", "plain 1"]


def test_registry_errors_list_names_and_kwargs(tmp_path):
    with pytest.raises(ValueError) as err:
        build_dataset("cifar", "train", 32)
    msg = str(err.value)
    for name in ("shapes", "fashion_mnist", "imagefolder", "webdataset", "caption_column", "num_samples"):
        assert name in msg
    with pytest.raises(ValueError, match=r"does not accept \['colour'\]"):
        build_dataset("imagefolder", "train", S, path=tmp_path, colour="red")
    with pytest.raises(ValueError, match=r"needs \['path'\]"):
        build_dataset("webdataset", "train", S)
    with pytest.raises(ValueError, match="split 'test' not in the path dict"):
        build_dataset("webdataset", "test", S, path={"train": "x.tar"})
    assert set(DATASETS) == {"shapes", "fashion_mnist", "imagefolder", "webdataset"}


def test_registry_shapes():
    pytest.importorskip("dalle_ds.data.shapes", reason="dalle_ds.data.shapes is not written yet")
    ds = build_dataset("shapes", "train", 64, num_samples=4, seed=0)
    assert len(ds) == 4
    sample = ds[0]
    assert sample["image"].dtype == torch.uint8 and tuple(sample["image"].shape) == (3, 64, 64)
    captions = dataset_captions(ds)
    assert len(captions) == 4 and captions[0] == sample["caption"] and all(captions)


def test_list_valued_captions_use_the_first_non_empty(tmp_path):
    root = tmp_path / "multi"
    root.mkdir()
    rows = [["", "  second is first non-empty "], [], ["only"]]
    with open(root / "metadata.jsonl", "w") as f:
        for i, caps in enumerate(rows):
            _noise(i).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "captions": caps}) + "\n")
    ds = ImageTextFolder(root, image_size=S, cache_dir=tmp_path / "cache")
    assert ds.caption_column == "captions"
    assert ds.captions() == ["second is first non-empty", "", "only"] and ds.stats["empty_caption"] == 1


def _build_on_ranks(rank, world, root, cache, counts_dir):
    """Rank ``rank`` of ``world`` builds the folder across ranks, counting the images it decodes itself."""
    import os

    from dalle_ds.data import folder

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    decoded, logged = [], []
    real = folder._ImageTextDataset._decode
    folder._ImageTextDataset._decode = lambda self, row, *a: decoded.append(1) or real(self, row, *a)
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    folder.logger.addHandler(handler)
    folder.logger.setLevel(logging.INFO)
    ds = ImageTextFolder(root, cache_dir=cache, across_ranks=True, max_aspect_ratio=2.0)
    (counts_dir / f"{rank}.json").write_text(json.dumps({"decoded": len(decoded), "rows": ds._rows.tolist(),
                                                         "stats": ds.stats, "logged": logged}))
    return ds._rows.tolist()


@pytest.mark.distributed
def test_validation_split_across_ranks_keeps_the_same_rows(tmp_path):
    """With across_ranks, 2 gloo ranks each decode half of the images, share what they found unreadable or beyond the
    aspect-ratio limit, and keep the rows (and stats) a single process keeps; rank 0 alone reports them."""
    from dalle_ds.dist.local_ranks import run_local_ranks

    root = make_folder(tmp_path / "data")
    single = ImageTextFolder(root, cache_dir=tmp_path / "cache1", max_aspect_ratio=2.0)
    counts = tmp_path / "counts"
    counts.mkdir()
    run_local_ranks(_build_on_ranks, 2, root, tmp_path / "cache2", counts, timeout=300)
    per_rank = [json.loads((counts / f"{r}.json").read_text()) for r in range(2)]
    total = single.stats["total"]
    assert [r["decoded"] for r in per_rank] == [(total + 1) // 2, total // 2]
    for r in per_rank:
        assert r["rows"] == single._rows.tolist() and r["stats"] == single.stats
    assert per_rank[1]["logged"] == []  # one warning per job, not one per rank
    logged = " | ".join(per_rank[0]["logged"])
    assert len(per_rank[0]["logged"]) == 3 and "skipped 3 of 8 images as unreadable" in logged
    assert "left out 1 of 8 images" in logged and "1 image files have no metadata row" in logged
    assert single.stats["unreadable"] == len(BAD)
    assert single.stats["aspect_ratio"] == 1  # g4.jpg, 10 x 50
