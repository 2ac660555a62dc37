"""What an installed (non-editable) package holds: ``pip install .`` and wheels get the C++/CUDA sources as
``dalle_ds/csrc`` (setup.py's build_py), where the op builder looks for them when there is no checkout around."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_built_package_carries_the_csrc_tree_where_the_builder_looks(tmp_path):
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    shipped = tmp_path / "dalle_ds" / "csrc"
    assert _files(shipped) == _files(ROOT / "csrc")
    probe = ("import os; os.environ.pop('DALLE_DS_CSRC', None)\n"
             "from dalle_ds.ops.builder import csrc_root\nfrom dalle_ds.ops.fp169._ext import CPU_BUILDER\n"
             "print(csrc_root())\n"
             "missing = [s for s in CPU_BUILDER.sources if not (csrc_root() / s).is_file()]\nprint(missing)\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == [str(shipped), "[]"]


def test_manifest_grafts_csrc_into_an_sdist():
    lines = (ROOT / "MANIFEST.in").read_text().splitlines()
    assert "graft csrc" in lines
