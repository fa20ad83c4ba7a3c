"""`attention(impl=...)` picks a backend that can run, and config validation names problem and fix."""
import pytest
import torch

from keel.kernels.attention import attention, check_attention_impl, resolve_impl


def test_auto_picks_sdpa_on_cpu_even_when_the_triton_interpreter_is_on():
    # conftest sets TRITON_INTERPRET=1; the interpreter must still never be chosen automatically.
    for doc_masking in (False, True):
        assert resolve_impl("auto", 64, torch.bfloat16, "cpu", doc_masking=doc_masking) == "sdpa"


def test_default_attention_call_is_backward_compatible_and_matches_sdpa():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 8, generator=gen) for h in (4, 2, 2))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(attention(q, k, v), expected)
    assert torch.equal(attention(q, k, v, causal=True, impl="sdpa"), expected)


def test_sdpa_fallback_masks_packed_documents():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    packed = attention(q, k, v, causal=True, impl="sdpa", doc_ids_BT=docs)
    separate = torch.cat([attention(q[:, :, s], k[:, :, s], v[:, :, s], impl="sdpa")
                          for s in (slice(0, 3), slice(3, 6))], dim=2)
    assert torch.allclose(packed, separate, atol=1e-6)


def test_unknown_impl_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="choose one of auto, sdpa, triton, cuda, flash_attn"):
        check_attention_impl("xformers", 64, torch.bfloat16, "cuda")


def test_triton_on_cpu_without_interpreter_is_rejected_with_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device.*'sdpa'"):
        check_attention_impl("triton", 64, torch.bfloat16, "cpu")


def test_triton_rejects_head_dim_above_what_was_compile_checked():
    with pytest.raises(ValueError, match="head_dim <= 128, got 256"):
        check_attention_impl("triton", 256, torch.bfloat16, "cuda")


def test_cuda_impl_refuses_training_because_it_has_no_backward():
    with pytest.raises(ValueError, match="forward-only"):
        check_attention_impl("cuda", 64, torch.bfloat16, "cuda", requires_grad=True)


def test_cuda_impl_rejects_unsupported_head_dim():
    with pytest.raises(ValueError, match=r"head_dim in \(32, 64, 128\), got 80"):
        check_attention_impl("cuda", 80, torch.bfloat16, "cuda", requires_grad=False)


def test_flash_attn_rejects_float32_or_missing_package():
    with pytest.raises(ValueError, match="flash-attn package|bfloat16/float16"):
        check_attention_impl("flash_attn", 64, torch.float32, "cuda")


def test_non_float_dtype_is_rejected():
    with pytest.raises(ValueError, match="int8 is not supported"):
        check_attention_impl("sdpa", 64, torch.int8, "cpu")
