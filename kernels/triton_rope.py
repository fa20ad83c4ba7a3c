"""Triton rotary position embedding for q and k in one launch, forward + backward (fp32 arithmetic).

Shape legend: B batch, H query heads, K key/value heads, T sequence, d head dim, f = d/2 rotation
pairs (the model's cos/sin tables are [T_max, f]).

Convention: exactly `training.model.apply_rope` — interleaved pairs (x[2i], x[2i+1]) rotated by the
angle t * inv_freq[i] at position t = 0..T-1, math in fp32, one rounding to the storage dtype. The
backward is the same rotation by the negated angle (a rotation's transpose is its inverse), so no
activation is saved, only the tables. Outputs are new contiguous [B, H, T, d] tensors, like the model's.
Liger-Kernel's RoPE pairs x[i] with x[i + d/2], a different convention, so it cannot stand in (see README).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_attention import INTERPRET


@triton.jit
def _rotate_heads(X, Y, x_base, y_base, stride_xh, stride_yh, n_heads, cos_1f, sin_1f, offs_f, mask_f,
                  BLOCK_H: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < n_heads)[:, None] & mask_f[None, :]
    x_ptr = X + x_base + offs_h[:, None] * stride_xh + 2 * offs_f[None, :]
    y_ptr = Y + y_base + offs_h[:, None] * stride_yh + 2 * offs_f[None, :]
    # Even and odd lanes as two strided loads: both hit the same cache lines, and no shuffle is needed.
    x0 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + 1, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr, (x0 * cos_1f - x1 * sin_1f).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + 1, (x0 * sin_1f + x1 * cos_1f).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope(Q, K, QO, KO, COS, SIN,
          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
          stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot, stride_cos, stride_sin,
          T, H, KH, HALF,
          BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, BACKWARD: tl.constexpr):
    """One program per (b, t): loads that position's cos/sin once and rotates every q and k head."""
    pid = tl.program_id(0)
    # 64-bit offsets: b * stride_qb overflows int32 for large activations.
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < HALF
    cos_1f = tl.load(COS + t * stride_cos + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
    sin_1f = tl.load(SIN + t * stride_sin + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        sin_1f = -sin_1f
    _rotate_heads(Q, QO, b * stride_qb + t * stride_qt, b * stride_qob + t * stride_qot, stride_qh, stride_qoh,
                  H, cos_1f, sin_1f, offs_f, mask_f, BLOCK_H)
    _rotate_heads(K, KO, b * stride_kb + t * stride_kt, b * stride_kob + t * stride_kot, stride_kh, stride_koh,
                  KH, cos_1f, sin_1f, offs_f, mask_f, BLOCK_K)


def launch_config(H: int, KH: int, d: int) -> dict:
    """Tile sizes and warps for one (b, t) program; shared with the sm_90 compile check."""
    block_h, block_k, block_f = (triton.next_power_of_2(n) for n in (H, KH, d // 2))
    # q and k heads are rotated one after the other: size warps for the larger, ~16 fp32 values per
    # thread for each of x0/x1 (num_warps must be a power of two).
    elements = 2 * max(block_h, block_k) * block_f
    warps = 1 if INTERPRET else min(16, triton.next_power_of_2(triton.cdiv(elements, 32 * 16)))
    return dict(BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_F=block_f, num_warps=warps)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q_BHTd, k_BKTd, cos_Tf, sin_Tf, backward: bool):
    B, H, T, d = q_BHTd.shape
    KH = k_BKTd.shape[1]
    q_out = torch.empty(B, H, T, d, dtype=q_BHTd.dtype, device=q_BHTd.device)
    k_out = torch.empty(B, KH, T, d, dtype=k_BKTd.dtype, device=k_BKTd.device)
    if B * T == 0:
        return q_out, k_out
    q, k = _unit_last_stride(q_BHTd), _unit_last_stride(k_BKTd)
    _rope[(B * T,)](q, k, q_out, k_out, cos_Tf, sin_Tf,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    q_out.stride(0), q_out.stride(1), q_out.stride(2),
                    k_out.stride(0), k_out.stride(1), k_out.stride(2), cos_Tf.stride(0), sin_Tf.stride(0),
                    T, H, KH, d // 2, BACKWARD=backward, **launch_config(H, KH, d))
    return q_out, k_out


class TritonRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHTd, k_BKTd, cos_Tf, sin_Tf):
        B, H, T, d = q_BHTd.shape
        if k_BKTd.dim() != 4 or k_BKTd.shape[0] != B or k_BKTd.shape[2:] != (T, d):
            raise ValueError(f"q {tuple(q_BHTd.shape)} and k {tuple(k_BKTd.shape)} must be [B, heads, T, d] "
                             "with the same B, T and d")
        if d % 2:
            raise ValueError(f"RoPE rotates pairs: head dim must be even, got {d}")
        if cos_Tf.shape != sin_Tf.shape or cos_Tf.shape[-1] != d // 2 or cos_Tf.shape[0] < T:
            raise ValueError(f"cos/sin tables must be [>= {T}, {d // 2}], got {tuple(cos_Tf.shape)} "
                             f"and {tuple(sin_Tf.shape)}")
        cos_Tf, sin_Tf = _unit_last_stride(cos_Tf), _unit_last_stride(sin_Tf)
        ctx.save_for_backward(cos_Tf, sin_Tf)
        return _launch(q_BHTd, k_BKTd, cos_Tf, sin_Tf, backward=False)

    @staticmethod
    def backward(ctx, dq_BHTd, dk_BKTd):
        cos_Tf, sin_Tf = ctx.saved_tensors
        dq, dk = _launch(dq_BHTd, dk_BKTd, cos_Tf, sin_Tf, backward=True)
        return dq, dk, None, None


def triton_rope(q_BHTd: torch.Tensor, k_BKTd: torch.Tensor, cos_Tf: torch.Tensor,
                sin_Tf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(apply_rope(q, cos, sin), apply_rope(k, cos, sin))` of training.model, in one kernel launch.

    q/k may be any strided [B, heads, T, d] view (e.g. the model's transposed projections); the
    tables are the model's `rope_cos`/`rope_sin` buffers and no gradient flows into them.
    """
    return TritonRoPE.apply(q_BHTd, k_BKTd, cos_Tf, sin_Tf)


def compile_cases():
    """Cases for triton_compile_check: Llama-like head layouts (MHA, GQA), bf16 and fp32."""
    from .triton_compile_check import Case
    cases = []
    for (H, KH, d), dtype in (((32, 8, 128), "bfloat16"), ((64, 8, 128), "bfloat16"), ((16, 16, 64), "bfloat16"),
                              ((32, 8, 128), "float32")):
        blocks = launch_config(H, KH, d)
        cfg = dict(num_warps=blocks.pop("num_warps"), num_stages=1)
        for backward in (False, True):
            cases.append(Case("_rope", cfg, dict(blocks, BACKWARD=backward), dtype,
                              pointers=dict(COS="fp32", SIN="fp32"), ints=("T", "H", "KH", "HALF")))
    return cases
