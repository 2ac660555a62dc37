import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dalle_ds.config import DVAEConfig
from dalle_ds.data.token_shards import ShardWriter, TokenShardDataset, read_meta, write_meta
from dalle_ds.models.dvae import DiscreteVAE
from dalle_ds.train.dvae_trainer import export_dvae
from launch_utils import ROOT, load_script


def test_writer_reader_round_trip(tmp_path):
    rows = []
    w0 = ShardWriter(tmp_path, rank=0, grid_size=4, vocab_size=1000, rows_per_shard=3)
    w1 = ShardWriter(tmp_path, rank=1, grid_size=4, vocab_size=1000, rows_per_shard=3)
    for i in range(7):
        tok = torch.randint(0, 1000, (1, 4, 4))
        rec = {"index": i, "caption": f"caption {i}", "scene": {"n": i}}
        (w0 if i % 2 == 0 else w1).add(tok, [rec])
        rows.append((tok.flatten(), rec))
    w0.flush(), w1.flush()
    assert not (tmp_path / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenShardDataset(tmp_path)
    write_meta(tmp_path, sorted(w0.parts + [p for p in w1.parts]), 4, 1000, {"dataset": "unit"})
    ds = TokenShardDataset(tmp_path)
    assert len(ds) == 7 and read_meta(tmp_path)["num_samples"] == 7
    by_index = {ds[i]["index"]: ds[i] for i in range(len(ds))}
    for tok, rec in rows:
        item = by_index[rec["index"]]
        assert torch.equal(item["image_tokens"], tok) and item["caption"] == rec["caption"]
        assert item["scene"] == rec["scene"] and item["image_tokens"].dtype == torch.int64
    with pytest.raises(ValueError, match="tokens per image"):
        w0.add(torch.zeros(1, 5, dtype=torch.long), [{}])
    # damaged folders: one error naming the folder and the file, not numpy's or open()'s
    first = sorted(tmp_path.glob("*.tokens.npy"))[0]
    first.write_bytes(first.read_bytes()[:-40])  # truncated
    with pytest.raises(ValueError, match=f"{tmp_path}: a shard does not read .*re-run launch/tokenize_images.py"):
        TokenShardDataset(tmp_path)
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f"{first.name}, listed in meta.json, is missing"):
        TokenShardDataset(tmp_path)


def test_writer_cuts_a_batch_into_shards_of_rows_per_shard(tmp_path):
    """A batch larger than rows_per_shard was flushed whole (tokenize_images.py --rows_per_shard 2 --batch_size 64
    wrote 64-row parts); the parts now hold rows_per_shard rows each, the rest in order behind them."""
    w = ShardWriter(tmp_path, rank=0, grid_size=2, vocab_size=16, rows_per_shard=3)
    tokens = torch.arange(8 * 4).remainder(16).view(8, 4)
    w.add(tokens[:5], [{"index": i, "caption": str(i)} for i in range(5)])
    w.add(tokens[5:], [{"index": i, "caption": str(i)} for i in range(5, 8)])
    w.flush()
    sizes = [len(np.load(tmp_path / f"{p}.tokens.npy")) for p in w.parts]
    assert sizes == [3, 3, 2] and w.count == 8
    write_meta(tmp_path, w.parts, 2, 16, {})
    ds = TokenShardDataset(tmp_path)
    assert [ds[i]["index"] for i in range(8)] == list(range(8))
    assert all(torch.equal(ds[i]["image_tokens"], tokens[i]) for i in range(8))


def test_tokenize_images_cli_matches_the_encoder(tmp_path):
    torch.manual_seed(0)
    cfg = DVAEConfig(image_size=64, vocab_size=32, hidden=8, blocks_per_group=1, groups=3, decoder_init=8)
    model = DiscreteVAE(cfg)
    export_dvae(tmp_path / "dvae.pt", cfg, model.state_dict(), step=0)
    out = tmp_path / "tok"
    cmd = [sys.executable, str(ROOT / "launch/tokenize_images.py"), "--dvae", str(tmp_path / "dvae.pt"),
           "--data", "shapes", "--split", "test_ood", "--num_samples", "10", "--batch_size", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = TokenShardDataset(out)
    assert len(ds) == 10 and ds.grid_size == 16
    from dalle_ds.data.shapes import ShapesDataset

    src = ShapesDataset("test_ood", num_samples=10, seed=0, image_size=64)
    for i in (0, 7):
        item = ds[i]
        expect = model.eval().encode(src[item["index"]]["image"][None])[0].flatten()
        assert torch.equal(item["image_tokens"], expect)
        assert item["caption"] == src[item["index"]]["caption"] and "objects" in json.dumps(item["scene"])

    # --bf16 (the demo's setting): the same encoder under bf16 autocast, channels_last; bf16 may flip a near-tie
    # argmax, so most codes, not all, must equal the fp32 ones, and the shard must say how it was made
    out16 = tmp_path / "tok16"
    proc = subprocess.run(cmd[:-1] + [str(out16), "--bf16"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds16 = TokenShardDataset(out16)
    rows = [(ds[i]["index"], ds[i]["image_tokens"]) for i in range(len(ds))]
    by_index = {ds16[i]["index"]: ds16[i]["image_tokens"] for i in range(len(ds16))}
    agree = torch.stack([by_index[k] == t for k, t in rows]).float().mean().item()
    assert agree > 0.9, agree
    assert json.loads((out16 / "meta.json").read_text())["bf16"] is True

    bad = subprocess.run(cmd[:3] + [str(tmp_path / "missing.pt")] + cmd[4:], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "file not found" in bad.stderr


def _tiny_dvae(path):
    cfg = DVAEConfig(image_size=64, vocab_size=32, hidden=8, blocks_per_group=1, groups=3, decoder_init=8)
    export_dvae(path, cfg, DiscreteVAE(cfg).state_dict(), step=0)
    return cfg


def test_tokenize_images_two_ranks_index_every_rank_shard(tmp_path):
    """Rank 0 writes meta.json from the shard names the ranks report (not from a listing of the folder, which a
    network filesystem may serve stale): both ranks' rows, each image once."""
    from launch_utils import deepspeed_launch

    torch.manual_seed(0)
    _tiny_dvae(tmp_path / "dvae.pt")
    out = tmp_path / "tok"
    deepspeed_launch("launch/tokenize_images.py", ["--dvae", str(tmp_path / "dvae.pt"), "--data", "shapes",
                                                   "--split", "test_ood", "--num_samples", "9", "--batch_size", "2",
                                                   "--rows_per_shard", "2", "--out", str(out)])
    meta = read_meta(out)
    assert {s.split("-")[1] for s in meta["shards"]} == {"0", "1"} and meta["num_samples"] == 9
    ds = TokenShardDataset(out)
    assert sorted(ds[i]["index"] for i in range(len(ds))) == list(range(9))


def test_write_index_refuses_a_shard_rank0_cannot_read(tmp_path, capsys):
    """A shard another rank reports but rank 0 cannot open (--out not shared between nodes): no meta.json."""
    import argparse
    tok = load_script("launch/tokenize_images.py", "tokenize_images")
    cfg = _tiny_dvae(tmp_path / "dvae.pt")
    out = tmp_path / "tok"
    w = ShardWriter(out, 0, 16, cfg.vocab_size, rows_per_shard=4)
    w.add(torch.zeros(2, 16, 16, dtype=torch.long), [{"index": 0, "caption": "a"}, {"index": 1, "caption": "b"}])
    w.flush()
    args = argparse.Namespace(out=str(out), dvae=str(tmp_path / "dvae.pt"), split="test_ood", path=None, seed=0,
                              bf16=False, data="shapes", crops=0)
    data = argparse.Namespace(name="shapes")
    assert tok.write_index(args, data, cfg, w.parts + ["part-1-00000"]) is False
    assert "every node sees" in capsys.readouterr().err and not (out / "meta.json").exists()
    assert tok.write_index(args, data, cfg, w.parts) is True and read_meta(out)["num_samples"] == 2


def test_tokenize_crops_store_random_crops_read_one_per_epoch(tmp_path, hf_tmp_home):
    """``--crops 3``: three of the prior's random crops per image, each encoded; the shard dataset has one sample per
    image and reads crop ``epoch mod 3`` of it; the crops are the ones the image dataset draws for those keys."""
    sys.path.insert(0, str(ROOT / "launch"))
    import tokenize_images
    from tiny_artifacts import write_image_folder

    from dalle_ds.data.augment import PaperCrop
    from dalle_ds.data.folder import ImageTextFolder
    from dalle_ds.train.data_loading import StepBatches

    torch.manual_seed(0)
    cfg = _tiny_dvae(tmp_path / "dvae.pt")
    folder = write_image_folder(tmp_path / "images", [(96, 72), (80, 100), (120, 90)], caption="picture {}")
    out = tmp_path / "tok"
    args = ["--dvae", str(tmp_path / "dvae.pt"), "--data", "imagefolder", "--path", str(folder), "--crops", "3",
            "--seed", "5", "--batch_size", "4", "--out", str(out)]
    assert tokenize_images.main(args) == 0
    ds = TokenShardDataset(out)
    assert read_meta(out)["crops"] == 3 and read_meta(out)["num_samples"] == 9
    assert len(ds) == 3 and ds.takes_sample_key and ds.captions() == ["picture 0", "picture 1", "picture 2"]
    from dalle_ds.train.dvae_trainer import load_dvae

    dvae = load_dvae(tmp_path / "dvae.pt")
    images = ImageTextFolder(folder, image_size=cfg.image_size, cache_dir=tmp_path / "c",
                             crop=PaperCrop("prior", cfg.image_size, seed=5))
    for epoch in (0, 1, 2, 4):
        for i in range(3):
            item = ds[(epoch, i)]
            assert item["crop"] == epoch % 3 and item["caption"] == f"picture {item['index']}"
            want = dvae.encode(images[(epoch % 3, item["index"])]["image"][None])[0].flatten()
            assert torch.equal(item["image_tokens"], want)
    assert torch.equal(ds[1]["image_tokens"], ds[(0, 1)]["image_tokens"])
    batch = next(iter(StepBatches(ds, micro_batch=3, num_replicas=1, rank=0, seed=0, num_workers=0,
                                  collate_fn=lambda s: s)))
    assert all(s["sample_key"][0] == 0 and s["crop"] == 0 for s in batch)

    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "crops": 4}))
    with pytest.raises(ValueError, match="crop 3 of image 0"):
        TokenShardDataset(out)
    with pytest.raises(SystemExit):
        tokenize_images.parse_args(["--dvae", str(tmp_path / "dvae.pt"), "--data", "shapes", "--crops", "2",
                                    "--out", str(tmp_path / "x")])


def test_a_rerun_says_which_shards_it_replaces(tmp_path, capsys):
    """tokenize_images.py into a folder holding shards replaces them: a held-out split tokenized into the training
    folder by mistake replaced the training tokens without a word. It says what it replaced."""
    tokenize = load_script("launch/tokenize_images.py", "tokenize_rerun")
    _tiny_dvae(tmp_path / "dvae.pt")
    argv = ["--dvae", str(tmp_path / "dvae.pt"), "--out", str(tmp_path / "tok")]
    assert tokenize.main([*argv, "--num_samples", "4"]) == 0
    assert "replaced" not in capsys.readouterr().err
    assert tokenize.main([*argv, "--split", "test_id", "--num_samples", "2"]) == 0
    assert f"note: --out {tmp_path / 'tok'} held token shards (4 rows of shapes split 'train'): replaced" in \
        capsys.readouterr().err
    assert len(TokenShardDataset(tmp_path / "tok")) == 2


def test_a_rerun_that_fails_part_way_keeps_the_earlier_shards(tmp_path, capsys, monkeypatch):
    """A re-run writes into <out>/incomplete/ and replaces the folder's set only once its own is complete: it removed
    the earlier shards first, so a re-run that failed or was stopped part-way lost a complete token set."""
    tokenize = load_script("launch/tokenize_images.py", "tokenize_fail")
    _tiny_dvae(tmp_path / "dvae.pt")
    out = tmp_path / "tok"
    argv = ["--dvae", str(tmp_path / "dvae.pt"), "--out", str(out), "--rows_per_shard", "2"]
    assert tokenize.main([*argv, "--num_samples", "4"]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert not (out / tokenize.STAGING).exists() and "meta.json" in before

    def stopped(*a, **k):  # the encoder fails after the first batch's part is written
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenize, "all_parts", stopped)
    with pytest.raises(KeyboardInterrupt):
        tokenize.main([*argv, "--split", "test_id", "--num_samples", "2"])
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    assert len(TokenShardDataset(out)) == 4 and list((out / tokenize.STAGING).glob("part-*"))
    monkeypatch.undo()
    capsys.readouterr()
    assert tokenize.main([*argv, "--split", "test_id", "--num_samples", "2"]) == 0
    err = capsys.readouterr().err
    assert "the shards of an unfinished earlier run" in err and "4 rows of shapes split 'train'): replaced" in err
    assert len(TokenShardDataset(out)) == 2 and not (out / tokenize.STAGING).exists()
    assert sorted(f.name for f in out.iterdir()) == ["meta.json", "part-0-00000.jsonl", "part-0-00000.tokens.npy"]
