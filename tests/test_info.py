"""``python -m dalle_ds.info``: the environment report users paste into bug reports."""
import json
import os
import subprocess
import sys

from launch_utils import ROOT


def _info(env_extra: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    proc = subprocess.run([sys.executable, "-m", "dalle_ds.info", "--json"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_info_reports_versions_devices_backends_and_the_tuning_cache(tmp_path, monkeypatch):
    cache = tmp_path / "tuning.json"
    info = _info({"DALLE_DS_ATTN_CACHE": str(cache)})
    assert {"versions", "devices", "ops", "datasets"} <= set(info)
    assert info["versions"]["torch"] and "cpu_count" in info["devices"]
    rows = {r["name"]: r for r in info["ops"]["attention backends"]}
    assert {"triton", "flex", "sdpa", "dense", "tuning cache"} <= set(rows)
    assert rows["dense"]["available"] is True
    assert rows["tuning cache"]["reason"] == f"{cache} (empty: a GPU's first calls tune)"

    cache.write_text(json.dumps({"version": 1, "entries": {"gpu A|triton 3.6|kernels x": {"fwd:a": {}, "dq:b": {}},
                                                           "gpu B|triton 3.6|kernels x": {"fwd:a": {}}}}))
    # the same report in this process (each `python -m dalle_ds.info` imports every package: 6 s on 2 cores)
    from dalle_ds.info import ops

    monkeypatch.setenv("DALLE_DS_ATTN_CACHE", str(cache))
    rows = {r["name"]: r for r in ops()["attention backends"]}
    assert rows["tuning cache"]["reason"].endswith(": 3 choices for 2 (GPU, triton, kernel source) combinations")

    monkeypatch.setenv("DALLE_DS_ATTN_CACHE", "off")
    rows = {r["name"]: r for r in ops()["attention backends"]}
    assert rows["tuning cache"]["available"] is False
