"""CUDA C++ kernels: every .cu compiles for sm_90, and the torch binding builds here and refuses CPU
tensors. Nothing here runs a kernel: that needs a GPU."""
import subprocess

import pytest
import torch

from keel.kernels import cuda_build

needs_nvcc = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc (CUDA toolkit) is not installed")


@needs_nvcc
@pytest.mark.parametrize("src", cuda_build.cu_sources(), ids=lambda p: p.name)
def test_cu_file_compiles_for_sm90_with_nvcc(src, tmp_path):
    cmd = [cuda_build.find_nvcc(), "-c", "-arch=sm_90", "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
           str(src), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=src.parent)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


def test_csrc_holds_the_attention_and_rmsnorm_kernels():
    assert {p.name for p in cuda_build.cu_sources()} >= {"attention_fwd.cu", "rmsnorm.cu"}


@needs_nvcc
def test_cuda_binding_builds_against_cpu_torch_and_refuses_cpu_tensors():
    from keel.kernels.cuda_ops import load_cuda_ops
    ops = load_cuda_ops()  # JIT: nvcc objects + cpp_extension.load, cached under build/
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="tensor 'q' is on cpu.*only on CUDA tensors"):
        ops.attention_fwd(q, q, q, None, True, 0.125, 0)
    x, w = torch.randn(4, 32), torch.ones(32)
    with pytest.raises(RuntimeError, match="tensor 'x' is on cpu.*only on CUDA tensors"):
        ops.rmsnorm_fwd(x, w, 1e-6, 0)
    with pytest.raises(RuntimeError, match="tensor 'grad_out' is on cpu"):
        ops.rmsnorm_bwd(x, x, w, torch.ones(4), 4, 0)


def test_cuda_attention_wrapper_refuses_inputs_that_need_gradients():
    from keel.kernels.cuda_ops import cuda_attention_fwd
    q = torch.randn(1, 2, 8, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        cuda_attention_fwd(q, q, q)


def test_aot_build_is_off_unless_keel_build_cuda_is_set(monkeypatch):
    monkeypatch.delenv("KEEL_BUILD_CUDA", raising=False)
    assert cuda_build.setup_kwargs() == {}


@needs_nvcc
def test_aot_build_describes_the_extension_setup_py_should_build(monkeypatch):
    monkeypatch.setenv("KEEL_BUILD_CUDA", "1")
    kwargs = cuda_build.setup_kwargs()
    (ext,) = kwargs["ext_modules"]
    assert ext.name == "keel.kernels._cuda_ops"
    assert len(ext.extra_objects) == len(cuda_build.cu_sources())
    assert all(__import__("os").path.exists(o) for o in ext.extra_objects)
    assert "build_ext" in kwargs["cmdclass"]
