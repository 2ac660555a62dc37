"""benchmarks/results/README.md lists every committed report: regenerate it with
`python benchmarks/results_index.py` after adding results (a device session's included)."""
import sys

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_results_index_is_current(capsys):
    import results_index

    assert results_index.main(["--check"]) == 0, capsys.readouterr().err


def test_every_report_is_listed_once():
    import results_index

    text = results_index.INDEX.read_text()
    reports = [p.name for p in results_index.RESULTS.glob("*.md") if p.name != "README.md"]
    assert reports and all(text.count(f"[{name}]({name})") == 1 for name in reports)


def test_check_fails_on_a_stale_index(tmp_path, monkeypatch):
    import results_index

    stale = tmp_path / "README.md"
    stale.write_text(results_index.render().replace("| 2026-", "| 2025-", 1))
    monkeypatch.setattr(results_index, "INDEX", stale)
    assert results_index.main(["--check"]) == 1


def test_any_device_tag_the_benchmarks_write_is_indexed(tmp_path, monkeypatch):
    """File names carry timing.device_tag's tag: GPUs other than the ones seen so far (b200, l40s, a10g) too."""
    import results_index
    from timing import device_tag

    names = ["NVIDIA B200", "NVIDIA L40S", "NVIDIA A10G", "NVIDIA GH200 480GB", "NVIDIA H100 80GB HBM3"]
    for name in names:
        (tmp_path / f"fp169_{device_tag(name)}_20261207.md").write_text("# fp169\n")
    (tmp_path / "attn_sass_triton3.6.0_20261206.md").write_text("# sass\n")
    (tmp_path / "b200_20261207_session.md").write_text("# session\n")
    monkeypatch.setattr(results_index, "RESULTS", tmp_path)
    found = results_index.reports()
    assert sorted(r["device"] for r in found["fp169"]) == ["a10g", "b200", "gh200", "h100", "l40s"]
    assert found["attn_sass"][0]["device"] == "sm_90 code, triton 3.6.0"
    assert found[results_index.SESSION][0]["device"] == "b200"
