"""The Triton FlashAttention-2 kernels against an fp64 reference, run by the Triton interpreter.

Shapes are tiny (the interpreter runs ~1 s per forward+backward here) but span several 16-wide
tiles with lengths that are not multiples of the tile, which is where masking bugs live.
"""
import pytest
import torch

from keel.kernels.attention import attention
from keel.kernels.triton_attention import triton_attention


TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# bf16 has 8 mantissa bits: at |x| in [2, 4) one ulp is 1.6e-2, so a 2e-2 bound on gradients only
# measures the kernel when values are O(1). Scaling the upstream gradient keeps them there.
GRAD_OUT_SCALE = 0.3


def reference_attention(q_BHTd, k_BKTd, v_BKTd, causal, doc_ids_BT=None):
    """Plain fp64 softmax(QK^T/sqrt(d))V with K/V heads repeated and an explicit boolean mask."""
    q, k, v = (x.double() for x in (q_BHTd, k_BKTd, v_BKTd))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if doc_ids_BT is not None:  # test ids are contiguous runs, so equal id == same document
        allowed = allowed & (doc_ids_BT[:, None, :, None] == doc_ids_BT[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def make_qkv(B, H, KH, T, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, d, generator=gen).to(dtype).requires_grad_() for h in (H, KH, KH)]


def max_errors(fn, q, k, v, causal, doc_ids_BT=None):
    """Max abs error of output and of dq, dk, dv against the fp64 reference."""
    out = fn(q, k, v)
    grad_out = GRAD_OUT_SCALE * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out = reference_attention(*ref_inputs, causal, doc_ids_BT)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double())
    errors = {"out": (out.double() - ref_out).abs().max().item()}
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == q.dtype
        errors[name] = (g.double() - rg).abs().max().item()
    return errors


def assert_close(errors, dtype):
    assert max(errors.values()) <= TOL[dtype], f"errors {errors} exceed {TOL[dtype]} for {dtype}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_attention_matches_fp32_reference_forward_and_grads(causal, heads, dtype):
    H, KH = heads
    q, k, v = make_qkv(2, H, KH, 37, 32, dtype)
    errors = max_errors(lambda *x: triton_attention(*x, causal=causal), q, k, v, causal)
    assert_close(errors, dtype)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 50])
def test_triton_attention_handles_lengths_not_multiple_of_tile(T):
    q, k, v = make_qkv(1, 2, 1, T, 16, torch.float32, seed=T)
    assert_close(max_errors(lambda *x: triton_attention(*x, causal=True), q, k, v, True), torch.float32)


@pytest.mark.parametrize("d", [64, 128])
def test_triton_attention_matches_reference_at_model_head_dims(d):
    q, k, v = make_qkv(1, 2, 1, 24, d, torch.bfloat16, seed=d)
    assert_close(max_errors(lambda *x: triton_attention(*x, causal=True), q, k, v, True), torch.bfloat16)


def test_triton_attention_pads_head_dim_that_is_not_a_power_of_two():
    q, k, v = make_qkv(1, 2, 2, 20, 24, torch.float32)
    assert_close(max_errors(lambda *x: triton_attention(*x, causal=False), q, k, v, False), torch.float32)


# Documents of length 1, lengths that straddle 16-wide tiles, and a row that is one document.
PACKED_DOCS = torch.tensor([[0] * 5 + [1] * 1 + [2] * 19 + [3] * 12,
                            [7] * 37])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_attention_packed_documents_match_reference(causal, dtype):
    q, k, v = make_qkv(2, 4, 2, 37, 32, dtype)
    errors = max_errors(lambda *x: triton_attention(*x, causal=causal, doc_ids_BT=PACKED_DOCS),
                        q, k, v, causal, PACKED_DOCS)
    assert_close(errors, dtype)


def test_packed_documents_do_not_attend_across_documents():
    """Changing every token of document 0 leaves outputs, and key gradients, of document 2 unchanged."""
    q, k, v = make_qkv(1, 2, 1, 37, 16, torch.float32)
    docs = PACKED_DOCS[:1]
    out = triton_attention(q, k, v, causal=False, doc_ids_BT=docs)
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, :5] += 3.0
    out2 = triton_attention(q2, k2, v2, causal=False, doc_ids_BT=docs)
    doc2 = slice(6, 25)
    assert torch.equal(out[:, :, doc2], out2[:, :, doc2])
    assert not torch.allclose(out[:, :, :5], out2[:, :, :5])


def test_cu_seqlens_and_doc_ids_give_the_same_result_through_dispatch():
    q, k, v = make_qkv(2, 4, 2, 37, 16, torch.float32)
    # Flattened boundaries over B*T = 74 tokens; row 1 starts a new document at token 37.
    cu_seqlens = torch.tensor([0, 5, 6, 25, 37, 74], dtype=torch.int32)
    via_cu = attention(q, k, v, causal=True, impl="triton", cu_seqlens=cu_seqlens)
    via_ids = attention(q, k, v, causal=True, impl="triton", doc_ids_BT=PACKED_DOCS)
    via_sdpa = attention(q, k, v, causal=True, impl="sdpa", cu_seqlens=cu_seqlens)
    ref = reference_attention(q, k, v, True, PACKED_DOCS)
    assert torch.equal(via_cu, via_ids)
    assert (via_cu.double() - ref).abs().max() <= 1e-4
    assert (via_sdpa.double() - ref).abs().max() <= 1e-4


def test_triton_attention_accepts_inputs_transposed_from_BTHd():
    """Models project to [B, T, H, d] and transpose; the kernel must honour those strides."""
    gen = torch.Generator().manual_seed(3)
    q_BTHd, k_BTKd, v_BTKd = (torch.randn(1, 21, h, 16, generator=gen) for h in (4, 2, 2))
    q, k, v = (x.transpose(1, 2) for x in (q_BTHd, k_BTKd, v_BTKd))
    assert not q.is_contiguous()
    out = triton_attention(q, k, v, causal=True)
    assert (out.double() - reference_attention(q, k, v, True)).abs().max() <= 1e-4


def test_triton_attention_trains_a_tiny_attention_layer():
    """Gradients flow to parameters upstream of q/k/v and a step lowers the loss."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 3 * 16)
    x_BTD = torch.randn(2, 19, 16)
    target = torch.randn(2, 2, 19, 8)

    def loss_fn():
        q, k, v = proj(x_BTD).view(2, 19, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return ((triton_attention(q, k, v, causal=True) - target) ** 2).mean()

    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    before = loss_fn()
    before.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    opt.step()
    assert loss_fn().item() < before.item()
