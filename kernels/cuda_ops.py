"""Python face of the CUDA C++ kernels in csrc/: attention forward and RMSNorm forward+backward.

Shape legend: B batch, H query heads, K key/value heads, T sequence, d head dim, D hidden size.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load_cuda_ops():
    """The compiled binding: the AOT build (KEEL_BUILD_CUDA=1) if installed, else a JIT build."""
    try:
        from . import _cuda_ops
        return _cuda_ops
    except ImportError:
        from .cuda_build import jit_load
        return jit_load()


def _stream(t: torch.Tensor) -> int:
    # CPU tensors get 0 and are refused by the binding with a clear message.
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def cuda_attention_fwd(q_BHTd: torch.Tensor, k_BKTd: torch.Tensor, v_BKTd: torch.Tensor, *, causal: bool = True,
                       scale: float | None = None, doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Forward only: refuses inputs that need gradients rather than silently detaching them."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q_BHTd, k_BKTd, v_BKTd)):
        raise RuntimeError("the CUDA attention kernel is forward-only; run it under torch.no_grad() "
                           "or use attention impl 'triton'/'flash_attn'/'sdpa' for training")
    scale = q_BHTd.shape[-1] ** -0.5 if scale is None else scale
    o_BHTd, _lse_BHT = load_cuda_ops().attention_fwd(q_BHTd, k_BKTd, v_BKTd, doc_ids_BT, causal, scale,
                                                     _stream(q_BHTd))
    return o_BHTd


class CudaRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_D, eps):
        y_TD, rstd_T = load_cuda_ops().rmsnorm_fwd(x_TD, weight_D, eps, _stream(x_TD))
        ctx.save_for_backward(x_TD, weight_D, rstd_T)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, weight_D, rstd_T = ctx.saved_tensors
        # A few dw partial rows per SM keep the column reduction short and every SM busy.
        n_sm = torch.cuda.get_device_properties(x_TD.device).multi_processor_count if x_TD.is_cuda else 1
        dx_TD, dw_D = load_cuda_ops().rmsnorm_bwd(dy_TD, x_TD, weight_D, rstd_T, 4 * n_sm, _stream(x_TD))
        return dx_TD, dw_D, None


def cuda_rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return CudaRMSNorm.apply(x_TD, weight_D, eps)
