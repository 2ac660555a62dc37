"""benchmarks/device_session.sh, the one script a lent GPU runs, checked on the CPU before the GPU is there.

A GPU session has minutes of device time and one call; a stage whose command line no longer parses (a renamed flag,
a removed test file) costs a stage of that call. These tests read the script as text and check, without running
anything: every default stage has a branch; every benchmark command line parses with that benchmark's own parser
(shell variables replaced by their defaults); every test file a pytest stage names exists and its markers are
registered. Parser level only, as in test_bench_args.py.
"""
import importlib
import re
import shlex
import sys

import pytest
import torch

from launch_utils import ROOT
from trainer_configs import check_trainer, token_shards

sys.path.insert(0, str(ROOT / "benchmarks"))
SCRIPT = ROOT / "benchmarks" / "device_session.sh"


def _text() -> str:
    return SCRIPT.read_text().replace("\\\n", " ")  # shell line continuations joined


def _branches() -> dict[str, str]:
    """stage name -> the body of its `case` branch (up to its `;;`)."""
    body = _text().split("case $stage in", 1)[1].split("esac", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*([a-z0-9_]+)\)(.*?);;", body, re.M | re.S)}


def _default_stages() -> list[str]:
    return re.search(r'^STAGES=\$\{STAGES:-"([^"]*)"\}', _text(), re.M).group(1).split()


def _expand(words: str, tokens_dir) -> str:
    """Shell parameters as the script's defaults and the run would set them (device tag, date, token folder)."""
    words = words.replace("${PRECISION_TOKENS:-runs/demo15/tokens}", str(tokens_dir))
    words = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", words)
    return words.replace("${DEV}", "h100").replace("$DEV", "h100").replace("${DATE}", "20261206")


def _benchmark_commands(tokens_dir) -> list[tuple[str, str, list[str]]]:
    """(stage, benchmark module, argv) for every `python3 benchmarks/X.py ...` or `deepspeed ... benchmarks/X.py ...`
    in a stage branch."""
    found = []
    for stage, body in _branches().items():
        for m in re.finditer(r"benchmarks/(\w+)\.py([^;\n]*)", body):
            found.append((stage, m.group(1), shlex.split(_expand(m.group(2), tokens_dir))))
    return found


def test_every_default_stage_has_a_branch():
    branches = _branches()
    stages = _default_stages()
    assert stages and len(set(stages)) == len(stages), stages
    assert [s for s in stages if s not in branches] == []
    # a branch that no default run reaches is allowed (bench_attn_large) but must be named in the header comment
    header = _text().split("set -u", 1)[0]
    assert [s for s in branches if s not in stages and f"#   {s} " not in header] == []


@pytest.fixture
def tokens_dir(tmp_path):
    for split in ("train", "test_id"):
        token_shards(tmp_path / "tokens" / split)
    return tmp_path / "tokens"


def test_every_benchmark_command_parses(tokens_dir, monkeypatch):
    # parse as the GPU machine would: choices that depend on CUDA (devices, dtypes) see one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    commands = _benchmark_commands(tokens_dir)
    modules = {m for _, m, _ in commands}
    # the stages that time or profile something all go through a parser checked here
    assert {"bench_attention", "bench_fp169", "bench_train", "bench_sample", "precision_compare", "memory_check",
            "attn_ncu_probe"} <= modules, modules
    for stage, module, argv in commands:
        try:
            importlib.import_module(module).parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"stage {stage}: benchmarks/{module}.py {shlex.join(argv)} does not parse (exit {exc.code})")


def test_parse_check_can_fail(tokens_dir, monkeypatch, capsys):
    """The check above is not vacuous: a renamed flag in a stage's command line is a usage error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    stage, module, argv = next(c for c in _benchmark_commands(tokens_dir) if c[1] == "bench_attention")
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).parse_args([*argv, "--no-such-flag"])
    assert e.value.code == 2 and "--no-such-flag" in capsys.readouterr().err


def test_pytest_stages_name_existing_files_and_registered_markers():
    registered = set(re.findall(r"^\s+(\w+):", (ROOT / "pytest.ini").read_text(), re.M))
    seen = 0
    for stage, body in _branches().items():
        m = re.search(r"python3 -m pytest (.*)", body)
        if not m:
            continue
        seen += 1
        words = shlex.split(m.group(1))
        files = [w for w in words if w.startswith("tests/")]
        assert files, stage
        assert [f for f in files if not (ROOT / f).is_file()] == [], stage
        if "-m" in words:
            marker = words[words.index("-m") + 1]
            assert marker in registered, (stage, marker)
    assert seen >= 2


def test_precision_stage_trainer_configs_are_valid(tokens_dir, tmp_path):
    """The precision stage's own trainer runs (one per precision) start: their run and DeepSpeed configs build. A
    --ds_set the DeepSpeed config refuses would fail that stage on the GPU (it did: tensorboard.enabled=false)."""
    import precision_compare

    (stage, _, argv), = [c for c in _benchmark_commands(tokens_dir) if c[1] == "precision_compare"]
    args = precision_compare.parse_args(argv)
    for precision in args.precisions:
        cmd = precision_compare.run_command(precision, args, tmp_path / "runs")
        at = cmd.index("launch/train_dalle.py")
        check_trainer("train_dalle", cmd[at + 1:], False, args.gpus, tmp_path)
