"""Installs each top-level folder as a subpackage of `keel` (keel.training <- training/, ...).

KEEL_BUILD_CUDA=1 also builds the CUDA kernels ahead of time (kernels/cuda_build.py); otherwise they are
built just in time on first use.
"""
import importlib.util
from pathlib import Path

from setuptools import find_packages, setup


def _cuda_build():
    # Loaded by path: importing keel.kernels would need the package this script is installing.
    spec = importlib.util.spec_from_file_location("keel_cuda_build", Path(__file__).parent / "kernels" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# The top-level folders named by the design card; each becomes keel.<folder>.
SUBPACKAGES = ["launcher", "parallel", "kernels", "checkpoints", "training", "scaling"]


def _packages():
    packages, package_dir = [], {}
    for top in SUBPACKAGES:
        package_dir[f"keel.{top}"] = top
        packages.append(f"keel.{top}")
        packages += [f"keel.{top}.{sub}" for sub in find_packages(top)]
    return packages, package_dir


packages, package_dir = _packages()

setup(
    name="keel",
    version="0.1.0",
    description="Distributed LLM training that finishes, with a predicted final loss",
    python_requires=">=3.11",
    packages=packages,
    package_dir=package_dir,
    package_data={"keel.kernels": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h"]},
    # torch is deliberately unpinned in range: the Makefile installs the CPU wheel first so that
    # resolving these never drags in a multi-GB CUDA build.
    install_requires=[
        "torch>=2.6",
        "numpy",
        "scipy",
        "threadpoolctl",  # one BLAS thread inside the scaling fits (scaling/blas.py)
        "pyyaml",
        "rich",
        "wandb",
        "xxhash",  # checkpoint checksums (checkpoints/manifest.py); wandb needs it too
        "tokenizers",
        # `keel data prepare` reads Parquet and `datasets.save_to_disk` folders (Arrow) and .jsonl.zst.
        "pyarrow",
        "zstandard",
        "safetensors",
        "matplotlib",
        # Every run is supervised on Ray, one process included (launcher/).
        "ray[default]==2.60.0",
    ],
    extras_require={
        # transformers: the Hugging Face round trip is checked against the real library, not a copy of it;
        # datasets: the tests write real `save_to_disk` folders (keel reads them with pyarrow alone).
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "transformers==5.24.0", "datasets==5.2.0"],
        "deepspeed": ["deepspeed==0.19.8"],
        "megatron": ["megatron-core==0.16.1"],
        "ray": ["ray[default]==2.60.0"],
        "triton": ["triton==3.9.0"],
    },
    entry_points={"console_scripts": ["keel=keel.launcher.cli:main"]},
    **_cuda_build().setup_kwargs(),
)
