"""The optional ahead-of-time build of the C++ ops (setup.py with DALLE_DS_BUILD_OPS=1): it builds the CPU library
from the JIT builder's own sources and flags, and the loader then uses it without any JIT build."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_setup_builds_the_cpu_op_ahead_of_time_and_the_loader_uses_it(tmp_path):
    tree = tmp_path / "src"
    tree.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("dalle_ds", "csrc"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    env = dict(os.environ, DALLE_DS_BUILD_OPS="1")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    assert list((tree / "dalle_ds" / "ops" / "fp169").glob("_C_cpu*.so"))
    # No JIT build allowed and an empty op cache: only the prebuilt library can serve the ops.
    env = dict(os.environ, PYTHONPATH=str(tree), DALLE_DS_OPS_JIT="0", DALLE_DS_OPS_CACHE=str(tmp_path / "cache"),
               CUDA_VISIBLE_DEVICES="")
    probe = ("import torch\nfrom dalle_ds.ops import fp169\nfrom dalle_ds.ops.fp169 import _ext\n"
             "assert fp169.__file__.startswith(%r), fp169.__file__\n"
             "assert _ext.load()['cpu'] and _ext.CPU_BUILDER._origin == 'prebuilt', _ext.load()\n"
             "x = torch.randn(4096) * torch.exp(torch.randn(4096) * 8)\n"
             "assert torch.equal(fp169.encode(x, backend='cpp'), fp169.encode(x, backend='reference'))\n"
             "print('prebuilt ok')\n") % str(tree)
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "prebuilt ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
