"""benchmarks/prompt_edit.py: the scenes it picks split at the prompt rows, its edits change only the lower object
(never into a held-out pair or a twin of the upper one, the caption rewritten in the same words), and its harness
runs end to end on a tiny untrained prior (scores are not checked)."""
import json
import sys

import numpy as np
import pytest

from dalle_ds.data.shapes import caption_phrase, edit_object, held_out_pairs, sample_scene
from launch_utils import ROOT
from tiny_artifacts import export_tiny_text_to_image

sys.path.insert(0, str(ROOT / "benchmarks"))
import prompt_edit  # noqa: E402


def test_edit_object_rewrites_the_caption_in_its_own_words():
    scene = next(s for s in (sample_scene(0, "train", i) for i in range(200)) if s["relation"] == "below"
                 and "under" in s["caption"])
    new = edit_object(scene, 1, color="green", shape="cross")
    assert new["objects"][0] == scene["objects"][0]
    assert new["objects"][1]["color"] == "green" and new["objects"][1]["shape"] == "cross"
    assert new["objects"][1]["center"] == scene["objects"][1]["center"]
    assert caption_phrase(new) == caption_phrase(scene) == "under"
    assert new["caption"].endswith(f"under a {scene['objects'][1]['size']} green cross")
    assert scene["objects"][1] is not new["objects"][1]  # the original scene is untouched
    with pytest.raises(ValueError, match="not \\['size'\\]"):
        edit_object(scene, 0, size="small")


def test_picked_scenes_split_at_the_prompt_rows_and_edits_touch_only_the_lower_object():
    seed = int(np.random.default_rng().integers(1000))
    scenes = prompt_edit.pick_scenes(40, "test_id", seed, rows=8, grid=16, image_size=64)
    rng = np.random.default_rng(seed)
    held = set(held_out_pairs())
    assert {s["relation"] for s in scenes} == {"above", "below"}  # the upper object is the first or the second
    assert not any(map(prompt_edit.lower_is_held_out, scenes))  # test_id holds no held-out pair
    for s in scenes:
        up, low = sorted(s["objects"], key=lambda o: o["center"][1])  # image y grows downwards
        assert [s["objects"][i] for i in prompt_edit.upper_lower(s)] == [up, low]
        assert up["center"][1] + up["half_size"] <= 32 <= low["center"][1] - low["half_size"]
        for attribute in ("color", "shape"):
            e = prompt_edit.edited(s, attribute, rng)
            u, l = prompt_edit.upper_lower(e)
            assert e["objects"][u] == s["objects"][u]
            changed = {a for a in ("color", "shape", "size", "center") if e["objects"][l][a] != s["objects"][l][a]}
            assert changed == {attribute}
            pair = (e["objects"][l]["color"], e["objects"][l]["shape"])
            assert pair not in held and pair != (e["objects"][u]["color"], e["objects"][u]["shape"])
            assert e["caption"] != s["caption"] and caption_phrase(e) == caption_phrase(s)
    # scenes it must refuse: a horizontal relation, and an upper object that reaches past the cut
    horizontal = next(s for s in (sample_scene(0, "train", i) for i in range(100)) if s["relation"] == "left of")
    assert not prompt_edit.split_by_rows(horizontal, 8, 16)
    assert not prompt_edit.split_by_rows(scenes[0], 1, 16)


def test_prompt_edit_harness_runs(tmp_path):
    prior = export_tiny_text_to_image(tmp_path, [sample_scene(0, "train", i)["caption"] for i in range(50)],
                                      image_size=64, text_len=16, tokenizer_vocab=300)
    out = tmp_path / "pe"
    assert prompt_edit.main(["--prior", str(prior), "--num_scenes", "2", "--split", "test_ood",
                             "--num_candidates", "2", "--figure_rows", "2", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["prompt_rows"] == 8 and set(result["top1"]) == {*prompt_edit.CONDITIONS, prompt_edit.REFERENCE}
    assert all(result["top1"][c]["n"] == 2 for c in prompt_edit.CONDITIONS)
    assert set(result["chance"]) == {"own vs colour edit", "own vs shape edit"}
    unseen = sum(map(prompt_edit.lower_is_held_out, prompt_edit.pick_scenes(2, "test_ood", 0, 8, 16, 64)))
    assert unseen and all(v["n"] == unseen for v in result["lower_held_out"].values())
    assert set(result["lower_held_out"]) == {"own", prompt_edit.REFERENCE}
    assert "| colour edit | 2 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").is_file()
