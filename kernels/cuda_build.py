"""Build keel's CUDA C++ kernels: nvcc objects + a thin torch binding, JIT or ahead of time.

Why not `CUDAExtension`: with a CPU torch wheel, torch fixes CUDA_HOME to None and ships no CUDA
libraries, so `CUDAExtension`/`load()` of `.cu` sources fail. Instead nvcc compiles the `.cu` files
(extern "C" launchers, the stream passed in) to objects, and a plain C++ binding links them with
the static CUDA runtime. That builds and imports on a CPU-only machine and works with a CUDA torch.

JIT:  `load_cuda_ops()` (cache under build/torch_extensions, or $KEEL_BUILD_DIR/torch_extensions).
AOT:  `KEEL_BUILD_CUDA=1 pip install .` with setup.py calling `setup_kwargs()`; builds
      `keel.kernels._cuda_ops`, which `kernels/cuda_ops.py` prefers over the JIT build.

This module imports nothing heavy at import time so setup.py can load it by file path.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
REPO_ROOT = Path(__file__).resolve().parents[1]
EXT_NAME = "keel_cuda_ops"
# sm_90 SASS plus compute_90 PTX, so newer GPUs can JIT the PTX. Override, e.g. "80;90".
DEFAULT_ARCHS = "90"


def build_dir() -> Path:
    return Path(os.environ.get("KEEL_BUILD_DIR", REPO_ROOT / "build"))


def cu_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_lib_dir() -> Path | None:
    """Directory holding libcudart_static.a for the nvcc in use."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        homes.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for home in filter(None, homes):
        for sub in ("lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib"):
            if (Path(home) / sub / "libcudart_static.a").exists():
                return Path(home) / sub
    return None


def cuda_ops_buildable() -> tuple[bool, str]:
    """(True, "") if the ops are prebuilt or can be JIT-built here; else (False, why and how to fix)."""
    try:
        from . import _cuda_ops  # noqa: F401  (AOT build)
        return True, ""
    except ImportError:
        pass
    if find_nvcc() is None:
        return False, "nvcc not found; install the CUDA toolkit (or set CUDA_HOME), or build with KEEL_BUILD_CUDA=1"
    if cuda_lib_dir() is None:
        return False, "libcudart_static.a not found next to nvcc; set CUDA_HOME to the CUDA toolkit root"
    return True, ""


def nvcc_arch_flags(archs: str | None = None) -> list[str]:
    archs = archs or os.environ.get("KEEL_CUDA_ARCHS", DEFAULT_ARCHS)
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().removeprefix("sm_")
        flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    return flags + [f"-gencode=arch=compute_{arch},code=compute_{arch}"]


def nvcc_command(src: Path, obj: Path, arch_flags: list[str]) -> list[str]:
    return [find_nvcc() or "nvcc", "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
            "--expt-relaxed-constexpr", *arch_flags]


def compile_objects(out_dir: Path | None = None, archs: str | None = None, verbose: bool = False) -> list[Path]:
    """nvcc every .cu in csrc/ to an object; objects are named by a hash of sources and flags, so
    an unchanged tree reuses them and any change produces a new name (which also retriggers the
    torch binding's rebuild, whose cache key includes the link flags)."""
    out_dir = Path(out_dir or build_dir() / "cuda_objs")
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = nvcc_arch_flags(archs)
    headers = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.cuh")))
    objs = []
    for src in cu_sources():
        digest = hashlib.sha256(src.read_bytes() + headers + " ".join(flags).encode()).hexdigest()[:12]
        obj = out_dir / f"{src.stem}-{digest}.o"
        if not obj.exists():
            cmd = nvcc_command(src, obj, flags)
            if verbose:
                print(" ".join(cmd))
            tmp = obj.with_suffix(".o.tmp")
            cmd[cmd.index(str(obj))] = str(tmp)
            subprocess.run(cmd, check=True, cwd=CSRC)
            tmp.replace(obj)  # atomic: a killed build never leaves a truncated object behind
        objs.append(obj)
    return objs


def link_flags(objs: list[Path]) -> list[str]:
    lib = cuda_lib_dir()
    if lib is None:
        raise RuntimeError("libcudart_static.a not found; set CUDA_HOME to the CUDA toolkit root")
    # Static cudart: the binding then needs no libcudart.so at import, so it loads on a CPU machine.
    return [str(o) for o in objs] + [f"-L{lib}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]


def jit_load(verbose: bool = False):
    """Compile (if needed) and import the binding; ~30-60 s the first time, cached afterwards."""
    ok, why = cuda_ops_buildable()
    if not ok:
        raise RuntimeError(f"cannot build keel CUDA ops: {why}")
    from torch.utils import cpp_extension
    objs = compile_objects(verbose=verbose)
    ext_dir = build_dir() / "torch_extensions" / EXT_NAME
    ext_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=EXT_NAME, sources=[str(CSRC / "binding.cpp")], extra_ldflags=link_flags(objs),
                              extra_cflags=["-O3"], build_directory=str(ext_dir), verbose=verbose)


def setup_kwargs() -> dict:
    """Extra `setup()` arguments for the AOT build: empty unless KEEL_BUILD_CUDA=1.

    In setup.py:  setup(..., **cuda_build.setup_kwargs())
    """
    if os.environ.get("KEEL_BUILD_CUDA", "0") != "1":
        return {}
    ok, why = cuda_ops_buildable()
    if not ok:
        raise RuntimeError(f"KEEL_BUILD_CUDA=1 but {why}")
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    objs = compile_objects(verbose=True)
    lib = cuda_lib_dir()
    ext = CppExtension(name="keel.kernels._cuda_ops", sources=[os.path.relpath(CSRC / "binding.cpp", REPO_ROOT)],
                       extra_objects=[str(o) for o in objs], library_dirs=[str(lib)],
                       libraries=["cudart_static", "dl", "rt", "pthread"], extra_compile_args=["-O3"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}
