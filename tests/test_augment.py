"""The paper's random crops (Listings 1 and 2, dalle_ds/data/augment.py), the aspect-ratio filter, and their way
through the datasets, the sampler and the configs."""
import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ds.config import ConfigError, DataConfig
from dalle_ds.data.augment import (CropPlan, PaperCrop, apply_plan, area_resize, aspect_ratio_ok, describe_crops,
                                   dvae_plan, prior_plan)
from dalle_ds.data.folder import ImageTextFolder
from dalle_ds.data.images import collate_samples
from dalle_ds.train.data_loading import StepBatches
from tiny_artifacts import write_image_folder

DRAWS = 3000


pytestmark = pytest.mark.usefixtures("hf_tmp_home")  # tests/conftest.py


def _plans(fn, w, h, size, seed):
    rng = np.random.default_rng(seed)
    return [fn(w, h, size, rng) for _ in range(DRAWS)]


def _values(plans, field):
    return {getattr(p, field) for p in plans}


def test_dvae_listing_bounds():
    """Listing 1 at the paper's size: square anywhere, t uniform over [288, 384] (9/8 and 12/8 of 256), crop offsets
    over 0 ... t - 256, a flip half the time. Every end of every range is reached, nothing beyond."""
    w, h, size = 500, 400, 256
    plans = _plans(dvae_plan, w, h, size, np.random.SeedSequence().entropy)  # fresh draws each run
    assert _values(plans, "side") == {400} and _values(plans, "top") == {0}
    assert _values(plans, "left") <= set(range(0, 101)) and {0, 100} <= _values(plans, "left")
    assert _values(plans, "t") <= set(range(288, 385)) and {288, 384} <= _values(plans, "t")
    for p in plans:
        assert 0 <= p.x <= p.t - size and 0 <= p.y <= p.t - size
    assert any(p.x == p.t - size for p in plans) and any(p.y == 0 for p in plans)
    flips = sum(p.flip for p in plans) / DRAWS
    assert abs(flips - 0.5) < 4 * (0.25 / DRAWS) ** 0.5  # 4 standard deviations


def test_prior_listing_bounds():
    """Listing 2: along the longer side the square's offset lies in the middle quarter of the slack,
    [3/8, 5/8) of it (TF's exclusive upper bound), t in [256, 288], no flip; a square image is never shifted."""
    size = 256
    for w, h in ((1000, 300), (300, 1000)):
        plans = _plans(prior_plan, w, h, size, np.random.SeedSequence().entropy)
        long_side = "left" if w > h else "top"
        offsets = _values(plans, long_side)
        assert offsets <= set(range(262, 437)) and {262, 436} <= offsets  # slack 700: 3*700//8, 5*700//8 - 1
        assert _values(plans, "top" if w > h else "left") == {0}
        assert _values(plans, "t") <= set(range(256, 289)) and {256, 288} <= _values(plans, "t")
        assert not any(p.flip for p in plans)
    square = _plans(prior_plan, 300, 300, size, 0)
    assert _values(square, "left") == {0} == _values(square, "top")
    narrow = _plans(prior_plan, 260, 270, size, 0)  # slack 10: the range [3, 6)
    assert _values(narrow, "top") == {3, 4, 5} and _values(narrow, "t") == {256, 257, 258, 259, 260}


def test_small_images_are_scaled_up():
    """Smaller than the target (where the listings' crop would fail): the square is scaled up to the target."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for fn in (dvae_plan, prior_plan):
        plan = fn(30, 20, 64, rng)
        assert plan.side == 20 and plan.t == 20 < 64 and (plan.x, plan.y) == (0, 0)
        assert apply_plan(img, plan, 64).size == (64, 64)


def test_apply_plan_crops_the_planned_pixels():
    """Without a resize (t = side) the output is exactly the planned window of the planned square, mirrored when
    flip is set: checked on an image whose pixels encode their own coordinates."""
    h, w, size = 90, 120, 64
    yy, xx = np.mgrid[0:h, 0:w]
    coded = np.stack([xx, yy, (xx + yy) % 256], axis=-1).astype(np.uint8)
    img = Image.fromarray(coded)
    for flip in (False, True):
        plan = CropPlan(left=17, top=0, side=90, t=90, x=11, y=23, flip=flip)
        expect = coded[23:23 + size, 17 + 11:17 + 11 + size]
        expect = expect[:, ::-1] if flip else expect
        np.testing.assert_array_equal(np.asarray(apply_plan(img, plan, size)), expect)
    grey = Image.fromarray(coded[..., 0], "L")  # any mode comes out RGB
    assert apply_plan(grey, CropPlan(0, 0, 90, 90, 0, 0, False), size).mode == "RGB"


def _area_reference(arr, size):
    """TF's AREA by definition, in float64: output pixel (i, j) averages the input over the square
    [i, i+1) x [j, j+1) * n/size, each input pixel weighted by the area of it that the square covers."""
    n = arr.shape[0]
    step = n / size
    cover = np.zeros((size, n))
    for i in range(size):
        lo, hi = i * step, (i + 1) * step
        for k in range(n):
            cover[i, k] = max(0.0, min(hi, k + 1) - max(lo, k)) / step
    return np.stack([cover @ arr[..., c].astype(np.float64) @ cover.T for c in range(arr.shape[-1])], axis=-1)


@pytest.mark.parametrize("n,size", [(128, 64), (97, 40), (300, 256), (50, 49), (64, 64), (30, 45)])
def test_area_resize_is_tf_area(n, size):
    """The area resize equals the fractional-coverage mean (rounded), for whole and fractional factors; at 2x it is
    the rounded 2 x 2 block mean (Pillow's BOX is not: it rounds between its two passes)."""
    arr = np.random.default_rng().integers(0, 256, (n, n, 3), dtype=np.uint8)
    ref = _area_reference(arr, size)
    out = area_resize(arr, size).astype(np.float64)
    assert np.abs(out - ref).max() <= 0.5 + 1e-9
    if n == 2 * size:
        assert np.abs(out - arr.astype(np.float64).reshape(size, 2, size, 2, 3).mean(axis=(1, 3))).max() <= 0.5 + 1e-9
    flat = np.full((n, n, 3), 77, dtype=np.uint8)
    assert (area_resize(flat, size) == 77).all()


def test_paper_crop_is_a_function_of_seed_listing_and_key():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    crop = PaperCrop("dvae", 256, seed=3)
    a = np.asarray(crop(img, (0, 5)))
    assert a.shape == (256, 256, 3)
    np.testing.assert_array_equal(a, np.asarray(PaperCrop("dvae", 256, seed=3)(img, (0, 5))))
    assert crop.plan(400, 300, (1, 5)) != crop.plan(400, 300, (0, 5))  # another epoch, another crop
    assert PaperCrop("dvae", 256, seed=4).plan(400, 300, (0, 5)) != crop.plan(400, 300, (0, 5))
    with pytest.raises(ValueError, match="listing"):
        PaperCrop("clip", 256)


def test_aspect_ratio_filter():
    assert aspect_ratio_ok(200, 100, 2.0) and aspect_ratio_ok(100, 200, 2.0)
    assert not aspect_ratio_ok(201, 100, 2.0) and not aspect_ratio_ok(100, 201, 2.0)
    assert aspect_ratio_ok(1000, 10, 0)


def test_folder_crops_by_sample_key_and_filters_aspect_ratios(tmp_path):
    """``ds[i]`` stays the centre square; ``ds[(epoch, i)]`` is that epoch's crop of the kept image i; a 3:1 image is
    left out with max_aspect_ratio 2 (counted), in the up-front pass and, without it, on first read."""
    root = write_image_folder(tmp_path / "data", [(80, 60), (90, 30), (64, 64), (70, 100)])
    plain = ImageTextFolder(root, image_size=32, cache_dir=tmp_path / "c")
    crop = PaperCrop("prior", 32, seed=1)
    ds = ImageTextFolder(root, image_size=32, cache_dir=tmp_path / "c", crop=crop, max_aspect_ratio=2.0)
    assert len(plain) == 4 and len(ds) == 3 and ds.stats["aspect_ratio"] == 1 and ds.takes_sample_key
    assert [s["caption"] for s in (ds[0], ds[1], ds[2])] == ["image 0", "image 2", "image 3"]
    torch.testing.assert_close(ds[0]["image"], plain[0]["image"], rtol=0, atol=0)
    original = Image.open(root / "0.png")
    expect = torch.from_numpy(np.asarray(crop(original, (4, 0))).copy()).permute(2, 0, 1)
    torch.testing.assert_close(ds[(4, 0)]["image"], expect, rtol=0, atol=0)
    assert not torch.equal(ds[(4, 0)]["image"], ds[(5, 0)]["image"])
    lazy = ImageTextFolder(root, image_size=32, cache_dir=tmp_path / "c", validate=False, max_aspect_ratio=2.0)
    assert lazy[1]["caption"] == "image 2" and lazy.stats["aspect_ratio"] == 1 and lazy.stats["unreadable"] == 0
    with pytest.raises(ValueError, match="crop makes 64"):
        ImageTextFolder(root, image_size=32, cache_dir=tmp_path / "c", crop=PaperCrop("dvae", 64))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_step_batches_serve_crops_by_epoch_and_resume_them(tmp_path, num_workers):
    """A dataset that takes sample keys is always served tagged: each epoch brings new crops, and a sampler set to
    the same (epoch, position) brings the same ones (what a resumed run sees), in DataLoader workers too."""
    root = write_image_folder(tmp_path / "data", [(60 + 7 * i, 50) for i in range(4)])
    ds = ImageTextFolder(root, image_size=32, cache_dir=tmp_path / "c", crop=PaperCrop("dvae", 32, seed=0))
    batches = StepBatches(ds, micro_batch=2, num_replicas=1, rank=0, seed=0, num_workers=num_workers,
                          collate_fn=collate_samples)
    it = iter(batches)
    epoch0 = [next(it) for _ in range(2)]
    epoch1 = [next(it) for _ in range(2)]
    assert all(k[0] == 0 for b in epoch0 for k in b["sample_key"])
    assert all(k[0] == 1 for b in epoch1 for k in b["sample_key"])
    by_index = {k[1]: img for b in epoch0 for k, img in zip(b["sample_key"], b["image"])}
    again = {k[1]: img for b in epoch1 for k, img in zip(b["sample_key"], b["image"])}
    assert all(not torch.equal(by_index[i], again[i]) for i in range(4))
    resumed = StepBatches(ds, micro_batch=2, num_replicas=1, rank=0, seed=0, num_workers=0,
                          collate_fn=collate_samples)
    resumed.load_state_dict({"epoch": 1, "index": 1})
    torch.testing.assert_close(next(iter(resumed))["image"], epoch1[1]["image"], rtol=0, atol=0)


def test_config_routes_and_refusals(tmp_path):
    root = write_image_folder(tmp_path / "data", [(40, 30)])
    cfg = DataConfig(name="imagefolder", path=str(root), augment="paper", max_aspect_ratio=2.0).validate(32)
    train = cfg.dataset_kwargs("train", 32, crop="dvae", seed=7)
    assert train["crop"] == PaperCrop("dvae", 32, 7) and train["max_aspect_ratio"] == 2.0
    evals = cfg.dataset_kwargs("train", 32)
    assert "crop" not in evals and evals["max_aspect_ratio"] == 2.0
    assert "crop" not in DataConfig(name="imagefolder", path=str(root)).dataset_kwargs("train", 32, crop="dvae")
    bad = [({"augment": "random"}, "augment"), ({"max_aspect_ratio": 0.5}, "max_aspect_ratio")]
    for change, where in bad:
        with pytest.raises(ConfigError, match=where):
            DataConfig(name="imagefolder", path=str(root), **change).validate(32)
    for change in ({"augment": "paper"}, {"max_aspect_ratio": 2.0}):
        with pytest.raises(ConfigError, match="renders its images"):
            DataConfig(name="shapes", **change).validate(64)


def test_stage_configs_refuse_what_they_would_ignore(tmp_path):
    """Token shards hold the crops they were written with, and the paper gives no crops for the CLIP: both refuse
    augment="paper"."""
    from dalle_ds.config import DalleDataConfig

    from tests.unit_shards import write_unit_shards

    write_unit_shards(tmp_path / "tok", 8, 0)
    d = DalleDataConfig(train_tokens=str(tmp_path / "tok"))
    d.images.augment = "paper"
    with pytest.raises(ConfigError, match="token shards hold the crops tokenize_images.py stored"):
        d.validate()
    from dalle_ds.config import CLIP_RUN_PRESETS, apply_overrides

    root = write_image_folder(tmp_path / "data", [(40, 30)])
    with pytest.raises(ConfigError, match="CLIP trains on centred squares"):
        apply_overrides(CLIP_RUN_PRESETS["test"], {"data.name": "imagefolder", "data.path": str(root),
                                                   "data.augment": "paper"}).validate()


def test_dvae_and_prior_trainers_crop_only_their_training_split(tmp_path):
    from dalle_ds.config import DVAE_RUN_PRESETS, apply_overrides
    from dalle_ds.train.dvae_trainer import build_datasets

    root = write_image_folder(tmp_path / "data", [(40, 30), (30, 40)])
    cfg = apply_overrides(DVAE_RUN_PRESETS["test"], {"data.name": "imagefolder", "data.path": str(root),
                                                      "data.augment": "paper", "model.image_size": 16,
                                                      "seed": 5}).validate()
    train, evals = build_datasets(cfg)
    assert train.crop == PaperCrop("dvae", 16, 5) and evals.crop is None
    assert describe_crops(train).startswith("random crops of the paper's Listing 1")
    assert describe_crops(evals) == "centred squares"


def test_bad_geometry_and_inputs_are_named_errors():
    """A 0-pixel image became a black square, float pixels came back as 0s and 1s, size 0 or True passed."""
    rng = np.random.default_rng(0)
    for args, needle in (((0, 40, 32), "width must be a positive int, got 0"),
                         ((40, 0, 32), "height must be a positive int"),
                         ((40, 40, 0), "size must be a positive int, got 0"),
                         ((40, 40, True), "size must be a positive int, got True")):
        for make in (dvae_plan, prior_plan):
            with pytest.raises(ValueError, match=needle):
                make(*args, rng)
    with pytest.raises(ValueError, match="width must be a positive int, got 0"):
        PaperCrop("prior", 32)(Image.new("RGB", (0, 40)), (0, 0))
    with pytest.raises(ValueError, match="size must be a positive int, got True"):
        PaperCrop("prior", True)
    with pytest.raises(TypeError, match=r"key must be the sample's \(epoch, index\), got 5"):
        PaperCrop("prior", 32)(Image.new("RGB", (40, 40)), 5)
    with pytest.raises(TypeError, match="area_resize takes uint8 pixels"):
        area_resize(np.random.rand(20, 20, 3), 10)
    with pytest.raises(ValueError, match="size must be a positive int, got 0"):
        area_resize(np.zeros((20, 20, 3), np.uint8), 0)
    big_plan = prior_plan(500, 400, 32, rng)
    with pytest.raises(ValueError, match="does not fit a 40 x 40 image: it was drawn for another image"):
        apply_plan(Image.new("RGB", (40, 40)), big_plan, 32)
