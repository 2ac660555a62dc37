# The README's two commands: `make demo` and `make test`. Both create the virtualenv and install on first use.
VENV        ?= .venv
PYTHON      ?= python3
# torch to install; override e.g. TORCH_SPEC="torch==2.12.*" (plain PyPI serves the CUDA build on Linux).
TORCH_SPEC  ?= torch==2.13.0
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU-only build from plain PyPI
TORCH_PIP_ARGS ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.dalle_ds-installed
RUN_DIR     ?= runs/demo
# pytest workers (pytest-xdist). Most of the suite's time is process start-up (torch and DeepSpeed imports, one
# thread each), the launcher's once-a-second polls and exits, not arithmetic. On the 2-core CPU machine (2026-12-07):
# one process 954 s; 2 workers 675-808 s over five runs (worksteal 703-770 s, load 675 and 808 s). 0 runs it in one
# process (what --pdb and -x want).
TEST_WORKERS ?= 2
# the 15 slowest tests are listed at the end: the suite must stay within CI's 20 minutes on 2 cores
PYTEST_ARGS ?= $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal) --durations=15
# DeepSpeed would fall back to CPU with a warning; say it explicitly where there is no NVIDIA driver.
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test setup bench info clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
# openai/DALL-E's own dVAE classes: the reference for importing its released weights (tests/test_openai_dvae.py);
# --no-deps: it declares torchvision, which would pull another torch (its imports come with the [test] extra)
	$(PY) -m pip install -q --no-deps "DALL-E==0.1"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	DS_ACCELERATOR=cpu PATH="$(abspath $(VENV))/bin:$$PATH" bash launch/demo.sh "$(RUN_DIR)"

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)

info: $(STAMP)
	$(PY) -m dalle_ds.info

bench: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
