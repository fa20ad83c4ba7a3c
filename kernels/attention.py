"""The one attention function the model calls; fused kernels plug in here.

Shape legend: B batch, H query heads, K key/value heads (K divides H), T sequence, d head dim,
N number of documents in a packed batch.

Backends (`impl`):
  sdpa        torch.nn.functional.scaled_dot_product_attention; everywhere, the CPU path.
  triton      keel's FlashAttention-2 kernels (kernels/triton_attention.py); forward + backward.
  cuda        keel's CUDA C++ forward (kernels/csrc/attention_fwd.cu); inference only, no backward.
  flash_attn  the flash-attn package (Dao-AILab), if installed.
  auto        flash_attn if usable, else triton for packed documents, else sdpa; sdpa on CPU.

Packed documents: pass `doc_ids_BT` (per-token ids; a document is a maximal run of equal ids in a
row) or `cu_seqlens` (flash-attn style boundaries over the flattened B*T token stream). Tokens never
attend across documents.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .available import has_module, interpreting

IMPLS = ("auto", "sdpa", "triton", "cuda", "flash_attn")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The Triton kernels are compile-checked for sm_90 at these head dims and below (see tests/kernels).
TRITON_MAX_HEAD_DIM = 128
CUDA_HEAD_DIMS = (32, 64, 128)




def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_attention_impl(impl: str, head_dim: int, dtype: torch.dtype, device_type: str, *,
                         requires_grad: bool = True, doc_masking: bool = False) -> None:
    """Raise ValueError, naming the problem and the fix, if `impl` cannot run this configuration.

    Meant for config validation, before any work starts; `requires_grad=False` for inference-only use.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"attention dtype {_dtype_name(dtype)} is not supported; use float32, bfloat16 or float16")
    if impl in ("auto", "sdpa"):
        return
    if impl == "triton":
        if not has_module("triton"):
            raise ValueError("attention impl 'triton' needs the triton package: pip install triton==3.9.0, "
                             "or set attention impl to 'sdpa'")
        if device_type != "cuda" and not interpreting():
            raise ValueError(f"attention impl 'triton' needs a CUDA device, got {device_type!r}; use impl "
                             "'sdpa' or 'auto' on CPU (TRITON_INTERPRET=1 runs it on CPU, slowly, for debugging)")
        if head_dim > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"attention impl 'triton' supports head_dim <= {TRITON_MAX_HEAD_DIM}, got {head_dim}; "
                             "reduce head_dim (e.g. more heads) or use impl 'sdpa'/'flash_attn'")
        return
    if impl == "cuda":
        if requires_grad:
            raise ValueError("attention impl 'cuda' is forward-only (no backward kernel); use 'triton', "
                             "'flash_attn' or 'sdpa' for training, 'cuda' only for inference/eval")
        if device_type != "cuda":
            raise ValueError(f"attention impl 'cuda' needs a CUDA device, got {device_type!r}; use 'sdpa'")
        if head_dim not in CUDA_HEAD_DIMS:
            raise ValueError(f"attention impl 'cuda' is compiled for head_dim in {CUDA_HEAD_DIMS}, got {head_dim}; "
                             "use 'triton' or 'sdpa'")
        from .cuda_build import cuda_ops_buildable
        ok, why = cuda_ops_buildable()
        if not ok:
            raise ValueError(f"attention impl 'cuda' cannot be built: {why}")
        return
    if impl == "flash_attn":
        if not has_module("flash_attn"):
            raise ValueError("attention impl 'flash_attn' needs the flash-attn package (pip install flash-attn "
                             "--no-build-isolation, CUDA only); or use 'triton'/'sdpa'")
        if device_type != "cuda":
            raise ValueError(f"attention impl 'flash_attn' needs a CUDA device, got {device_type!r}; use 'sdpa'")
        if dtype == torch.float32:
            raise ValueError("attention impl 'flash_attn' supports only bfloat16/float16; set the model dtype "
                             "to bfloat16 or use 'triton'/'sdpa' for float32")
        if head_dim % 8 or head_dim > 256:
            raise ValueError(f"attention impl 'flash_attn' needs head_dim a multiple of 8 and <= 256, got {head_dim}")


def resolve_impl(impl: str, head_dim: int, dtype: torch.dtype, device_type: str, *,
                 requires_grad: bool = True, doc_masking: bool = False) -> str:
    """The concrete backend `impl` means here. The `auto` order is a judgement, not a measurement:
    flash_attn and SDPA's own flash kernels are the tuned defaults; keel's Triton kernel is picked
    for packed documents, where SDPA needs a materialised [T, T] mask. `keel bench` measures it."""
    check_attention_impl(impl, head_dim, dtype, device_type, requires_grad=requires_grad, doc_masking=doc_masking)
    if impl != "auto":
        return impl
    if device_type != "cuda":
        return "sdpa"  # never the Triton interpreter: it is orders of magnitude slower than SDPA on CPU
    for candidate in (("flash_attn", "triton") if doc_masking else ("flash_attn",)):
        try:
            check_attention_impl(candidate, head_dim, dtype, device_type, requires_grad=requires_grad)
            return candidate
        except ValueError:
            continue
    return "sdpa"


def doc_ids_from_cu_seqlens(cu_seqlens_N1: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """flash-attn style boundaries [0, len0, len0+len1, ..., B*T] over the flattened token stream ->
    per-token document ids [B, T]. Rows are independent, so a document never spans two rows."""
    if cu_seqlens_N1.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens_N1.shape)}")
    pos = torch.arange(B * T, device=cu_seqlens_N1.device, dtype=torch.int64)
    ids = torch.searchsorted(cu_seqlens_N1.to(torch.int64).contiguous(), pos, right=True) - 1
    return ids.view(B, T).to(torch.int32)


def _run_ids(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    starts_BT = torch.ones_like(doc_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    return torch.cumsum(starts_BT, dim=1)


def doc_mask(doc_ids_BT: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask, True where a query may attend a key (the SDPA fallback's mask)."""
    run_BT = _run_ids(doc_ids_BT)
    mask_BTT = run_BT[:, :, None] == run_BT[:, None, :]
    if causal:
        T = doc_ids_BT.shape[1]
        mask_BTT = mask_BTT & torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    return mask_BTT[:, None]


def _sdpa(q_BHTd, k_BKTd, v_BKTd, causal, scale, doc_ids_BT):
    # enable_gqa lets SDPA broadcast K/V heads instead of us repeating them in memory.
    gqa = k_BKTd.shape[1] != q_BHTd.shape[1]
    if doc_ids_BT is None:
        return F.scaled_dot_product_attention(q_BHTd, k_BKTd, v_BKTd, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q_BHTd, k_BKTd, v_BKTd, attn_mask=doc_mask(doc_ids_BT, causal),
                                          scale=scale, enable_gqa=gqa)


def _flash_attn(q_BHTd, k_BKTd, v_BKTd, causal, scale, doc_ids_BT):
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    B, H, T, d = q_BHTd.shape
    q_BTHd, k_BTKd, v_BTKd = (x.transpose(1, 2) for x in (q_BHTd, k_BKTd, v_BKTd))
    if doc_ids_BT is None:
        return flash_attn_func(q_BTHd, k_BTKd, v_BTKd, softmax_scale=scale, causal=causal).transpose(1, 2)
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids_BT.device)
    starts[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    cu = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([cu, cu.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())  # one host sync per call; flash-attn's API needs it
    o = flash_attn_varlen_func(q_BTHd.reshape(B * T, H, d), k_BTKd.reshape(B * T, -1, d),
                               v_BTKd.reshape(B * T, -1, d), cu, cu, max_len, max_len,
                               softmax_scale=scale, causal=causal)
    return o.view(B, T, H, d).transpose(1, 2)


def attention(q_BHTd: torch.Tensor, k_BKTd: torch.Tensor, v_BKTd: torch.Tensor, *,
              causal: bool = True, impl: str = "auto", scale: float | None = None,
              doc_ids_BT: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads; returns [B, H, T, d]."""
    B, H, T, d = q_BHTd.shape
    if H % k_BKTd.shape[1]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k_BKTd.shape[1]})")
    if cu_seqlens is not None:
        if doc_ids_BT is not None:
            raise ValueError("pass either doc_ids_BT or cu_seqlens, not both")
        doc_ids_BT = doc_ids_from_cu_seqlens(cu_seqlens, B, T)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_BHTd, k_BKTd, v_BKTd))
    backend = resolve_impl(impl, d, q_BHTd.dtype, q_BHTd.device.type, requires_grad=needs_grad,
                           doc_masking=doc_ids_BT is not None)
    if backend == "sdpa":
        return _sdpa(q_BHTd, k_BKTd, v_BKTd, causal, scale, doc_ids_BT)
    if backend == "triton":
        from .triton_attention import triton_attention
        return triton_attention(q_BHTd, k_BKTd, v_BKTd, causal=causal, sm_scale=scale, doc_ids_BT=doc_ids_BT)
    if backend == "cuda":
        from .cuda_ops import cuda_attention_fwd
        return cuda_attention_fwd(q_BHTd, k_BKTd, v_BKTd, causal=causal, scale=scale, doc_ids_BT=doc_ids_BT)
    return _flash_attn(q_BHTd, k_BKTd, v_BKTd, causal, scale, doc_ids_BT)
