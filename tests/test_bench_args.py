"""The benchmark scripts refuse bad command-line values with a usage error naming the flag (exit 2), before any work;
valid command lines still parse to the values the benchmarks used before. Parser level only: nothing is run."""
import importlib
import sys

import pytest
import torch

from launch_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """The same answers on a GPU machine: every parse sees a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


BAD = [
    ("bench_sample", ["--batch-sizes", "abc"], "--batch-sizes"),
    ("bench_sample", ["--batch-sizes", "4,0"], "--batch-sizes"),
    ("bench_sample", ["--device", "cuda"], "--device"),
    ("bench_sample", ["--device", "gpu"], "--device"),
    ("bench_sample", ["--reps", "0"], "--reps"),
    ("bench_sample", ["--preset", "nope"], "--preset"),
    ("bench_sample", ["--batch-sizes", "auto"], "--batch-sizes"),  # CPU: no OutOfMemoryError to stop the doubling
    ("bench_fp169", ["--device", "cuda"], "--device"),
    ("bench_fp169", ["--n", "0"], "--n"),
    ("bench_fp169", ["--repeats", "-1"], "--repeats"),
    ("bench_underflow", ["--batch", "0"], "--batch"),
    ("bench_underflow", ["--layers", "0"], "--layers"),
    ("bench_underflow", ["--measure-batches", "0"], "--measure-batches"),
    ("bench_powersgd", ["--preset", "nope"], "--preset"),
    ("bench_powersgd", ["--parts", "foo"], "--parts"),
    ("bench_powersgd", ["--parts", "reduce,foo"], "--parts"),
    ("bench_powersgd", ["--rank", "0"], "--rank"),
    ("bench_powersgd", ["--rank", "3"], "--rank"),
    ("bench_powersgd", ["--steps", "2"], "--steps"),
    ("bench_attention", ["--providers", "foo"], "--providers"),
    ("bench_attention", ["--cases", "nope"], "--cases"),
    ("bench_attention", ["--quick", "--cases", "paper"], "--cases"),
    ("bench_attention", ["--plot", "missing.json"], "--plot"),
    ("bench_attention", ["--batch", "0"], "--batch"),
    ("bench_attention", ["--heads", "x"], "--heads"),
    ("bench_train", ["--micro-batch", "0"], "--micro-batch"),
    ("bench_train", ["--steps", "0"], "--steps"),
    ("bench_train", ["--steps", "-2"], "--steps"),
    ("bench_train", ["--warmup", "-1"], "--warmup"),
    ("bench_train", ["--zero", "abc"], "--zero"),
    ("bench_train", ["--zero", "0,4"], "--zero"),
    ("bench_train", ["--presets", "125M,nope"], "--presets"),
    ("bench_train", ["--precision", "fp16"], "--precision"),
    ("bench_train", ["--checkpointing", "on,yes"], "--checkpointing"),
    ("bench_attention", ["--extra-masks", "row"], "--extra-masks"),
    ("bench_attention", ["--providers", ","], "--providers"),
    ("attn_sass", ["--kernels", "fwd,bogus"], "--kernels"),
    ("attn_sass", ["--masks", ""], "--masks"),
    ("attn_sass", ["--tiles", "64x64x4"], "--tiles"),
    ("attn_sass", ["--tiles", "64x0x4x3"], "--tiles"),
]


OUT_SCRIPTS = ["attn_sass", "bench_attention", "bench_data", "bench_dvae_step", "bench_fp169", "bench_powersgd",
               "bench_sample", "bench_train", "bench_underflow", "prompt_edit"]
BAD += [(m, ["--out", "/proc/no_such_dir/report"], "--out") for m in OUT_SCRIPTS]  # a folder that cannot be made
BAD += [(m, ["--out", "runs/"], "--out") for m in ("bench_train", "bench_fp169")]  # a folder, not a prefix


@pytest.mark.parametrize("module,argv,flag", BAD, ids=[f"{m}:{' '.join(a)}" for m, a, _ in BAD])
def test_bad_value_is_a_usage_error(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and flag in err, err


def test_bad_values_have_the_allowed_ones_in_the_message(capsys):
    import bench_attention

    for argv, allowed in ((["--providers", "foo"], bench_attention.ALL_PROVIDERS), (["--cases", "nope"],
                                                                                   ("paper", "large_w64"))):
        with pytest.raises(SystemExit):
            bench_attention.parse_args(argv)
        err = capsys.readouterr().err
        assert all(a in err for a in allowed), err


def test_comma_list_type():
    """The one parser of the benchmarks' comma-list flags: blanks dropped, entries converted, then checked."""
    import argparse

    from timing import comma_list, positive_int

    assert comma_list()(" a, b,,c ") == ["a", "b", "c"]
    assert comma_list((0, 1, 2, 3), int)("3,0") == [3, 0]
    assert comma_list(item=positive_int)("8,1") == [8, 1]
    for parse, text in ((comma_list(), " , "), (comma_list(("x",)), "x,y"), (comma_list(item=positive_int), "2,0"),
                        (comma_list((0, 1), int), "1,b")):
        with pytest.raises(argparse.ArgumentTypeError, match="comma list"):
            parse(text)


def test_plot_of_a_json_that_is_no_report(tmp_path, capsys):
    import bench_attention

    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(SystemExit) as e:
        bench_attention.parse_args(["--plot", str(path)])
    assert e.value.code == 2 and "--plot" in capsys.readouterr().err


def test_sample_valid():
    import bench_sample

    a = bench_sample.parse_args([])
    assert (a.preset, a.batch_sizes, a.device, a.reps) == ("tiny", [1, 8, 32], "cpu", 3)
    a = bench_sample.parse_args(["--quick", "--batch-sizes", "2,3", "--device", "cpu", "--reps", "1"])
    assert (a.preset, a.batch_sizes, a.reps) == ("test", [2, 3], 1)
    assert bench_sample.parse_args(["--quick", "--preset", "tiny"]).preset == "tiny"
    assert bench_sample.auto_batches(8) == [1, 2, 4, 8]  # --batch-sizes auto: CUDA only (refused above on a CPU)


def test_fp169_valid():
    import bench_fp169

    a = bench_fp169.parse_args(["--device", "cpu", "--quick", "--n", "1024"])
    assert (a.device, a.quick, a.n, a.repeats, a.underflow_n) == ("cpu", True, 1024, None, None)


def test_underflow_valid():
    import bench_underflow

    a = bench_underflow.parse_args([])
    assert (a.layers, a.d_model, a.batch, a.train_steps, a.measure_batches) == (16, 64, 8, 300, 2)
    a = bench_underflow.parse_args(["--quick"])
    assert (a.layers, a.d_model, a.batch, a.train_steps, a.measure_batches) == (3, 32, 4, 10, 1)
    a = bench_underflow.parse_args(["--quick", "--batch", "2", "--layers", "5"])  # explicit sizes win over --quick
    assert (a.layers, a.d_model, a.batch, a.train_steps, a.measure_batches) == (5, 32, 2, 10, 1)


def test_powersgd_valid():
    import bench_powersgd

    a = bench_powersgd.parse_args([])
    assert (a.parts, a.preset, a.rank, a.steps) == (["reduce", "orth", "ddp"], "tiny", 16, 60)
    a = bench_powersgd.parse_args(["--quick", "--parts", "reduce,orth"])
    assert (a.parts, a.preset, a.rank, a.steps) == (["reduce", "orth"], "test", 4, 4)
    a = bench_powersgd.parse_args(["--quick", "--preset", "tiny", "--rank", "8", "--steps", "3"])
    assert (a.preset, a.rank, a.steps) == ("tiny", 8, 3)


def test_attention_valid():
    import bench_attention

    a = bench_attention.parse_args([])
    assert (a.device, a.dtype, a.graphs, a.profile, a.extra_masks) == ("cpu", torch.bfloat16, False, False, [])
    assert a.cases == [("paper", 256, 32, 8, 16, 64), ("large_w64", 256, 64, 2, 16, 64)]
    assert a.providers == list(bench_attention.PROVIDERS)
    a = bench_attention.parse_args(["--batch", "4", "--heads", "8", "--no-large", "--providers", "triton,dense"])
    assert a.cases == [("paper", 256, 32, 4, 8, 64)] and a.providers == ["triton", "dense"]
    a = bench_attention.parse_args(["--quick", "--cases", "tiny", "--extra-masks", "causal"])
    assert (a.dtype, a.cases, a.extra_masks) == (torch.float32, [("tiny", 3, 4, 1, 2, 16)], ["causal"])
    assert bench_attention.parse_args(["--quick", "--heads", "4"]).cases == [("tiny", 3, 4, 1, 4, 16),
                                                                            ("tiny_w8", 5, 8, 1, 4, 16)]


def test_attention_plot_valid(tmp_path):
    import bench_attention

    path = tmp_path / "run.json"
    path.write_text('{"cases": []}')
    assert bench_attention.parse_args(["--plot", str(path)]).plot_report == {"cases": []}


def test_train_valid():
    import bench_train

    a = bench_train.parse_args(["--quick"])
    assert (a.presets, a.zero, a.micro_batch, a.warmup, a.steps, a.profile_steps) == (["test"], [2], 4, 2, 3, 2)
    a = bench_train.parse_args(["--quick", "--zero", "0,3", "--micro-batch", "2", "--steps", "5", "--warmup", "0"])
    assert (a.zero, a.micro_batch, a.steps, a.warmup) == ([0, 3], 2, 5, 0)


def test_device_tag_names_the_gpu_model():
    """Result files are named by the GPU model; the device session bundles them by that name."""
    from timing import device_tag

    assert [device_tag(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
                                    "NVIDIA H100 PCIe", "Tesla V100-SXM2-16GB")] == ["h100", "h200", "a100", "h100",
                                                                                    "v100"]
    assert device_tag("Some Accelerator") == "someaccelera"


@pytest.mark.parametrize("module", OUT_SCRIPTS)
def test_out_prefix_folder_is_made_before_any_work(module, tmp_path):
    """--out PREFIX: the folder is created (and written to) when the command line is read, so a report cannot fail
    to be written after the measuring; nothing but the folder is left behind."""
    prefix = tmp_path / "new" / "deeper" / "report"
    required = {"prompt_edit": ["--prior", "dalle.pt", "--clip", "clip"]}.get(module, [])
    args = importlib.import_module(module).parse_args([*required, "--out", str(prefix)])
    assert args.out == str(prefix)
    assert prefix.parent.is_dir() and not list(prefix.parent.iterdir())
