"""Package metadata for dalle_ds.

Custom ops (the 1-6-9 codec in ``csrc/``) are JIT-built on first use by default (see ``dalle_ds/ops/builder.py``);
set ``DALLE_DS_BUILD_OPS=1`` at install time to build them ahead of time.
"""
from setuptools import find_packages, setup

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
    "webdataset>=0.2.86",
    "ninja>=1.11",
]

setup(
    name="dalle_ds",
    version="0.1.0",
    description="DeepSpeed-backed trainer for DALL-E-style text-to-image models (Ramesh et al., 2021)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dalle_ds", "dalle_ds.*"]),
    install_requires=install_requires,
    extras_require={"test": ["pytest>=7.4"]},
)
