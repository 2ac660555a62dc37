"""Synthetic shapes dataset: determinism, held-out compositions, geometry constraints, rendering, item format,
image-folder export."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from dalle_ds.data import shapes as S
from dalle_ds.data.shapes import (
    COLORS,
    HELD_OUT_PAIRS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SPLITS,
    ShapesDataset,
    render_scene,
    sample_scene,
    write_imagefolder,
)

N_SPLIT = 3000


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[dict]]:
    """3000 scenes per split (seed 0, 64 px), shared by the checks below."""
    return {split: [sample_scene(0, split, i) for i in range(N_SPLIT)] for split in SPLITS}


def _pairs(scene: dict) -> list[tuple[str, str]]:
    return [(o["color"], o["shape"]) for o in scene["objects"]]


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def test_deterministic_by_seed_split_index():
    for split in SPLITS:
        for i in (0, 7, 1234):
            a, b = sample_scene(3, split, i), sample_scene(3, split, i)
            assert a == b
            assert np.array_equal(render_scene(a), render_scene(b))
    ds1, ds2 = ShapesDataset("test_id", 20, seed=5), ShapesDataset("test_id", 20, seed=5)
    for i in (0, 19, 3):
        x, y = ds1[i], ds2[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["scene"] == y["scene"]
    # Random access does not depend on what was fetched before.
    assert ShapesDataset("train", 100)[42]["scene"] == sample_scene(0, "train", 42)


def test_seeds_and_splits_differ():
    n = 60
    base = [sample_scene(0, "train", i) for i in range(n)]
    other_seed = [sample_scene(1, "train", i) for i in range(n)]
    other_split = [sample_scene(0, "test_id", i) for i in range(n)]
    other_index = base[1:] + base[:1]
    for other in (other_seed, other_split, other_index):
        same = sum(a == b for a, b in zip(base, other))
        assert same == 0
        diff_caption = sum(a["caption"] != b["caption"] for a, b in zip(base, other))
        assert diff_caption >= n - 3  # a few caption collisions are possible (~37k two-object captions)


def test_same_scene_at_64_and_128():
    for i in range(20):
        s64, s128 = sample_scene(0, "train", i, 64), sample_scene(0, "train", i, 128)
        assert s64["caption"] == s128["caption"]
        for o64, o128 in zip(s64["objects"], s128["objects"]):
            assert [2 * c for c in o64["center"]] == o128["center"]
            assert 2 * o64["half_size"] == o128["half_size"]
        # Rendering the 64-px scene at 128 px rescales its geometry: the same picture.
        assert np.array_equal(render_scene(s64, 128), render_scene(s128))


# ---------------------------------------------------------------------------------------------------------------
# Held-out compositions
# ---------------------------------------------------------------------------------------------------------------


def test_held_out_pairs_are_the_diagonal():
    assert len(HELD_OUT_PAIRS) == len(COLORS) == 8
    expected = {
        ("red", "circle"), ("purple", "circle"), ("green", "square"), ("cyan", "square"),
        ("blue", "triangle"), ("orange", "triangle"), ("white", "cross"), ("yellow", "cross"),
    }
    assert set(HELD_OUT_PAIRS) == expected
    # Every colour held out exactly once, every shape exactly twice.
    assert Counter(c for c, _ in HELD_OUT_PAIRS) == Counter({c: 1 for c in COLORS})
    assert Counter(s for _, s in HELD_OUT_PAIRS) == Counter({s: 2 for s in SHAPES})


def test_held_out_pairs_never_in_train_or_test_id(scenes):
    held = set(HELD_OUT_PAIRS)
    for split in ("train", "test_id"):
        for scene in scenes[split]:
            assert not held & set(_pairs(scene)), scene["caption"]
            for color, shape in held:
                assert f"{color} {shape}" not in scene["caption"]


def test_every_test_ood_scene_has_a_held_out_pair(scenes):
    held = set(HELD_OUT_PAIRS)
    found = Counter()
    for scene in scenes["test_ood"]:
        hits = held & set(_pairs(scene))
        assert hits, scene["caption"]
        assert any(f"{c} {s}" in scene["caption"] for c, s in hits)
        found.update(hits)
    assert set(found) == held  # every held-out pair is actually tested


def test_every_colour_and_shape_seen_in_train(scenes):
    shapes_per_color, colors_per_shape = defaultdict(set), defaultdict(set)
    for scene in scenes["train"]:
        for color, shape in _pairs(scene):
            shapes_per_color[color].add(shape)
            colors_per_shape[shape].add(color)
    assert set(shapes_per_color) == set(COLORS)
    assert set(colors_per_shape) == set(SHAPES)
    # Each colour with all 3 of its non-held-out shapes, each shape with all 6 of its non-held-out colours.
    assert all(len(v) == len(SHAPES) - 1 for v in shapes_per_color.values())
    assert all(len(v) == len(COLORS) - 2 for v in colors_per_shape.values())


def test_extra_shapes_hold_out_the_diagonal_over_six_shapes():
    held = set(S.held_out_pairs(S.ALL_SHAPES))
    assert ("purple", "diamond") in held and ("cyan", "star") in held and ("white", "square") in held
    seen = Counter()
    for i in range(300):
        train = sample_scene(0, "train", i, 128, extra_shapes=True)
        assert not held & set(_pairs(train))
        seen.update(s for _, s in _pairs(train))
        assert held & set(_pairs(sample_scene(0, "test_ood", i, 128, extra_shapes=True)))
    assert set(seen) == set(S.ALL_SHAPES)


# ---------------------------------------------------------------------------------------------------------------
# Scene distribution and geometry constraints
# ---------------------------------------------------------------------------------------------------------------


def test_scene_mix_and_vocabulary(scenes):
    train = scenes["train"]
    one = [s for s in train if len(s["objects"]) == 1]
    assert 0.25 < len(one) / len(train) < 0.35
    assert {s["position"] for s in one} == set(POSITIONS)
    assert {s["relation"] for s in train if len(s["objects"]) == 2} == set(RELATIONS)
    assert all(s["relation"] is None for s in one) and all(s["position"] is None for s in train if s not in one)
    assert {o["size"] for s in train for o in s["objects"]} == {"small", "large"}


def test_geometry_constraints(scenes):
    """The constraints that make every caption attribute unambiguous in the image (see shapes.py docstring).

    Literal numbers on purpose (64-px units): the scorer's margins were measured against exactly these."""
    border, gap, ratio, axis_margin, cell_margin = 2.0, 4.0, 1.5, 4.0, 4.0
    for split in SPLITS:
        for scene in scenes[split]:
            objs = scene["objects"]
            for o in objs:
                lo, hi = {"small": (5.0, 7.0), "large": (10.5, 13.0)}[o["size"]]
                assert lo - 1e-3 <= o["half_size"] <= hi + 1e-3
                for c in o["center"]:
                    assert o["half_size"] + border - 1e-3 <= c <= 64 - o["half_size"] - border + 1e-3
            if len(objs) == 1:
                (cx, cy), cell = objs[0]["center"], 64 / 3
                row, col = divmod(POSITIONS.index(scene["position"]), 3)
                assert col * cell + cell_margin - 1e-3 <= cx <= (col + 1) * cell - cell_margin + 1e-3
                assert row * cell + cell_margin - 1e-3 <= cy <= (row + 1) * cell - cell_margin + 1e-3
                continue
            a, b = objs
            assert (a["color"], a["shape"]) != (b["color"], b["shape"])
            dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
            reach = a["half_size"] + b["half_size"]
            assert max(abs(dx), abs(dy)) - reach >= gap - 1e-2  # boxes never closer than 4 px
            main, other = {"above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy)}[
                scene["relation"]
            ]
            assert main >= ratio * abs(other) + axis_margin - 1e-2


def test_captions_match_scene_and_vary(scenes):
    phrases = Counter()
    for scene in scenes["train"]:
        cap = scene["caption"]
        assert cap == cap.lower() and cap.startswith("a ")
        for o in scene["objects"]:
            assert f"a {o['size']} {o['color']} {o['shape']}" in cap
        table = S.RELATION_PHRASES if scene["relation"] else S.POSITION_PHRASES
        key = scene["relation"] or scene["position"]
        used = [p for p in table[key] if f" {p} " in f" {cap} "]
        assert used, cap
        phrases[max(used, key=len)] += 1
    # Paraphrases occur: both wordings of "left of", "below"/"under", and the corner variants.
    for p in ("to the left of", "left of", "below", "under", "in the top left", "in the top left corner"):
        assert phrases[p] > 0, p


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128])
def test_render_colours_and_antialiasing(size):
    for i in range(10):
        scene = sample_scene(2, "train", i, size, extra_shapes=(size == 128 and i % 2 == 0))
        img = render_scene(scene)
        assert img.dtype == np.uint8 and img.shape == (size, size, 3)
        assert (img[0] == 0).all() and (img[:, -1] == 0).all()  # plain black background, nothing at the border
        for o in scene["objects"]:
            x, y = (int(c) for c in o["center"])
            assert tuple(img[y, x]) == COLORS[o["color"]]  # the box centre is inside every shape
        # Anti-aliased: edge pixels are partial mixes of colour and background, a few per cent of the object.
        fg = img.max(axis=-1) > 0
        full = np.zeros(fg.shape, dtype=bool)
        for o in scene["objects"]:
            full |= (img == np.array(COLORS[o["color"]], dtype=np.uint8)).all(axis=-1)
        assert 0 < (fg & ~full).sum() < 0.6 * fg.sum()


def test_parsed_scene_cannot_be_rendered():
    with pytest.raises(ValueError, match="no geometry"):
        render_scene({"objects": [{"color": "red", "shape": "circle", "size": "small"}]})


# ---------------------------------------------------------------------------------------------------------------
# Dataset item format and argument errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128])
def test_dataset_item_format(size):
    ds = ShapesDataset("test_ood", num_samples=7, seed=3, image_size=size)
    assert len(ds) == 7
    item = ds[6]
    assert set(item) == {"image", "caption", "scene"}
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (3, size, size)
    assert isinstance(item["caption"], str) and item["caption"] == item["scene"]["caption"]
    assert json.loads(json.dumps(item["scene"])) == item["scene"]
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), render_scene(item["scene"]))
    with pytest.raises(IndexError):
        ds[7]
    assert len(list(iter(ds))) == 7  # the sequence protocol stops at the end
    assert ds.captions() == [ds[i]["caption"] for i in range(7)] and ds.captions(2) == ds.captions()[:2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("validation")
    with pytest.raises(ValueError, match="split"):
        sample_scene(0, "test", 0)
    for bad in (32, 96, 256):
        with pytest.raises(ValueError, match="image_size"):
            ShapesDataset("train", image_size=bad)
        with pytest.raises(ValueError, match="image_size"):
            sample_scene(0, "train", 0, image_size=bad)
    with pytest.raises(ValueError, match="non-negative"):
        ShapesDataset("train", 10)[-1]
    with pytest.raises(ValueError, match="non-negative"):
        sample_scene(0, "train", -1)
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset("train", num_samples=-5)
    with pytest.raises(ValueError, match="extra_shapes"):
        ShapesDataset("train", image_size=64, extra_shapes=True)


# ---------------------------------------------------------------------------------------------------------------
# Image-folder export
# ---------------------------------------------------------------------------------------------------------------


def test_write_imagefolder_and_cli(tmp_path, capsys):
    from PIL import Image

    meta = write_imagefolder(tmp_path / "ood", "test_ood", 5, seed=2)
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    assert len(rows) == 5
    for i, row in enumerate(rows):
        assert set(row) == {"file_name", "text", "scene"}
        scene = sample_scene(2, "test_ood", i)
        assert row["scene"] == scene and row["text"] == scene["caption"]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "ood" / row["file_name"])), render_scene(scene))

    S.main(["--out", str(tmp_path / "cli"), "--split", "train", "--n", "3", "--image-size", "128"])
    assert "wrote 3 train samples" in capsys.readouterr().out
    assert len((tmp_path / "cli" / "metadata.jsonl").read_text().splitlines()) == 3
    assert Image.open(tmp_path / "cli" / "000002.png").size == (128, 128)
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path / "bad"), "--split", "nope"])


def test_imagefolder_loads_with_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets", reason="HF datasets not installed")
    write_imagefolder(tmp_path / "data", "train", 4)
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "data"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 4
    row = ds[1]
    assert row["text"] == sample_scene(0, "train", 1)["caption"]
    assert row["scene"]["objects"][0]["color"] == sample_scene(0, "train", 1)["objects"][0]["color"]
    assert np.array_equal(np.asarray(row["image"]), render_scene(sample_scene(0, "train", 1)))


def test_contrast_caption_is_false_in_exactly_the_named_attribute():
    from dalle_ds.eval.shapes_scorer import parse_caption, score_image

    rng = np.random.default_rng(0)
    seen = Counter()
    for split in ("train", "test_ood"):
        for i in range(150):
            scene = S.sample_scene(0, split, i)
            caption, attr = S.contrast_caption(scene, rng)
            seen[attr] += 1
            truth, fake = parse_caption(scene["caption"]), parse_caption(caption)  # stays in the grammar
            image = S.render_scene(scene)
            assert score_image(image, truth)["exact"] and not score_image(image, fake)["exact"], caption
            changed = {a for a in ("relation", "position") if truth[a] != fake[a]}
            changed |= {a for o, f in zip(truth["objects"], fake["objects"]) for a in ("color", "shape", "size")
                        if o[a] != f[a]}
            assert changed == {attr}, (scene["caption"], caption, attr)
    assert set(seen) == set(S.CONTRAST_ATTRIBUTES)
    two = next(s for s in (S.sample_scene(0, "train", i) for i in range(50)) if s["relation"])
    one = next(s for s in (S.sample_scene(0, "train", i) for i in range(50)) if s["position"])
    for attr in ("color", "shape", "size", "relation"):
        assert S.contrast_caption(two, rng, attr)[1] == attr
    assert S.contrast_caption(one, rng, "position")[0] != one["caption"]
    with pytest.raises(ValueError, match="cannot contrast 'position'"):
        S.contrast_caption(two, rng, "position")
    with pytest.raises(ValueError, match="does not follow"):
        S.contrast_caption({**two, "caption": "a red circle"}, rng)


def test_binding_captions_are_false_only_in_which_object_is_where_or_has_which_colour():
    from dalle_ds.eval.shapes_scorer import parse_caption, score_image

    counts = Counter()
    for split in ("train", "test_ood"):
        for i in range(120):
            scene = S.sample_scene(0, split, i)
            captions = S.binding_captions(scene)
            if not scene["relation"]:
                assert captions == []
                continue
            a, b = scene["objects"]
            assert len(captions) == (2 if a["color"] != b["color"] else 1)
            truth = parse_caption(scene["caption"])
            image = S.render_scene(scene)
            assert score_image(image, truth)["exact"]
            for k, caption in enumerate(captions):
                fake = parse_caption(caption)  # stays in the grammar
                assert not score_image(image, fake)["exact"], (scene["caption"], caption)
                words_truth = sorted(w for o in truth["objects"] for w in (o["color"], o["shape"], o["size"]))
                words_fake = sorted(w for o in fake["objects"] for w in (o["color"], o["shape"], o["size"]))
                assert words_fake == words_truth  # the same words, bound differently
                if k == 0:
                    assert fake["relation"] == S.OPPOSITE_RELATION[truth["relation"]]
                    assert fake["objects"] == truth["objects"]
                else:
                    assert fake["relation"] == truth["relation"]
                    assert [o["color"] for o in fake["objects"]] == [o["color"] for o in truth["objects"]][::-1]
                counts[k] += 1
    assert counts[0] > 50 and counts[1] > 40
