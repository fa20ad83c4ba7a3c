"""Installs each top-level folder as a subpackage of `keel` (keel.training <- training/, ...)."""
from setuptools import find_packages, setup

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
        "pyyaml",
        "rich",
        "wandb",
        "tokenizers",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        "deepspeed": ["deepspeed==0.19.8"],
        "megatron": ["megatron-core==0.16.1"],
        "ray": ["ray[default]==2.60.0"],
        "triton": ["triton==3.9.0"],
    },
    entry_points={"console_scripts": ["keel=keel.launcher.cli:main"]},
)
