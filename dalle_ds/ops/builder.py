"""JIT builder for dalle_ds's C++/CUDA ops (the sources live in ``csrc/`` at the repository root).

One small :class:`OpBuilder` per extension names its sources and flags (DeepSpeed's ``op_builder`` pattern);
:meth:`OpBuilder.load` then

1. loads an ahead-of-time build if one was installed (``prebuilt_module``, built by setup.py), else
2. loads the cached JIT build for this machine, else
3. builds it with ``torch.utils.cpp_extension.load`` and ninja, once per machine: the build directory is keyed by a
   hash of the sources and headers, the flags, the torch version and its CUDA version (or "cpu"), the Python version
   and, for CUDA builds, the target architectures. Concurrent processes (every rank of a job) serialize on a file lock;
   the first builds, the others wait and load the result. A successful build leaves ``ok.json`` beside the library, so
   later processes load it without invoking ninja or the compiler.

Failures never raise out of :meth:`OpBuilder.status`; :meth:`OpBuilder.load` raises :class:`OpUnavailable` whose
message is the reason (missing compiler/ninja/CUDA, or the compiler's output). The reason is also written to
``failed.json`` in the build directory so ``python -m dalle_ds.info`` can show it; a failed build is retried by the
next process (not by the same one).

Environment:
  ``DALLE_DS_OPS_CACHE``  cache root (default ``$XDG_CACHE_HOME/dalle_ds/ops`` or ``~/.cache/dalle_ds/ops``)
  ``DALLE_DS_OPS_JIT=0``  never build; use prebuilt or cached libraries only
  ``DALLE_DS_CSRC``       where ``csrc/`` is, when the package is installed without it
  ``MAX_JOBS``            parallel compile jobs (read by torch)
  ``TORCH_CUDA_ARCH_LIST`` CUDA architectures to build for (read by torch; default: the visible GPUs)
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["OpBuilder", "OpUnavailable", "csrc_root", "cache_root"]

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1  # bump to invalidate every cached build
_LOCK_TIMEOUT_S = 1800.0


class OpUnavailable(RuntimeError):
    """An op cannot be loaded here; the message says why."""


def csrc_root() -> Path:
    """The ``csrc/`` directory: ``$DALLE_DS_CSRC``, else ``dalle_ds/csrc`` when an installed package ships the
    sources there (setup.py's build_py copies ``csrc/`` into wheels and ``pip install .``), else the checkout's
    top-level ``csrc/`` (editable installs)."""
    env = os.environ.get("DALLE_DS_CSRC")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    packaged = here.parents[1] / "csrc"
    return packaged if packaged.is_dir() else here.parents[2] / "csrc"


def cache_root() -> Path:
    """Root of the per-machine build cache."""
    env = os.environ.get("DALLE_DS_OPS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dalle_ds" / "ops"


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float = _LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive advisory lock (flock) on ``path``; released by the OS if the holder dies, so it never goes stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own build baton still guards the build directory
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OpUnavailable(f"timed out after {timeout_s:.0f} s waiting for the build lock {path}")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tail(text: str, lines: int = 40) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


@dataclass
class OpBuilder:
    """How to build and load one torch extension (a library registering ``TORCH_LIBRARY`` ops).

    Sources are paths relative to :func:`csrc_root`; ``depends`` are headers that are hashed into the cache key but not
    compiled. The library registers its ops when loaded (``torch.ops.load_library``); ``check`` may verify it
    afterwards and return an error string.
    """

    name: str
    """Short op name, e.g. ``"fp169_cpu"``; also the library's file name stem (``dalle_ds_<name>.so``)."""
    sources: Sequence[str]
    depends: Sequence[str] = ()
    include_dirs: Sequence[str] = ()
    """Include directories relative to csrc_root."""
    with_cuda: bool = False
    extra_cflags: Sequence[str] = ("-O3",)
    extra_cuda_cflags: Sequence[str] = ("-O3",)
    extra_ldflags: Sequence[str] = ()
    prebuilt_module: str | None = None
    """Importable name of an ahead-of-time build (a shared library found by importlib, loaded with torch.ops)."""
    check: Callable[[], str | None] | None = None
    _path: str | None = field(default=None, init=False, repr=False)
    _error: str | None = field(default=None, init=False, repr=False)
    _origin: str = field(default="", init=False, repr=False)

    # ---- ahead-of-time build (setup.py) ---------------------------------------------------------------------
    def setuptools_extension(self, relative_to: Path | None = None):
        """The ``torch.utils.cpp_extension`` Extension that builds this op as :attr:`prebuilt_module` at install time
        (``DALLE_DS_BUILD_OPS=1``, setup.py): the same sources, include directories and flags as the JIT build.
        Source paths are made relative to ``relative_to`` (setup.py's directory), as setuptools wants them."""
        from torch.utils import cpp_extension

        if not self.prebuilt_module:
            raise ValueError(f"op {self.name} has no prebuilt_module to build ahead of time")
        root = csrc_root()
        base = Path(relative_to) if relative_to is not None else Path.cwd()
        kwargs = dict(name=self.prebuilt_module,
                      sources=[os.path.relpath(root / s, base) for s in self.sources],
                      include_dirs=[str(root / d) for d in self.include_dirs],
                      extra_link_args=list(self.extra_ldflags))
        if self.with_cuda:
            return cpp_extension.CUDAExtension(
                extra_compile_args={"cxx": list(self.extra_cflags), "nvcc": list(self.extra_cuda_cflags)}, **kwargs)
        return cpp_extension.CppExtension(extra_compile_args={"cxx": list(self.extra_cflags)}, **kwargs)

    # ---- compatibility ------------------------------------------------------------------------------------------
    def incompatibility(self, need_device: bool = True) -> str | None:
        """Why this op cannot be built here (and, with ``need_device``, loaded: a CUDA op wants a visible GPU; an
        ahead-of-time build does not), or None."""
        root = csrc_root()
        missing = [s for s in (*self.sources, *self.depends) if not (root / s).is_file()]
        if missing:
            return f"sources not found under {root} (set DALLE_DS_CSRC): {', '.join(missing)}"
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            return "ninja is not installed (pip install ninja)"
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            return f"no C++ compiler: '{cxx}' is not on PATH (install g++ or set CXX)"
        if self.with_cuda:
            if torch.version.cuda is None:
                return f"torch {torch.__version__} was built without CUDA"
            if cpp_extension.CUDA_HOME is None:
                return "CUDA toolkit not found (set CUDA_HOME to a toolkit with nvcc)"
            nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
            if not nvcc.exists():
                return f"nvcc not found at {nvcc}"
            header = Path(cpp_extension.CUDA_HOME) / "include" / "cuda_runtime_api.h"
            if not header.is_file():  # torch took CUDA_HOME from an nvcc on PATH that is a wrapper script elsewhere
                return (f"CUDA_HOME {cpp_extension.CUDA_HOME} has no include/cuda_runtime_api.h (the nvcc found there "
                        "may be a wrapper): set CUDA_HOME to the toolkit, e.g. /usr/local/cuda")
            if need_device and not torch.cuda.is_available():
                return "no CUDA device is visible"
        return None

    # ---- cache --------------------------------------------------------------------------------------------------
    def cache_key(self) -> str:
        """Hash of everything that changes the built library."""
        h = hashlib.sha256()
        root = csrc_root()
        for rel in sorted({*self.sources, *self.depends}):
            h.update(rel.encode())
            h.update((root / rel).read_bytes())
        parts = [
            f"builder={BUILDER_VERSION}",
            f"torch={torch.__version__}",
            f"cuda={torch.version.cuda if self.with_cuda else 'cpu'}",
            f"python={sys.implementation.cache_tag}",
            f"machine={platform.machine()}",
            f"cxx={os.environ.get('CXX', 'c++')}",
            f"flags={list(self.extra_cflags)}|{list(self.extra_cuda_cflags)}|{list(self.extra_ldflags)}",
        ]
        if self.with_cuda:
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
            if not arch and torch.cuda.is_available():
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                arch = ";".join(f"{a}.{b}" for a, b in caps)
            parts.append(f"arch={arch}")
        h.update("\n".join(parts).encode())
        return h.hexdigest()[:16]

    def build_directory(self) -> Path:
        return cache_root() / f"{self.name}-{self.cache_key()}"

    @property
    def library_name(self) -> str:
        return f"dalle_ds_{self.name}"

    # ---- loading ------------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._path is not None

    def load(self, verbose: bool = False) -> str:
        """Load the op library (prebuilt, cached or freshly built) and return its path; raise OpUnavailable."""
        if self._path is not None:
            return self._path
        if self._error is not None:
            raise OpUnavailable(self._error)
        try:
            self._path = self._load(verbose)
            return self._path
        except OpUnavailable as exc:
            self._error = str(exc)
            raise

    def _load_library(self, path: str, origin: str) -> str:
        torch.ops.load_library(path)
        if self.check is not None:
            problem = self.check()
            if problem:
                raise OpUnavailable(f"{origin} library {path} is unusable: {problem}")
        self._origin = origin
        return path

    def _load(self, verbose: bool) -> str:
        prebuilt_note = ""
        if self.prebuilt_module:
            spec = importlib.util.find_spec(self.prebuilt_module) if _parent_importable(self.prebuilt_module) else None
            if spec is not None and spec.origin:
                try:
                    return self._load_library(spec.origin, "prebuilt")
                except (OSError, RuntimeError) as exc:  # built for another torch, say
                    prebuilt_note = f" (prebuilt {spec.origin} failed to load: {exc})"
                    logger.warning("dalle_ds op %s: %s", self.name, prebuilt_note.strip())
        if os.environ.get("DALLE_DS_OPS_JIT", "1") == "0":
            cached = self._cached_library()
            if cached:
                return self._load_library(cached, "cached")
            raise OpUnavailable(f"not built, and DALLE_DS_OPS_JIT=0 forbids building{prebuilt_note}")
        reason = self.incompatibility()
        if reason:
            raise OpUnavailable(reason + prebuilt_note)
        build_dir = self.build_directory()
        with _file_lock(build_dir.with_name(build_dir.name + ".lock")):
            cached = self._cached_library()
            if cached:
                return self._load_library(cached, "cached")
            return self._build(build_dir, verbose)

    def _cached_library(self) -> str | None:
        build_dir = self.build_directory()
        ok = build_dir / "ok.json"
        if not ok.is_file():
            return None
        try:
            lib = json.loads(ok.read_text())["library"]
        except (OSError, ValueError, KeyError):
            return None
        return lib if Path(lib).is_file() else None

    def _build(self, build_dir: Path, verbose: bool) -> str:
        from torch.utils import cpp_extension

        root = csrc_root()
        build_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("lock", "failed.json", "ok.json"):  # we hold the flock: no one else is building here
            (build_dir / stale).unlink(missing_ok=True)
        logger.warning("dalle_ds: building op %s (first use on this machine; cached in %s)", self.name, build_dir)
        t0 = time.perf_counter()
        try:
            path = cpp_extension.load(
                name=self.library_name,
                sources=[str(root / s) for s in self.sources],
                extra_cflags=list(self.extra_cflags),
                extra_cuda_cflags=list(self.extra_cuda_cflags) if self.with_cuda else None,
                extra_ldflags=list(self.extra_ldflags),
                extra_include_paths=[str(root / d) for d in self.include_dirs],
                build_directory=str(build_dir),
                verbose=verbose,
                with_cuda=self.with_cuda,
                is_python_module=False,
            )
        except Exception as exc:  # compiler errors arrive as RuntimeError with the ninja output in the message
            reason = f"build failed ({type(exc).__name__}): {_tail(str(exc))}"
            (build_dir / "failed.json").write_text(
                json.dumps({"reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1)
            )
            raise OpUnavailable(reason) from exc
        seconds = time.perf_counter() - t0
        path = str(path)
        if self.check is not None:
            problem = self.check()
            if problem:
                raise OpUnavailable(f"freshly built library {path} is unusable: {problem}")
        info = {
            "library": path,
            "name": self.name,
            "build_seconds": round(seconds, 2),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if self.with_cuda else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = build_dir / "ok.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(build_dir / "ok.json")  # atomic: readers see all or nothing
        logger.warning("dalle_ds: built op %s in %.1f s", self.name, seconds)
        self._origin = "built"
        return path

    # ---- reporting ----------------------------------------------------------------------------------------------
    def status(self, build: bool = True) -> dict:
        """``{"name", "available", "reason"}`` (+ ``"path"`` when loaded). With ``build=False`` nothing is compiled:
        a cached build is reported as available without loading it."""
        if self._path is not None:
            return {"name": self.name, "available": True, "reason": f"loaded ({self._origin})", "path": self._path}
        if build:
            try:
                path = self.load()
                return {"name": self.name, "available": True, "reason": f"loaded ({self._origin})", "path": path}
            except OpUnavailable as exc:
                return {"name": self.name, "available": False, "reason": str(exc)}
        if self._error is not None:
            return {"name": self.name, "available": False, "reason": self._error}
        reason = self.incompatibility()
        if reason:
            return {"name": self.name, "available": False, "reason": reason}
        if self._cached_library():
            return {"name": self.name, "available": True, "reason": "built (cached); loads on first use"}
        failed = self.build_directory() / "failed.json"
        if failed.is_file():
            try:
                last = json.loads(failed.read_text())["reason"]
            except (OSError, ValueError, KeyError):
                last = "unknown"
            return {"name": self.name, "available": False, "reason": f"last build failed (retried on next use): {last}"}
        return {"name": self.name, "available": False, "reason": "not built yet: builds on first use (JIT)"}


def _parent_importable(module: str) -> bool:
    parent = module.rpartition(".")[0]
    if not parent:
        return True
    try:
        return importlib.util.find_spec(parent) is not None
    except (ImportError, ValueError):
        return False
