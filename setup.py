"""Package metadata for dalle_ds.

Custom ops (the 1-6-9 codec and the fused 16-bit Adam step in ``csrc/fp169``) are JIT-built on first use by default
(see ``dalle_ds/ops/builder.py``). To build them ahead of time, with torch already installed::

    DALLE_DS_BUILD_OPS=1 pip install --no-build-isolation .        # or: python setup.py build_ext --inplace

This builds ``dalle_ds.ops.fp169._C_cpu`` and, where torch has CUDA and ``nvcc`` is found, ``_C_cuda``, from the same
sources and flags as the JIT builder (``OpBuilder.setuptools_extension``); the loader uses them before any JIT build.
"""
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """Copies the top-level ``csrc/`` into the built package as ``dalle_ds/csrc``, where
    ``dalle_ds.ops.builder.csrc_root`` looks in an installed package: without it a wheel (``pip install .``) has no
    sources, and every op the ahead-of-time build did not make (all of them by default) reports "sources not found".
    An editable install reads the checkout's ``csrc/`` and copies nothing."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "dalle_ds", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "csrc"), target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))

install_requires = [
    "torch>=2.11,<2.14",
    "triton>=3.6,<3.10; platform_system == 'Linux'",
    "deepspeed>=0.19,<0.20",
    "datasets>=3.0",
    "tokenizers>=0.20",
    "transformers>=4.45",
    "tqdm>=4.60",
    "numpy>=1.24",
    "pillow>=10.0",
    "scipy>=1.10",
    "tensorboard>=2.14",
    "torchmetrics>=1.4",
    "webdataset>=0.2.86",
    "ninja>=1.11",
]

ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if os.environ.get("DALLE_DS_BUILD_OPS", "0") == "1":
    sys.path.insert(0, HERE)  # the builders' definitions, from this source tree
    from torch.utils.cpp_extension import BuildExtension

    from dalle_ds.ops.fp169._ext import CPU_BUILDER, CUDA_BUILDER

    ext_modules.append(CPU_BUILDER.setuptools_extension(HERE))
    why_not = CUDA_BUILDER.incompatibility(need_device=False)  # a build machine may have no GPU
    if why_not is None:
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch reads the architectures off the visible GPUs; with none it has no list (torch 2.11: IndexError in
            # _get_cuda_arch_flags). Ampere and Hopper machine code, plus PTX for newer GPUs.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
            print("dalle_ds: no GPU visible and no TORCH_CUDA_ARCH_LIST: building the CUDA op for 8.0;9.0+PTX")
        ext_modules.append(CUDA_BUILDER.setuptools_extension(HERE))
    else:
        print(f"dalle_ds: not building {CUDA_BUILDER.name} ahead of time: {why_not}")
    cmdclass["build_ext"] = BuildExtension

setup(
    name="dalle_ds",
    version="0.1.0",
    description="DeepSpeed-backed trainer for DALL-E-style text-to-image models (Ramesh et al., 2021)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dalle_ds", "dalle_ds.*"]),
    install_requires=install_requires,
    # pytest-xdist: the Makefile runs the suite on 2 workers (--dist worksteal needs >= 3.2).
    # attrs and requests: what the DALL-E package (the reference of tests/test_openai_dvae.py) imports; the Makefile
    # installs that package itself with --no-deps, since it declares torchvision, which would pull another torch
    extras_require={"test": ["pytest>=7.4", "pytest-xdist>=3.2", "attrs>=21.0", "requests>=2.25"],
                    # FID / IS with Inception-v3 (launch/evaluate.py --features inception); torch-fidelity imports
                    # torchvision: install the torchvision built for your torch
                    "fid": ["torch-fidelity>=0.3"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
