"""launch/sample.py and launch/tokenize_images.py refuse bad input with a one- or two-line error and exit code 2:
flag values in argument parsing, wrong / missing / unreadable / mismatched checkpoints before the process group
starts (no traceback), and a tokenization that would write 0 rows without leaving a meta.json behind."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dalle_ds.config import DalleConfig, DVAEConfig
from dalle_ds.data.tokenizer import train_caption_tokenizer
from dalle_ds.models.dalle import DALLE
from dalle_ds.models.dvae import DiscreteVAE
from dalle_ds.train.dalle_trainer import export_dalle
from dalle_ds.train.dvae_trainer import export_dvae
from launch_utils import ROOT, load_script


sample = load_script("launch/sample.py", "launch_sample")
tokenize = load_script("launch/tokenize_images.py", "launch_tokenize_images")


def _dvae(path, vocab):
    torch.manual_seed(0)
    cfg = DVAEConfig(image_size=16, vocab_size=vocab, hidden=4, blocks_per_group=1, groups=3, decoder_init=8)
    export_dvae(path, cfg, DiscreteVAE(cfg).state_dict(), step=0)
    return cfg


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny exported prior (with its tokenizer folder and recorded dVAE), its dVAE and a mismatched dVAE."""
    d = tmp_path_factory.mktemp("artifacts")
    dvae_cfg = _dvae(d / "dvae.pt", 16)
    _dvae(d / "dvae_k32.pt", 32)
    grid = DiscreteVAE(dvae_cfg).cfg.grid_size
    tok = train_caption_tokenizer(["a red circle", "a small blue square"] * 4, vocab_size=270, max_length=7)
    (d / "prior").mkdir()
    tok.save(d / "prior" / "tokenizer")
    cfg = DalleConfig(text_vocab_size=tok.vocab_size, text_len=8, image_vocab_size=16, image_grid=grid, d_model=16,
                      n_layers=1, n_heads=1)
    export_dalle(d / "prior" / "dalle.pt", cfg, DALLE(cfg).state_dict(), 0,
                 {"tokenizer": "tokenizer", "dvae": str(d / "dvae.pt")})
    (d / "lone").mkdir()  # a prior copied without its tokenizer folder
    (d / "lone" / "dalle.pt").write_bytes((d / "prior" / "dalle.pt").read_bytes())
    shutil.copytree(d / "prior", d / "damaged_tok")  # ... and with its tokenizer's metadata damaged (not JSON)
    next((d / "damaged_tok" / "tokenizer").glob("dalle_ds_*.json")).write_text("{ not json")
    blob = (d / "dvae.pt").read_bytes()
    (d / "truncated.pt").write_bytes(blob[:1000])  # no zip central directory
    (d / "clip_run" / "clip").mkdir(parents=True)
    (d / "clip_run" / "clip" / "config.json").write_text("{}")
    (d / "afile").write_text("not a folder")
    return d


def _sample_argv(art, tmp_path, *extra):
    return ["--prior", str(art / "prior" / "dalle.pt"), "--caption", "a red circle", "--num_candidates", "2",
            "--keep", "1", "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--batch_size", "0"], "--batch_size must be ≥ 1"),
    (["--batch_size", "-4"], "--batch_size must be ≥ 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "nan"], "--temperature must be > 0"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--top_k", "-1"], "--top_k must be ≥ 0"),
    (["--shapes_split", "test_id", "--num_captions", "-3"], "--num_captions must be ≥ 1"),
    (["--shapes_split", "test_id", "--num_captions", "0"], "--num_captions must be ≥ 1"),
    (["--shapes_split", "test_id"], "--shapes_split samples the split's own captions"),
    (["--captions_file", "{tmp}/none.txt"], "none.txt: file not found"),
    (["--captions_file", "{tmp}"], "is a folder, not a file"),
    (["--prior", "{art}/none.pt"], "--prior {art}/none.pt: file not found"),
    (["--prior", "{art}/prior"], "did you mean {art}/prior/dalle.pt?"),
    (["--dvae", "{art}"], "did you mean {art}/dvae.pt?"),
    (["--dvae", "{art}/none.pt"], "--dvae {art}/none.pt: file not found"),
    (["--clip", "{art}/clip_run"], "not a CLIP folder (no config.json); did you mean {art}/clip_run/clip?"),
    (["--clip", "{art}/none"], "--clip {art}/none: not a CLIP folder"),
    (["--out", "{art}/afile"], "exists and is not a folder"),
    (["--out", "{art}/afile/sub"], "{art}/afile is a file, not a folder"),
    (["--cuda_graph", "--no_cache"], "--cuda_graph replays the cached decode step"),
    (["--prompt_rows", "2"], "--prompt_rows says how much of --image_prompt is given"),
    (["--image_prompt", "scene"], "--image_prompt scene primes each caption with its own shapes scene"),
    (["--image_prompt", "{art}/none.png"], "--image_prompt {art}/none.png: file not found"),
    (["--image_prompt", "{art}/blank.txt", "--prompt_rows", "0"], "--prompt_rows must be ≥ 1"),
    *([] if torch.cuda.is_available() else [(["--cuda_graph"], "--cuda_graph needs a CUDA GPU")]),
])
def test_sample_parser_refuses(art, tmp_path, capsys, extra, message):
    extra = [a.format(art=art, tmp=tmp_path) for a in extra]
    with pytest.raises(SystemExit) as e:
        sample.parse_args(_sample_argv(art, tmp_path, *extra))
    assert e.value.code == 2
    assert message.format(art=art) in capsys.readouterr().err


def test_sample_parser_needs_captions_and_accepts_good_flags(art, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--prior", str(art / "prior" / "dalle.pt"), "--out", str(tmp_path)])
    assert e.value.code == 2 and "give --caption, --captions_file or --shapes_split" in capsys.readouterr().err
    args = sample.parse_args(_sample_argv(art, tmp_path, "--dvae", str(art / "dvae.pt"), "--top_p", "1",
                                          "--top_k", "0", "--batch_size", "1", "--clip", str(art / "clip_run/clip")))
    assert (args.batch_size, args.top_p, args.top_k) == (1, 1.0, 0) and args.cuda_graph is False


def test_sample_parser_takes_cuda_graph_where_there_is_a_gpu(art, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sample.parse_args(_sample_argv(art, tmp_path, "--cuda_graph")).cuda_graph is True


@pytest.mark.parametrize("extra, message", [
    (["--prior", "{art}/dvae.pt"], "{art}/dvae.pt is not a prior exported by dalle_ds"),
    (["--dvae", "{art}/prior/dalle.pt"], "{art}/prior/dalle.pt is not a dVAE exported by dalle_ds"),
    (["--dvae", "{art}/dvae_k32.pt"], "does not match the prior"),
    (["--prior", "{art}/lone/dalle.pt"], "no tokenizer.json in {art}/lone/tokenizer"),
    (["--prior", "{art}/damaged_tok/dalle.pt"], "the prior {art}/damaged_tok/dalle.pt's caption tokenizer"),
    (["--prior", "{art}/truncated.pt"], "{art}/truncated.pt"),  # the wording is checkpoint.py's
    (["--captions_file", "{art}/truncated.pt"], "truncated.pt: not UTF-8 text"),
    (["--captions_file", "{art}/blank.txt"], "blank.txt: no captions in it"),
    (["--image_prompt", "{art}/blank.txt"], "--image_prompt {art}/blank.txt: not a readable image"),
    (["--image_prompt", "{art}/red.png", "--prompt_rows", "4"], "--prompt_rows 4: the image grid has 4 rows"),
    # a CLIP folder transformers cannot load (here: a config.json and no weights)
    (["--clip", "{art}/clip_run/clip"], "CLIP folder {art}/clip_run/clip: transformers could not load it"),
])
def test_sample_main_refuses_wrong_inputs_before_any_work(art, tmp_path, capsys, extra, message):
    (art / "blank.txt").write_text("\n  \n")
    Image.new("RGB", (20, 12), (255, 0, 0)).save(art / "red.png")
    extra = [a.format(art=art) for a in extra]
    assert sample.main(_sample_argv(art, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(art=art) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--batch_size", "0"], "--batch_size must be ≥ 1"),
    (["--rows_per_shard", "0"], "--rows_per_shard must be ≥ 1"),
    (["--num_workers", "-1"], "--num_workers must be ≥ 0"),
    (["--num_samples", "0"], "--num_samples must be ≥ 1"),
    (["--dvae", "{art}/none.pt"], "--dvae {art}/none.pt: file not found"),
    (["--dvae", "{art}"], "is a folder, not a file; did you mean {art}/dvae.pt?"),
    (["--out", "{art}/afile"], "exists and is not a folder"),
])
def test_tokenize_parser_refuses(art, tmp_path, capsys, extra, message):
    argv = ["--dvae", str(art / "dvae.pt"), "--out", str(tmp_path / "tok")] + [a.format(art=art) for a in extra]
    with pytest.raises(SystemExit) as e:
        tokenize.parse_args(argv)
    assert e.value.code == 2 and message.format(art=art) in capsys.readouterr().err


@pytest.mark.parametrize("dvae, message", [("prior/dalle.pt", "is not a dVAE exported by dalle_ds"),
                                           ("truncated.pt", "truncated.pt")])
def test_tokenize_main_refuses_a_wrong_dvae(art, tmp_path, capsys, dvae, message):
    rc = tokenize.main(["--dvae", str(art / dvae), "--num_samples", "2", "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and not (tmp_path / "tok").exists()


@pytest.mark.parametrize("extra, message", [
    (["--data", "fashion_mnist", "--split", "nope"], "--split: 'nope' is not a split of fashion_mnist"),
    (["--data", "imagefolder", "--path", "{art}/no_such_folder"], "--path: no such directory: {art}/no_such_folder"),
    (["--data", "fashion_mnist", "--image_key", "webp"], "--image_key: names a WebDataset member; fashion_mnist"),
    (["--data", "shapes"], "arguments: the shapes dataset renders 64 or 128 px images, but the model expects 16"),
])
def test_tokenize_data_errors_name_the_flags(art, tmp_path, capsys, extra, message):
    rc = tokenize.main(["--dvae", str(art / "dvae.pt"), "--out", str(tmp_path / "tok")] + [a.format(art=art) for a in
                                                                                           extra])
    err = capsys.readouterr().err
    assert rc == 2 and message.format(art=art) in err and "data." not in err, err


def test_tokenize_refuses_a_folder_of_unreadable_images(art, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "allbad"
    folder.mkdir()
    rows = []
    for i in range(3):
        (folder / f"{i}.png").write_text("not a png at all")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "tok"
    rc = tokenize.main(["--dvae", str(art / "dvae.pt"), "--data", "imagefolder", "--path", str(folder),
                        "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "has no readable samples" in err and str(folder) in err
    assert not (out / "meta.json").exists()


def test_sample_cli_prints_no_traceback(art, tmp_path):
    """The whole script, as a user runs it: a dVAE given as the prior is one line on stderr and exit code 2."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"),
                           *_sample_argv(art, tmp_path, "--prior", str(art / "dvae.pt"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "is not a prior exported by dalle_ds" in proc.stderr


def test_sample_notes_empty_captions(tmp_path, capsys):
    args = sample.parse_args(["--prior", __file__, "--caption", "", "--caption", "a red circle", "--out",
                              str(tmp_path / "out")])
    captions, scenes = sample.gather_captions(args)
    assert captions == ["", "a red circle"] and scenes is None
    assert "note: 1 empty caption(s)" in capsys.readouterr().err


def test_checkpoints_given_the_checkpoints_folder_names_the_run_folder(tmp_path, capsys):
    """launch/checkpoints.py --run <run>/checkpoints (or a folder holding `latest` / step folders) hints at the run
    folder above it; a folder that looks like neither gets no hint."""
    tool = load_script("launch/checkpoints.py", "launch_checkpoints")
    (tmp_path / "dvae" / "checkpoints").mkdir(parents=True)
    (tmp_path / "renamed" / "step00000010").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    for run, hint in ((tmp_path / "dvae" / "checkpoints", tmp_path / "dvae"), (tmp_path / "renamed", tmp_path),
                      (tmp_path / "plain", None)):
        assert tool.main(["--run", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run} holds no checkpoints folder" in err
        assert (f"did you mean --run {hint}?" in err) if hint else "did you mean" not in err


evaluate = load_script("launch/evaluate.py", "launch_evaluate")


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize("tool", ["sample", "evaluate", "tokenize"])
def test_an_input_error_is_said_by_rank_0_while_the_others_wait(art, tmp_path, monkeypatch, capsys, rank, tool):
    """Under the launcher every rank loads the same inputs and fails alike: it was said once per rank. Rank 0 says
    it at once; another rank waits for the launcher to stop it once rank 0 has exited, and only if it is still
    running then (its own finding: a file this node alone cannot read) says it, with its rank."""
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setenv("RANK", rank)
    # before any process group, whatever an earlier test in this worker left
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    wrong, right = str(art / "dvae.pt"), str(art / "prior" / "dalle.pt")  # each the other's kind
    argv = {"sample": _sample_argv(art, tmp_path, "--prior", wrong),
            "evaluate": ["--prior", wrong, "--features", "clip", "--clip", str(art / "clip_run" / "clip"),
                         "--out", str(tmp_path / "out")],
            "tokenize": ["--dvae", right, "--out", str(tmp_path / "out")]}[tool]
    assert {"sample": sample, "evaluate": evaluate, "tokenize": tokenize}[tool].main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a" in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: " if rank == "0" else "error on rank 1: ")
    assert bool(slept) == (rank != "0") and all(s >= 10 for s in slept)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_sample_command_line_error_is_said_by_rank_0_alone(art, tmp_path, monkeypatch, capsys, rank):
    """sample.py parsed with plain argparse: every rank printed the usage and the error."""
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # before any process group
    with pytest.raises(SystemExit) as e:
        sample.parse_args(_sample_argv(art, tmp_path, "--keep", "0"))
    assert e.value.code == 2 and bool(slept) == (rank != "0")
    assert ("need 1 ≤ --keep ≤ --num_candidates" in capsys.readouterr().err) == (rank == "0")


@pytest.mark.distributed
def test_a_sample_input_error_is_said_once_under_the_launcher(art, tmp_path):
    """Two ranks of launch/sample.py given a dVAE as the prior: one message (it came once per rank)."""
    from launch_utils import _launch_command, _launcher_env, free_port

    argv = _sample_argv(art, tmp_path, "--prior", str(art / "dvae.pt"))
    proc = subprocess.run(_launch_command("launch/sample.py", argv, 2, free_port()), cwd=ROOT, env=_launcher_env(),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    said = f"error: {art / 'dvae.pt'} is not a prior exported by dalle_ds"
    assert proc.returncode == 2 and out.count(said) == 1 and "error on rank" not in out, out[-3000:]


def test_checkpoints_says_why_a_universal_copy_failed_without_a_traceback(tmp_path, capsys, monkeypatch):
    """A checkpoint DeepSpeed's ds_to_universal cannot convert (a damaged shard) ended launch/checkpoints.py
    --universal in a traceback; it is an error line with the converter's reason, exit code 2."""
    from dalle_ds.train import checkpoint as ckpt

    tool = load_script("launch/checkpoints.py", "launch_checkpoints_universal")
    tag = tmp_path / "run" / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("step00000002")

    def fails(src, dst):
        raise RuntimeError(f"converting {src} to a universal checkpoint failed:\nRuntimeError: PytorchStreamReader "
                           "failed reading zip archive")

    monkeypatch.setattr(ckpt, "_convert_to_universal", fails)
    assert tool.main(["--run", str(tmp_path / "run"), "--universal"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: converting {tag} to a universal checkpoint failed") and "zip archive" in err
    assert "cannot be converted" in err
