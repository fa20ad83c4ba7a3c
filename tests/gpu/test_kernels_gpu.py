"""Every Triton and CUDA kernel, forward and backward, on the GPU in fp32 and bf16 against an fp64 reference
(fp32 for RoPE, whose model math is fp32) on fresh random inputs, with outputs poisoned so that an element a
kernel never writes fails the test. Shapes cover GQA, packed documents, ragged lengths and head dims 64 and
128; in a dry run (KEEL_GPU_DRY_RUN=1, no GPU) the same tests run at toy sizes through the interpreter.

Tolerance: max abs error <= tol * max(1, the reference's largest magnitude). fp32 1e-4 (attention 2e-4:
softmax sums over up to 2k keys, and the online softmax rescales its running sum once per key tile); bf16
3e-2, a few bf16 ulps at 1, with upstream gradients scaled to keep values O(1). A missing mask, a wrong tile
edge or an unwritten block gives errors of O(1).
"""
import math

import pytest
import torch

from keel.kernels.attention import attention
from keel.kernels.cross_entropy import IGNORE_INDEX, fused_linear_cross_entropy
from keel.kernels.ops import apply_rope
from keel.kernels.triton_attention import triton_attention
from keel.kernels.triton_ops import triton_rms_norm, triton_swiglu
from keel.kernels.triton_rope import triton_rope
from keel.training.model import rope_tables

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
ATTENTION_TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}
GRAD_OUT_SCALE = 0.3

# (name, B, H, K, T, d, causal, document lengths per row or None): on a GPU, then the dry run's toy sizes.
# Each GPU case with new compile-time constants (d, causal, documents) autotunes 14 bf16 tile configs per
# kernel, about 40 compiles: four cases keep the stage within its time box.
ATTENTION = {
    "cuda": [("gqa-causal-d128", 2, 8, 2, 1024, 128, True, None),
             ("mha-ragged-d64", 2, 8, 8, 1000, 64, True, None),
             ("gqa-full-ragged-d128", 1, 8, 2, 777, 128, False, None),
             ("packed-docs-d128", 2, 8, 2, 2048, 128, True, [[300, 1000, 748], [1, 2046, 1]])],
    "cpu": [("gqa-causal-d32", 1, 4, 2, 40, 32, True, None),
            ("mha-ragged-d16", 1, 2, 2, 33, 16, True, None),
            ("gqa-full-ragged-d64", 1, 2, 1, 21, 64, False, None),
            ("packed-docs-d32", 2, 2, 1, 48, 32, True, [[10, 30, 8], [1, 46, 1]])],
}
# Packed documents as flash-attn style cu_seqlens over the flattened B*T stream, for the dispatcher's
# `attention(..., cu_seqlens=...)`: the packed case's shape (so no new autotune key), with one document running
# across the row boundary (rows are independent, so it is two documents).
CU_SEQLENS = {"cuda": ("packed-cu-seqlens-d128", 2, 8, 2, 2048, 128, [300, 1000, 1000, 1747, 49]),
              "cpu": ("packed-cu-seqlens-d32", 2, 2, 1, 48, 32, [10, 30, 20, 27, 9])}
# RMSNorm (rows, D), SwiGLU (rows, F), RoPE (B, H, K, T, d), cross-entropy (N, D, V).
RMSNORM = {"cuda": [(4096, 4096), (4096, 2048), (1000, 5120)], "cpu": [(24, 64), (7, 100)]}
SWIGLU = {"cuda": [(4096, 8192), (1000, 5000)], "cpu": [(24, 64), (7, 50)]}
ROPE = {"cuda": [(2, 32, 8, 1024, 128), (1, 16, 4, 1000, 64)], "cpu": [(1, 4, 2, 12, 32), (1, 2, 1, 7, 16)]}
CROSS_ENTROPY = {"cuda": [(4096, 2048, 32000), (1000, 1024, 50257)], "cpu": [(24, 32, 100)]}
# Large enough that the z-loss term scales the gradients by 1 + 2 * Z_LOSS * logsumexp (1.1-1.2 here), so a wrong
# z-loss gradient shows in fp32; at 1e-4 a doubled term sat at the edge of the tolerance.
Z_LOSS = 1e-2


def randn(gen, shape, device, dtype, scale=1.0):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype)


def check(name, what, got, ref, dtype, tols=TOL):
    """got (any dtype) against ref (fp64/fp32): finite everywhere, and within the tolerance."""
    assert got.shape == ref.shape, f"{name} {what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bad = (~torch.isfinite(got)).sum().item()
    assert bad == 0, f"{name} {what} {dtype}: {bad} of {got.numel()} elements non-finite (unwritten output?)"
    err = (got.double() - ref.double()).abs().max().item()
    tol = tols[dtype] * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{name} {what} {dtype}: max error {err:.3e} > {tol:.3e}"


def attention_name(kernel, case):
    label, B, H, K, T, d, causal, lengths = case
    docs = f" docs={lengths}" if lengths else ""
    return f"{kernel} attention {label} B={B} H={H} K={K} T={T} d={d} causal={causal}{docs}"


def doc_ids(lengths, T, device):
    rows = [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    assert all(len(r) == T for r in rows)
    return torch.stack(rows).to(device=device, dtype=torch.int32)


def reference_attention(q, k, v, causal, ids):
    """fp64 softmax(QK^T/sqrt(d))V with K/V heads repeated and an explicit mask."""
    q, k, v = (x.double() for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    allowed = (allowed.tril() if causal else allowed)[None, None]
    if ids is not None:
        allowed = allowed & (ids[:, None, :, None] == ids[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(4))
def test_triton_attention_forward_and_backward(device, poison, case, dtype):
    if case >= len(ATTENTION[device]):
        pytest.skip("fewer cases")
    name = attention_name("triton", ATTENTION[device][case])
    _, B, H, K, T, d, causal, lengths = ATTENTION[device][case]
    gen = torch.Generator().manual_seed(100 + case)
    q, k, v = (randn(gen, (B, h, T, d), device, dtype).requires_grad_() for h in (H, K, K))
    dout = randn(gen, (B, H, T, d), device, dtype, GRAD_OUT_SCALE)
    ids = doc_ids(lengths, T, device) if lengths else None

    def run():
        out = triton_attention(q, k, v, causal=causal, doc_ids_BT=ids)
        return out, torch.autograd.grad(out, (q, k, v), dout)

    check_attention(name, device, poison, dtype, run, (q, k, v), dout, causal, ids)


def check_attention(name, device, poison, dtype, run, qkv, dout, causal, ids):
    if device == "cuda":
        # The first call for a new autotune key benchmarks every tile config on the real arguments, output
        # buffers included: the config finally picked would find its unwritten elements written by the others,
        # and the poison would show nothing. Tune first, then run poisoned.
        run()
    with poison():
        out, grads = run()
    refs = [x.detach().double().requires_grad_() for x in qkv]
    ref = reference_attention(*refs, causal, ids)
    ref_grads = torch.autograd.grad(ref, refs, dout.double())
    check(name, "out", out, ref, dtype, ATTENTION_TOL)
    for what, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        check(name, what, g, rg, dtype, ATTENTION_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_dispatch_with_cu_seqlens_runs_triton_on_packed_documents(device, poison, dtype):
    label, B, H, K, T, d, lengths = CU_SEQLENS[device]
    gen = torch.Generator().manual_seed(150)
    q, k, v = (randn(gen, (B, h, T, d), device, dtype).requires_grad_() for h in (H, K, K))
    dout = randn(gen, (B, H, T, d), device, dtype, GRAD_OUT_SCALE)
    cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    # The reference's ids from the lengths directly, not through the dispatcher's conversion.
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(B, T).to(device)

    def run():
        out = attention(q, k, v, causal=True, impl="triton", cu_seqlens=cu_seqlens)
        return out, torch.autograd.grad(out, (q, k, v), dout)

    name = attention_name("triton (cu_seqlens)", (label, B, H, K, T, d, True, lengths))
    check_attention(name, device, poison, dtype, run, (q, k, v), dout, True, ids)


def reference_rms_norm(x, w, eps):
    x, w = x.double(), w.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def check_rms_norm(kernel, impl, device, poison, dtype):
    for i, (R, D) in enumerate(RMSNORM[device]):
        gen = torch.Generator().manual_seed(300 + i)
        x = randn(gen, (R, D), device, dtype).requires_grad_()
        w = (1 + randn(gen, (D,), device, dtype, 0.1)).requires_grad_()
        dy = randn(gen, (R, D), device, dtype, GRAD_OUT_SCALE)
        with poison():
            y = kernel(x, w, 1e-5)
            dx, dw = torch.autograd.grad(y, (x, w), dy)
        xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = reference_rms_norm(xr, wr, 1e-5)
        rdx, rdw = torch.autograd.grad(ref, (xr, wr), dy.double())
        name = f"{impl} rmsnorm R={R} D={D}"
        check(name, "out", y, ref, dtype)
        check(name, "dx", dx, rdx, dtype)
        # dw sums R rows: its bf16 rounding is of a large number; compare relative to its own scale.
        check(name, "dw", dw, rdw, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_rms_norm_forward_and_backward(device, poison, dtype):
    check_rms_norm(triton_rms_norm, "triton", device, poison, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_swiglu_forward_and_backward_including_halves_of_a_fused_projection(device, poison, dtype):
    for i, (R, F) in enumerate(SWIGLU[device]):
        gen = torch.Generator().manual_seed(400 + i)
        # The model's layout: gate and up are the two column halves of one w13 output, strided views.
        w13 = randn(gen, (R, 2 * F), device, dtype).requires_grad_()
        gate, up = w13.chunk(2, dim=-1)
        dy = randn(gen, (R, F), device, dtype, GRAD_OUT_SCALE)
        with poison():
            y = triton_swiglu(gate, up)
            (dw13,) = torch.autograd.grad(y, (w13,), dy)
        ref_in = w13.detach().double().requires_grad_()
        g, u = ref_in.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(g) * u
        (rdw13,) = torch.autograd.grad(ref, (ref_in,), dy.double())
        check(f"swiglu R={R} F={F}", "out", y, ref, dtype)
        check(f"swiglu R={R} F={F}", "dgate|dup", dw13, rdw13, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_rope_forward_and_backward(device, poison, dtype):
    for i, (B, H, K, T, d) in enumerate(ROPE[device]):
        gen = torch.Generator().manual_seed(500 + i)
        # Projections come as [B, T, heads, d] and are seen as [B, heads, T, d]: strided, as in the model.
        q, k = (randn(gen, (B, T, h, d), device, dtype).transpose(1, 2).requires_grad_() for h in (H, K))
        cos, sin = rope_tables(d, T, 500000.0, device=device)
        dq_out, dk_out = (randn(gen, (B, h, T, d), device, dtype, GRAD_OUT_SCALE) for h in (H, K))
        with poison():
            qo, ko = triton_rope(q, k, cos, sin)
            dq, dk = torch.autograd.grad((qo, ko), (q, k), (dq_out, dk_out))
        # The reference is the model's own fp32 rotation (training.model's), on fp32 copies.
        qr, kr = (x.detach().float().requires_grad_() for x in (q, k))
        rq, rk = apply_rope(qr, cos, sin), apply_rope(kr, cos, sin)
        rdq, rdk = torch.autograd.grad((rq, rk), (qr, kr), (dq_out.float(), dk_out.float()))
        name = f"rope B={B} H={H} K={K} T={T} d={d}"
        for what, got, ref in (("q", qo, rq), ("k", ko, rk), ("dq", dq, rdq), ("dk", dk, rdk)):
            check(name, what, got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_fused_linear_cross_entropy_forward_and_backward(device, poison, impl, dtype):
    for i, (N, D, V) in enumerate(CROSS_ENTROPY[device]):
        gen = torch.Generator().manual_seed(600 + i)
        hidden = randn(gen, (N, D), device, dtype).requires_grad_()
        weight = randn(gen, (V, D), device, dtype, 1 / math.sqrt(D)).requires_grad_()
        targets = torch.randint(0, V, (N,), generator=gen)
        targets[::7] = IGNORE_INDEX  # padding, as packed documents leave it
        targets = targets.to(device)
        with poison():
            loss, ce = fused_linear_cross_entropy(hidden, weight, targets, z_loss=Z_LOSS, impl=impl,
                                                  chunk_size=max(16, N // 3))
            dh, dw = torch.autograd.grad(loss, (hidden, weight))
        hr, wr = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        logits = hr @ wr.t()
        keep = targets != IGNORE_INDEX
        ref_ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
        ref = ref_ce + Z_LOSS * logits[keep].logsumexp(-1).square().mean()
        rdh, rdw = torch.autograd.grad(ref, (hr, wr))
        name = f"{impl} cross-entropy N={N} D={D} V={V}"
        check(name, "loss", loss.reshape(1), ref.reshape(1), dtype)
        check(name, "ce", ce.reshape(1), ref_ce.detach().reshape(1), dtype)
        # Gradients of a mean over N tokens are O(1/N): compare them at the scale of one token's.
        scale = keep.sum().item()
        check(name, "dhidden", dh * scale, rdh * scale, dtype)
        check(name, "dweight", dw * scale, rdw * scale, dtype)
