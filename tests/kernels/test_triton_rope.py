"""Triton RoPE on q and k: forward and backward against an fp64 reference and keel's own model RoPE,
under the interpreter."""
import pytest
import torch

from keel.kernels.triton_rope import triton_rope
from keel.training.model import apply_rope, rope_tables


TOLERANCES = [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)]
DTYPE_IDS = ["fp32", "bf16"]


def reference_rope_fp64(x_BHTd, cos_Tf, sin_Tf):
    """Interleaved pairs as complex numbers x[2i] + i x[2i+1], times e^{i angle} (Llama's formulation)."""
    T = x_BHTd.shape[-2]
    x_c = torch.view_as_complex(x_BHTd.double().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos_Tf[:T].double(), sin_Tf[:T].double())
    return torch.view_as_real(x_c * rot).flatten(-2)


def projections(B, H, KH, T, d, dtype, seed):
    """q, k as the model makes them: [B, T, heads, d] projections viewed as [B, heads, T, d] (non-contiguous).

    Half-scale values stay below 4 in magnitude, where one bf16 ulp (what the interpreter's truncating
    fp32 -> bf16 cast can lose) is 2^-6 < 2e-2.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (0.5 * torch.randn(*shape, generator=gen)).to(dtype)

    q = randn(B, T, H, d).transpose(1, 2).requires_grad_()
    k = randn(B, T, KH, d).transpose(1, 2).requires_grad_()
    return q, k, randn(B, H, T, d), randn(B, KH, T, d)


# d=24: 12 pairs, padded to a 16-wide tile; H=3 and KH=1 are not powers of two (GQA); T=7 with a
# table built for 11 positions, so only the first T rows may be read.
SHAPES = [(2, 3, 1, 7, 24), (1, 4, 2, 5, 64)]


@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,H,KH,T,d", SHAPES)
def test_triton_rope_matches_fp64_forward_and_grads_on_transposed_q_and_k(B, H, KH, T, d, dtype, tol):
    cos, sin = rope_tables(d, T + 4, theta=10000.0)
    q, k, dq, dk = projections(B, H, KH, T, d, dtype, seed=d)
    assert not q.is_contiguous()  # (k with one head is contiguous whatever its strides)
    q_out, k_out = triton_rope(q, k, cos, sin)
    gq, gk = torch.autograd.grad((q_out, k_out), (q, k), (dq, dk))
    qr, kr = (t.detach().double().requires_grad_() for t in (q, k))
    q_ref, k_ref = reference_rope_fp64(qr, cos, sin), reference_rope_fp64(kr, cos, sin)
    gq_ref, gk_ref = torch.autograd.grad((q_ref, k_ref), (qr, kr), (dq.double(), dk.double()))
    for out, ref in ((q_out, q_ref), (k_out, k_ref), (gq, gq_ref), (gk, gk_ref)):
        assert out.dtype == dtype and out.shape == ref.shape
        assert (out.double() - ref).abs().max() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
def test_triton_rope_equals_the_model_apply_rope_forward_and_backward(dtype):
    # Same convention and the same fp32 arithmetic with one rounding at the end: in fp32 the values are
    # identical, not merely close. In bf16 the interpreter rounds fp32 -> bf16 by truncation where
    # PyTorch (and the GPU) round to nearest, so there the two may differ by one bf16 ulp.
    B, H, KH, T, d = 2, 3, 1, 9, 32
    cos, sin = rope_tables(d, 16, theta=500000.0)
    q, k, dq, dk = projections(B, H, KH, T, d, dtype, seed=5)
    q_out, k_out = triton_rope(q, k, cos, sin)
    gq, gk = torch.autograd.grad((q_out, k_out), (q, k), (dq, dk))
    q_model, k_model = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    gq_model, gk_model = torch.autograd.grad((q_model, k_model), (q, k), (dq, dk))
    for ours, model in ((q_out, q_model), (k_out, k_model), (gq, gq_model), (gk, gk_model)):
        assert ours.dtype == model.dtype and ours.shape == model.shape
        if dtype == torch.float32:
            assert torch.equal(ours, model)
        else:
            one_ulp = model.float().abs() * 2.0 ** -7  # a bf16 ulp is 2^-8..2^-7 of the value
            assert ((ours.float() - model.float()).abs() <= one_ulp).all()


def test_triton_rope_gradient_flows_when_only_q_is_used():
    cos, sin = rope_tables(16, 8, theta=10000.0)
    q, k, dq, _ = projections(1, 2, 1, 8, 16, torch.float32, seed=7)
    q_out, _ = triton_rope(q, k, cos, sin)
    (gq,) = torch.autograd.grad(q_out, q, dq)
    qr = q.detach().double().requires_grad_()
    (gq_ref,) = torch.autograd.grad(reference_rope_fp64(qr, cos, sin), qr, dq.double())
    assert (gq.double() - gq_ref).abs().max() <= 1e-4


@pytest.mark.parametrize("bad,match", [
    (dict(d=15), "head dim must be even"),
    (dict(T_table=4), "cos/sin tables must be"),
    (dict(KT=5), "same B, T and d"),
], ids=["odd-d", "short-table", "k-length"])
def test_triton_rope_refuses_inconsistent_shapes(bad, match):
    d, T = bad.get("d", 8), 6
    cos, sin = torch.zeros(bad.get("T_table", T), d // 2), torch.zeros(bad.get("T_table", T), d // 2)
    q, k = torch.zeros(1, 2, T, d), torch.zeros(1, 1, bad.get("KT", T), d)
    with pytest.raises(ValueError, match=match):
        triton_rope(q, k, cos, sin)
