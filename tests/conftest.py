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
