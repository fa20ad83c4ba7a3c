"""Triton SwiGLU (silu(gate) * up) forward and backward against an fp64 reference, under the interpreter."""
import pytest
import torch
import torch.nn.functional as F

from keel.kernels.triton_ops import SWIGLU_BLOCK_F, triton_swiglu


TOLERANCES = [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)]
DTYPE_IDS = ["fp32", "bf16"]


def max_errors_vs_fp64(gate, up, dy):
    """Max abs error of y, d gate, d up of the Triton op against fp64 autograd of silu(gate) * up."""
    y = triton_swiglu(gate, up)
    dg, du = torch.autograd.grad(y, (gate, up), dy)
    assert y.dtype == dg.dtype == du.dtype == gate.dtype
    assert y.shape == dg.shape == du.shape == gate.shape
    gr, ur = (t.detach().double().requires_grad_() for t in (gate, up))
    yr = F.silu(gr) * ur
    dgr, dur = torch.autograd.grad(yr, (gr, ur), dy.double())
    return [(a.double() - b).abs().max().item() for a, b in ((y, yr), (dg, dgr), (du, dur))]


def inputs(shape, dtype, seed):
    # up and dy at half scale keep |y| and the gradients below 8, where one bf16 rounding is < 2e-2.
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=gen).to(dtype)
    up = (0.5 * torch.randn(shape, generator=gen)).to(dtype)
    dy = (0.5 * torch.randn(shape, generator=gen)).to(dtype)
    return gate, up, dy


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("F_", [SWIGLU_BLOCK_F, 77], ids=["F=block", "F=77-ragged"])
def test_triton_swiglu_matches_fp64_forward_and_grads(F_, dtype, tol):
    gate, up, dy = inputs((3, 5, F_), dtype, seed=F_)
    errors = max_errors_vs_fp64(gate.requires_grad_(), up.requires_grad_(), dy)
    assert max(errors) <= tol, errors


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=DTYPE_IDS)
def test_triton_swiglu_reads_gate_and_up_as_column_halves_of_one_fused_projection(dtype, tol):
    # A fused w13 projection split with chunk(): row stride 2F, no copy needed.
    F_ = 45
    gen = torch.Generator().manual_seed(1)
    w13_out = (torch.randn(2, 7, 2 * F_, generator=gen) * torch.tensor([1.0] * F_ + [0.5] * F_)).to(dtype)
    w13_out.requires_grad_()
    gate, up = w13_out.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    dy = (0.5 * torch.randn(2, 7, F_, generator=gen)).to(dtype)
    errors = max_errors_vs_fp64(gate, up, dy)
    assert max(errors) <= tol, errors
    (dw13,) = torch.autograd.grad(triton_swiglu(gate, up), w13_out, dy)
    gr, ur = (t.detach().double().requires_grad_() for t in (gate, up))
    dgr, dur = torch.autograd.grad(F.silu(gr) * ur, (gr, ur), dy.double())
    assert (dw13.double() - torch.cat((dgr, dur), -1)).abs().max() <= tol


def test_triton_swiglu_accepts_transposed_inputs_and_gradients():
    # Column stride != 1: the wrapper copies; the upstream gradient is a transposed view too.
    gate, up, dy = inputs((37, 6), torch.float32, seed=3)
    gate_t, up_t = gate.t().requires_grad_(), up.t().requires_grad_()
    errors = max_errors_vs_fp64(gate_t, up_t, dy.t())
    assert max(errors) <= 1e-4, errors


def test_triton_swiglu_refuses_mismatched_gate_and_up():
    with pytest.raises(ValueError, match="gate and up must match"):
        triton_swiglu(torch.zeros(2, 8), torch.zeros(2, 9))
