"""launch/plot_scales.py: per-resblock scales from a run's metric histories (or its CSV monitor files) to SVG + CSV."""
import csv
import json
import sys

import pytest

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "launch"))
import plot_scales  # noqa: E402


def _rows(steps, skip_at=()):
    return [{"step": s, "loss": 1.0, "grad_scale_skip": float(s in skip_at),
             "grad_scale_log2/000_attn": 13 + s / 1000, "grad_scale_log2/001_mlp": 13 + s / 1000 - 0.5 * (s > 5)}
            for s in steps]


def test_json_histories_of_a_resumed_run(tmp_path):
    (tmp_path / "dalle_partial_metrics.json").write_text(json.dumps({"history": _rows(range(1, 6))}))
    (tmp_path / "dalle_metrics.json").write_text(json.dumps({"history": _rows(range(6, 11), skip_at=(6,))}))
    assert plot_scales.main(["--run", str(tmp_path), "--out", str(tmp_path / "fig")]) == 0
    table = list(csv.reader((tmp_path / "fig.csv").open()))
    assert table[0] == ["step", "000_attn", "001_mlp"] and [r[0] for r in table[1:]] == [str(s) for s in range(1, 11)]
    assert float(table[6][2]) == pytest.approx(13.006 - 0.5)
    svg = (tmp_path / "fig.svg").read_text()
    assert svg.count("<polyline") == 2 and "1 skipped of 10 logged" in svg and "stroke-dasharray" in svg


def test_csv_monitor_fallback_and_a_run_without_scales(tmp_path):
    mon = tmp_path / "monitor" / "dalle"
    mon.mkdir(parents=True)
    for name in ("000_attn", "001_mlp"):
        with (mon / f"dalle_grad_scale_log2_{name}.csv").open("w") as fh:
            fh.write(f"step,{name}\n1,13.001\n2,13.002\n")
    steps, series, skipped = plot_scales.load_scales(tmp_path)
    assert steps == [1, 2] and series == {"000_attn": [13.001, 13.002], "001_mlp": [13.001, 13.002]}
    assert skipped == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="resblock_grad_scaling"):
        plot_scales.load_scales(empty)


@pytest.mark.parametrize("out, stem", [("scales_lr1.5e-3", "scales_lr1.5e-3"), ("fig.svg", "fig")])
def test_out_is_a_prefix_even_with_a_dot_in_it(tmp_path, out, stem):
    """OUT.svg and OUT.csv: a dot in OUT (a learning rate in the name) is kept, not taken for a suffix and cut
    (scales_lr1.5e-3 and scales_lr1.7e-3 both became scales_lr1.svg); naming one of the two files gives its stem."""
    (tmp_path / "dalle_metrics.json").write_text(json.dumps({"history": _rows(range(1, 4))}))
    assert plot_scales.main(["--run", str(tmp_path), "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / f"{stem}.svg").is_file() and (tmp_path / f"{stem}.csv").is_file()
