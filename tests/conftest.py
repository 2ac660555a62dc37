"""Shared pytest set-up: offline Hugging Face libraries, CPU DeepSpeed where there is no GPU, small thread counts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


#: what a launcher sets in each rank; init_distributed fills them in for a plain process (a world of one)
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")


@pytest.fixture(autouse=True)
def launcher_variables_stay_in_their_test():
    """A test that runs an entry point in this process (sample.main, init_distributed) leaves RANK, WORLD_SIZE,
    MASTER_PORT... in os.environ: init_distributed writes them there for DeepSpeed and nothing takes them out. Every
    later test of the same xdist worker then saw them, and its subprocesses inherited them: a MASTER_PORT the kernel
    had found free minutes earlier, which any socket may hold by then (a rendezvous there fails with EADDRINUSE).
    Each test gets them back as it found them."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def hf_tmp_home(tmp_path_factory, monkeypatch):
    """Hugging Face caches in the session's tmp dir and offline, for tests that build ``datasets`` loaders (they also
    pass cache_dir explicitly where they can)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` or ``distributed`` (20-90 s each: several processes under the deepspeed launcher) run
    first, the rest keep their order behind them. Under ``make test``'s 2 xdist workers (--dist worksteal) the long
    tests then start early and the short ones fill the end, instead of one worker finishing a long test alone."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") or item.get_closest_marker("distributed") else 1)
