"""launch/demo_report.py: a run folder that is not there is one error line, not a traceback."""
from launch_utils import load_script

demo_report = load_script("launch/demo_report.py", "demo_report")


def test_a_missing_run_folder_is_an_error_line(tmp_path, capsys):
    assert demo_report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nope'} is not a folder") and not (tmp_path / "nope").exists()
    (tmp_path / "run").mkdir()  # an empty run (stopped before any stage) still reports
    assert demo_report.main([str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "metrics.json").is_file()
