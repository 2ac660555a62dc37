"""The trainers refuse inputs that only show as wrong once the run starts (a file of the wrong kind where a dVAE is
wanted, a folder without a tokenizer, damaged token shards) with one ``config error:`` line and exit code 2, before
anything is written to the run folder. Each case is one plain process (no launcher), as a user would see it."""
import subprocess
import sys

import pytest

from launch_utils import ROOT, single_process_env
from trainer_configs import token_shards


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"launch/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=single_process_env())


@pytest.mark.slow
def test_prior_trainer_refuses_a_wrong_dvae_and_a_folder_without_a_tokenizer(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    proc = _run("train_dalle.py", ["--deepspeed_config", "ds_configs/cpu_dalle.json", "--out", str(tmp_path / "r1"),
                                   "--set", f"data.dvae={notes}", "--set", "data.images.name=shapes"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: data.dvae:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]

    token_shards(tmp_path / "tokens")
    (tmp_path / "not_a_tokenizer").mkdir()
    (tmp_path / "not_a_tokenizer" / "dvae.pt").write_text("x")
    proc = _run("train_dalle.py", ["--deepspeed_config", "ds_configs/cpu_dalle.json", "--out", str(tmp_path / "r2"),
                                   "--set", f"data.train_tokens={tmp_path / 'tokens'}",
                                   "--set", f"data.tokenizer={tmp_path / 'not_a_tokenizer'}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"config error: tokenizer {tmp_path / 'not_a_tokenizer'}: no tokenizer.json there" in proc.stderr
    assert not (tmp_path / "r2" / "tokenizer").exists()  # nothing copied

    # token shards record the dVAE that encoded them; data.dvae naming another would be exported with the prior
    from dalle_ds.data.token_shards import read_meta, write_meta
    meta = read_meta(tmp_path / "tokens")
    write_meta(tmp_path / "tokens", meta["shards"], 32, 8192, {"dvae": str(tmp_path / "encoder.pt")})
    proc = _run("train_dalle.py", ["--deepspeed_config", "ds_configs/cpu_dalle.json", "--out", str(tmp_path / "r3"),
                                   "--set", f"data.train_tokens={tmp_path / 'tokens'}", "--set", f"data.dvae={notes}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"config error: data.dvae: {notes} is not the dVAE that encoded data.train_tokens" in proc.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("args, said", [
    (["--set", "stpes=5", "--out", "RUN"], "config error:"),  # found by the config code
    (["--set", "steps=5"], "error: the following arguments are required: --out"),  # by argparse
])
def test_a_command_line_error_is_said_once_under_the_launcher(tmp_path, args, said):
    """Every rank parses the command line and fails alike; rank 0 alone prints the error (it came once per rank)."""
    from launch_utils import _launch_command, _launcher_env, free_port

    args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    cmd = _launch_command("launch/train_dvae.py", ["--deepspeed_config", "ds_configs/cpu_dvae.json", "--preset",
                                                   "test", *args], 2, free_port())
    proc = subprocess.run(cmd, cwd=ROOT, env=_launcher_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and said in out, out[-3000:]
    assert out.count(said) == 1, out[-3000:]


@pytest.mark.parametrize("rank, waits", [("0", False), ("1", True)])
def test_a_quiet_rank_waits_for_rank_0_to_say_a_command_line_error(monkeypatch, capsys, rank, waits):
    """The launcher kills every rank once one exits non-zero: a quiet rank that left at once took rank 0 down before
    it printed (CI once saw exit 2 with no message). The quiet rank waits; rank 0 speaks and leaves at once."""
    import time

    from dalle_ds.train.cli import LaunchedArgumentParser

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setenv("RANK", rank)
    p = LaunchedArgumentParser(prog="x")
    p.add_argument("--out", required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args([])
    assert e.value.code == 2
    assert bool(slept) == waits and all(s >= 10 for s in slept)
    assert ("required: --out" in capsys.readouterr().err) == (not waits)
