"""Shared pytest set-up: offline Hugging Face libraries, CPU DeepSpeed where there is no GPU, small thread counts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


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
