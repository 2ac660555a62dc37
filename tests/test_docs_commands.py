"""The command lines in README.md, docs/*.md and the scripts' docstrings still parse, and the trainers' ones still
make valid configs.

Every indented command line (continuations joined) that runs a script of launch/ or benchmarks/ is read as text and
handed to that script's own parser; for the trainers (launch/train_*.py) the run config is built from its preset and
``--set`` values, the DeepSpeed JSON is loaded with its ``--ds_set`` values, and the batch sizes are checked for the
world size the launcher line gives (``--num_nodes`` x ``--num_gpus``). Nothing is run. A doc line with ``...`` stands
for omitted arguments: the ``...`` is dropped, and a required ``--out`` (or data) it hides is supplied. The inputs a
parser or a config checks for are made in a scratch folder the commands run from: placeholder files, one-row token
shards, a one-image folder.
"""
import ast
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from launch_utils import ROOT
from trainer_configs import TRAINERS, check_trainer, token_shards

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "launch"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# what the docs leave to the reader, as a reader on a GPU machine might fill it in
PLACEHOLDERS = {"<device>": "h100", "<date>": "20261206", "$(date +%Y%m%d)": "20261206", "TOKENS_DIR": "runs/tokens",
                "OUT_DIR": "runs/doc_out", "RUNS_DIR": "runs/doc_runs", "--path DIR": "--path runs/images"}


def doc_texts() -> list[tuple[str, str]]:
    """(name, text): the markdown files, and the module docstrings of the scripts in launch/ and benchmarks/ (their
    usage lines)."""
    texts = [(doc.name, doc.read_text()) for doc in DOCS]
    for script in sorted([*(ROOT / "launch").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        doc = ast.get_docstring(ast.parse(script.read_text()))
        if doc:
            texts.append((f"{script.parent.name}/{script.name} docstring", doc))
    return texts


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every indented line of a doc text that runs launch/*.py or benchmarks/*.py."""
    found = []
    for name, text in doc_texts():
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("    ") or lines[i].strip().startswith("#"):
                i += 1
                continue
            cmd, j = lines[i].strip(), i
            while cmd.endswith("\\") and j + 1 < len(lines):
                j += 1
                cmd = cmd[:-1] + " " + lines[j].strip()
            if re.search(r"(launch|benchmarks)/\w+\.py", cmd):
                found.append((f"{name}:{i + 1}", cmd))
            i = j + 1
    return found


COMMANDS = doc_commands()


def split(cmd: str) -> tuple[list[str], str, list[str], bool]:
    """(launcher words, script path, script arguments, elided) of one command line."""
    for k, v in PLACEHOLDERS.items():
        cmd = cmd.replace(k, v)
    cmd = re.sub(r"\[(-[^\]]*)\]", r"\1", cmd)  # usage notation: optional arguments [--flag value] are checked too
    words = shlex.split(cmd, comments=True)
    at = next(i for i, w in enumerate(words) if re.fullmatch(r"(launch|benchmarks)/\w+\.py", w))
    launcher = [w for w in words[:at] if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # env assignments dropped
    rest = words[at + 1:]
    # "--flag ..." is a value left to the reader: a folder runs/doc_out for --out, else an input file
    # runs/doc_<flag>.pt (made by make_inputs); any other "..." stands for omitted arguments and is dropped
    args = [w if w != "..." or not k or not rest[k - 1].startswith("--") else
            "runs/doc_out" if rest[k - 1] == "--out" else f"runs/doc_{rest[k - 1].lstrip('-')}.pt"
            for k, w in enumerate(rest)]
    return launcher, words[at], [w for w in args if w != "..."], "..." in args


def world_size(launcher: list[str]) -> int | None:
    def value(flag):
        return int(launcher[launcher.index(flag) + 1]) if flag in launcher else None

    gpus, nodes = value("--num_gpus"), value("--num_nodes")
    if gpus is None or ("--hostfile" in launcher and nodes is None):
        return None  # the hostfile decides
    return gpus * (nodes or 1)


def expand_globs(args: list[str]) -> list[str]:
    """Shell globs, as the shell would expand them from the repository root."""
    out = []
    for a in args:
        if any(c in a for c in "*?[") and "/" in a:
            out.extend(sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(a)) or [a])
        else:
            out.append(a)
    return out


def make_inputs(args: list[str], scratch: Path) -> list[str]:
    """The arguments with absolute data paths (/data/..., /shared/...) moved into ``scratch``, and empty placeholders
    there for the inputs a command names: files (.pt, .json), token folders (with a meta.json), other folders."""
    out = []
    for a in args:
        key, eq, value = a.partition("=") if re.fullmatch(r"[\w.]+=.*", a) else ("", "", a)  # --set KEY=VALUE
        if not eq:
            key, value = "", a
        if value.startswith(("/data/", "/shared/")):
            value = str(scratch / value.lstrip("/"))
        elif not (value.startswith("runs/") or (value.endswith((".pt", ".json", ".pkl")) and not value.startswith("/"))):
            out.append(a)
            continue
        path = scratch / value
        if path.suffix in (".pt", ".pth", ".json", ".pkl"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")  # an empty JSON object (a config file overriding nothing); any bytes for a .pt(h) or .pkl
        elif path.suffix in (".png", ".jpg"):  # an image (a prompt)
            path.parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image
            Image.new("RGB", (8, 8)).save(path)
        elif "tokens" in path.parts:  # a token-shard folder, or the folder holding train/ and test_id/
            token_shards(path)
            token_shards(path / "train")
        elif "images" in path.name:  # an image folder
            path.mkdir(parents=True, exist_ok=True)
            from PIL import Image
            Image.new("RGB", (8, 8)).save(path / "a.png")
        elif path.name == "tokenizer":  # a caption tokenizer folder (the prior's run folder holds one)
            path.mkdir(parents=True, exist_ok=True)
        elif "clip" in path.parts:  # a CLIP folder (transformers' save_pretrained)
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")
        else:  # a run folder (one a script reads, or an output folder: created either way)
            path.mkdir(parents=True, exist_ok=True)
        out.append(key + eq + value)
    return out


def parse_script(script: str, args: list[str]) -> None:
    module = importlib.import_module(Path(script).stem)
    if not hasattr(module, "parse_args"):
        pytest.fail(f"{script} has no parse_args(argv) to check its documented command line with")
    module.parse_args(args)


def test_commands_found():
    scripts = {split(c)[1] for _, c in COMMANDS}
    assert {"launch/train_dalle.py", "launch/train_dvae.py", "launch/train_clip.py", "launch/sample.py",
            "benchmarks/bench_attention.py", "benchmarks/bench_train.py"} <= scripts, scripts


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_parses(where, cmd, tmp_path, monkeypatch, capsys):
    launcher, script, args, elided = split(cmd)
    args = make_inputs(expand_globs(args), tmp_path)
    monkeypatch.chdir(tmp_path)
    name = Path(script).stem
    try:
        if name in TRAINERS:
            check_trainer(name, args, elided, world_size(launcher), tmp_path)
            return
        try:  # a command for a CPU machine parses as it is here; one for a GPU machine sees CUDA
            parse_script(script, args)
        except SystemExit:
            capsys.readouterr()
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            parse_script(script, args)
    except SystemExit as exc:
        err = capsys.readouterr().err.strip()
        if elided and "the following arguments are required" in err:
            return  # what "..." leaves out
        pytest.fail(f"{where}: {cmd}\n  does not parse (exit {exc.code}): {err}")


def test_a_stale_flag_fails(tmp_path, monkeypatch):
    """The check can fail: a renamed --set key, a DeepSpeed key the file lacks, a batch that does not divide."""
    monkeypatch.chdir(tmp_path)
    from dalle_ds.config import ConfigError

    token_shards(tmp_path / "tok")
    base = ["--deepspeed_config", "ds_configs/zero2_bf16.json", "--preset", "paper", "--out", "o",
            "--set", f"data.train_tokens={tmp_path / 'tok'}"]
    check_trainer("train_dalle", base, False, 8, tmp_path)
    with pytest.raises(ConfigError):
        check_trainer("train_dalle", [*base, "--set", "model.no_such_field=1"], False, 8, tmp_path)
    with pytest.raises(ConfigError):
        check_trainer("train_dalle", [*base, "--ds_set", "no_such_key=1"], False, 8, tmp_path)
    with pytest.raises(ConfigError):
        check_trainer("train_dalle", [*base, "--ds_set", "train_micro_batch_size_per_gpu=3"], False, 1000, tmp_path)
    with pytest.raises(SystemExit):
        parse_script("launch/sample.py", ["--prior", "p.pt", "--no-such-flag"])
