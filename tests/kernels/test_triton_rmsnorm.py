"""Triton RMSNorm forward and backward against an fp64 reference, under the interpreter."""
import pytest
import torch

from keel.kernels.triton_ops import triton_rms_norm


def reference_rms_norm(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [48, 64])
def test_triton_rms_norm_matches_reference_forward_and_grads(D, dtype, tol):
    gen = torch.Generator().manual_seed(D)
    x = torch.randn(3, 7, D, generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype).requires_grad_()
    dy = (0.5 * torch.randn(3, 7, D, generator=gen)).to(dtype)
    y = triton_rms_norm(x, w, 1e-6)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    yr = reference_rms_norm(xr, wr, 1e-6)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.double())
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert (y.double() - yr).abs().max() <= tol
    assert (dx.double() - dxr).abs().max() <= tol
    # dw sums 21 rows: compare relative to its magnitude.
    assert ((dw.double() - dwr).abs().max() / dwr.abs().max()) <= tol
