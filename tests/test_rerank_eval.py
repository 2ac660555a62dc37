"""benchmarks/rerank_eval.py: the references it reports are computed on the saved candidates, and bad files fail."""
import sys

import pytest
import torch

from dalle_ds.data.shapes import render_scene_tensor, sample_scene
from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_first_sample_and_best_by_scorer(tmp_path, capsys):
    import rerank_eval

    scenes = [sample_scene(0, "test_id", i) for i in range(6)]
    # Candidate 0 is another scene's picture, candidate 1 the right one: no reranking gets 0, the ceiling 1.
    images = torch.stack([torch.stack([render_scene_tensor(scenes[(i + 1) % 6]), render_scene_tensor(s)])
                          for i, s in enumerate(scenes)])
    path = tmp_path / "candidates.pt"
    torch.save({"captions": [s["caption"] for s in scenes], "scenes": scenes, "images": images}, path)
    assert rerank_eval.main([str(path), "--num_candidates", "1", "2", "--out", str(tmp_path / "r.json")]) == 0
    import json

    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert results["first_sample_no_rerank"]["exact"] == 0.0
    assert results["best_by_scorer@1"]["exact"] == 0.0 and results["best_by_scorer@2"]["exact"] == 1.0
    assert "best_by_scorer@2" in capsys.readouterr().out

    torch.save({"captions": ["x"], "scenes": [None], "images": images[:1]}, path)
    with pytest.raises(ValueError, match="without shapes scenes"):
        rerank_eval.load_candidates(path)
    torch.save({"captions": ["x"], "scenes": scenes[:1], "images": images[:1].float()}, path)
    with pytest.raises(ValueError, match="uint8"):
        rerank_eval.load_candidates(path)


def test_captions_of_one_kind_and_bad_files_on_the_command_line(tmp_path, capsys):
    """Only two-object captions: the one-object column has no value and prints '-' (it used to raise TypeError);
    a file without scenes is a command-line error, not a traceback."""
    import rerank_eval

    scenes = [s for s in (sample_scene(0, "test_id", i) for i in range(8)) if len(s["objects"]) == 2][:3]
    images = torch.stack([torch.stack([render_scene_tensor(s)]) for s in scenes])
    path = tmp_path / "candidates.pt"
    torch.save({"captions": [s["caption"] for s in scenes], "scenes": scenes, "images": images}, path)
    assert rerank_eval.main([str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("first_sample_no_rerank"))
    assert line.split()[-2:] == ["-", "1.000"]
    torch.save({"captions": ["x"], "scenes": [None], "images": images[:1]}, path)
    with pytest.raises(SystemExit):
        rerank_eval.main([str(path)])
    assert "without shapes scenes (use --shapes_split)" in capsys.readouterr().err
