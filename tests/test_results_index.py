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
