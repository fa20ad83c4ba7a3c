"""`rms_norm`/`swiglu`/`rope(impl=...)`: the default is the model's own math, the Triton backends agree
with it, and a backend that cannot run a config is refused before training starts, naming the fix."""
import pytest
import torch

from keel.kernels.ops import (apply_rope, check_op_impl, resolve_op_impl, rms_norm, rope, swiglu, torch_rms_norm,
                              torch_swiglu)
from keel.parallel.dims import LayoutError
from keel.training.config import ConfigError
from keel.training.loop import train
from keel.training.model import rope_tables


def test_auto_is_torch_on_cpu_even_when_the_triton_interpreter_is_on():
    x = torch.randn(2, 8)
    for op in ("rmsnorm", "swiglu", "rope"):
        assert resolve_op_impl(op, "auto", x) == "torch"


def test_default_calls_are_the_reference_math_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 16, generator=gen).bfloat16(), torch.randn(16, generator=gen)
    assert torch.equal(rms_norm(x, w, 1e-5), torch_rms_norm(x, w, 1e-5))
    g, u = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    assert torch.equal(swiglu(g, u), torch_swiglu(g, u))
    q, k = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    cos, sin = rope_tables(8, 10, 10000.0)
    q_out, k_out = rope(q, k, cos, sin)
    assert torch.equal(q_out, apply_rope(q, cos, sin)) and torch.equal(k_out, apply_rope(k, cos, sin))


def test_triton_backends_match_torch_through_the_dispatch_on_strided_inputs():
    gen = torch.Generator().manual_seed(1)
    # qk-norm's input: heads transposed out of the projection, so not contiguous.
    x = torch.randn(2, 5, 3, 16, generator=gen).transpose(1, 2).requires_grad_()
    w = (1 + 0.1 * torch.randn(16, generator=gen)).requires_grad_()
    dy = torch.randn(2, 3, 5, 16, generator=gen)
    got = torch.autograd.grad(rms_norm(x, w, 1e-5, "triton"), (x, w), dy)
    want = torch.autograd.grad(rms_norm(x, w, 1e-5, "torch"), (x, w), dy)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got, want))
    y_triton, y_torch = rms_norm(x, w, 1e-5, "triton"), rms_norm(x, w, 1e-5, "torch")
    assert (y_triton - y_torch).abs().max() <= 1e-6
    g, u = (torch.randn(2, 3, 40, generator=gen) for _ in range(2))
    assert (swiglu(g, u, "triton") - swiglu(g, u, "torch")).abs().max() <= 1e-6
    q, k = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    cos, sin = rope_tables(8, 10, 10000.0)
    assert all(torch.equal(a, b) for a, b in zip(rope(q, k, cos, sin, "triton"), rope(q, k, cos, sin, "torch")))


@pytest.mark.parametrize("op,impl,device,kwargs,match", [
    ("rope", "liger", "cuda", {}, "different pair layout.*choose one of auto, torch, triton"),
    ("swiglu", "cuda", "cuda", {}, "choose one of auto, torch, triton, liger"),
    ("rmsnorm", "cuda", "cpu", {}, "needs a CUDA device.*'torch'"),
    ("rmsnorm", "triton", "cuda", dict(dim=16384), "compile-checked up to 8192, got 16384"),
    ("rope", "triton", "cuda", dict(dim=128, n_heads=128, n_kv_heads=8), r"\(128, 8, 128\) is larger"),
    ("swiglu", "liger", "cpu", {}, "liger-kernel package|needs a CUDA device"),
], ids=["rope-liger", "swiglu-cuda", "cuda-on-cpu", "rmsnorm-too-wide", "rope-too-many-heads", "liger-on-cpu"])
def test_impossible_backends_are_refused_with_the_fix(op, impl, device, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_op_impl(op, impl, device, **kwargs)


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="rmsnorm impl 'triton' needs a CUDA device"):
        check_op_impl("rmsnorm", "triton", "cpu")


def test_training_refuses_a_kernel_that_cannot_run_before_building_anything(tiny_config):
    with pytest.raises(ConfigError, match=r"model.rmsnorm.impl: rmsnorm impl 'cuda' needs a CUDA device"):
        train(tiny_config("model.rmsnorm.impl=cuda", "train.device=cpu"))
    with pytest.raises(ConfigError, match=r"model.rope.impl: 'liger' is not one of 'auto' \| 'torch' \| 'triton'"):
        tiny_config("model.rope.impl=liger")


def test_fused_rmsnorm_is_refused_with_tensor_parallelism(tiny_config):
    # Sequence-parallel norms run on DTensors; rope and swiglu see plain local shards and are allowed.
    from keel.parallel.dims import ParallelDims, check_layout
    dims = ParallelDims.resolve(1, 1, 2, 1, 2)
    with pytest.raises(LayoutError, match="model.rmsnorm.impl=triton cannot run with parallel.tp > 1"):
        check_layout(tiny_config("model.rmsnorm.impl=triton", "parallel.tp=2"), dims)
    check_layout(tiny_config("model.rope.impl=triton", "model.swiglu.impl=triton", "parallel.tp=2"), dims)
