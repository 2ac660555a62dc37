"""launch/plot_metrics.py: charts from the CSV monitor files a run wrote, resumed runs included."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import plot_metrics  # noqa: E402

from dalle_ds.train.monitor_resume import read_csv_series  # noqa: E402


def _csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{s},{v}\n" for s, v in rows))


def test_charts_from_monitor_files(tmp_path):
    run = tmp_path / "dalle_run"
    mon = run / "monitor" / "dalle"
    _csv(mon / "dalle_loss.csv", "step,loss", [(10, 4.0), (20, 3.0), (30, 2.5)])
    # a resumed run appends a second header and may rewrite a step: the last value wins
    (mon / "dalle_loss.csv").write_text((mon / "dalle_loss.csv").read_text() + "step,loss\n30,2.0\n40,1.5\n")
    _csv(mon / "dalle_image_loss.csv", "step,image_loss", [(10, 3.5), (20, 2.6), (30, 1.9), (40, 1.4)])
    _csv(mon / "dalle_eval_val_loss.csv", "step,val_loss", [(20, 3.1), (40, 1.8)])
    _csv(mon / "dalle_perf_samples_per_second.csv", "step,x", [(10, 100.0), (40, 120.0)])
    _csv(mon / "dalle_perf_data_wait_fraction.csv", "step,x", [(10, 0.02), (40, 0.01)])
    _csv(mon / "dalle_lr.csv", "step,lr", [(10, 1e-3)])
    assert read_csv_series(mon / "dalle_loss.csv") == {10: 4.0, 20: 3.0, 30: 2.0, 40: 1.5}
    written = plot_metrics.main([str(run)])
    assert sorted(p.name for p in written) == ["curves_dalle_data_wait.svg", "curves_dalle_heldout.svg",
                                               "curves_dalle_pace.svg", "curves_dalle_train.svg"]
    assert "perf_data_wait_fraction" not in (run / "curves_dalle_pace.svg").read_text()
    train = (run / "curves_dalle_train.svg").read_text()
    assert "image_loss" in train and ">lr<" not in train and "val_loss" not in train
    # one polyline per series, with a point per step it has (the union of steps is the x axis)
    points = [len(m.split()) for m in re.findall(r'points="([^"]*)"', train)]
    assert sorted(points) == [4, 4]
    with pytest.raises(SystemExit):
        plot_metrics.main([str(tmp_path / "nowhere")])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):  # --out under a file: refused by the parser, before anything is drawn
        plot_metrics.main([str(run), "--out", str(tmp_path / "a_file" / "svgs")])
    (mon / "dalle_lr.csv").write_text("step,lr\n10,1e-3\n20,2,3\n")  # a damaged row: the file and line named
    with pytest.raises(ValueError, match=r"dalle_lr.csv, line 3: want step,value, got '20,2,3'"):
        read_csv_series(mon / "dalle_lr.csv")
    with pytest.raises(SystemExit):
        plot_metrics.main([str(run)])


def test_two_runs_of_one_job_in_one_out_keep_both(tmp_path, capsys):
    """Two priors compared into one --out: the second run's curves_dalle_*.svg replaced the first's without a word;
    the names then carry the run folder's name. Runs whose folder names repeat too are refused."""
    for name, loss in (("lr1e-3", 2.0), ("lr3e-3", 3.0)):
        _csv(tmp_path / name / "monitor" / "dalle" / "dalle_loss.csv", "step,loss", [(10, loss), (20, loss / 2)])
    written = plot_metrics.main([str(tmp_path / "lr1e-3"), str(tmp_path / "lr3e-3"), "--out", str(tmp_path / "f")])
    assert sorted(p.name for p in written) == ["curves_lr1e-3_dalle_train.svg", "curves_lr3e-3_dalle_train.svg"]
    assert len({p.read_text() for p in written}) == 2
    _csv(tmp_path / "x" / "lr1e-3" / "monitor" / "dalle" / "dalle_loss.csv", "step,loss", [(10, 1.0)])
    with pytest.raises(SystemExit):
        plot_metrics.main([str(tmp_path / "lr1e-3"), str(tmp_path / "x" / "lr1e-3"), "--out", str(tmp_path / "g")])
    assert "would write the same charts" in capsys.readouterr().err and not (tmp_path / "g").exists()
