"""Fused attention in Triton (FlashAttention-2): forward, backward and the autograd wrapper.

Shape legend: B batch, H query heads, K key/value heads (K divides H, GROUP = H // K), T sequence,
d head dim, D head dim padded to a power of two (BLOCK_D), M/N query/key tile sizes.

Algorithm: each program owns a tile of queries (forward, dQ) or keys (dK/dV) and streams the other
side through on-chip memory with an online softmax, so the [T, T] score matrix never exists in
memory. The forward saves the base-2 logsumexp per query row; the backward recomputes P from it.
dK/dV and dQ are separate kernels (no atomics), so gradients are deterministic run to run.

Document masking: a "document" is a maximal run of equal ids along T in a row of `doc_ids_BT`
(packed sequences satisfy this by construction). Per token we precompute where its document
starts and ends, which lets each program skip whole tiles that belong to other documents.
"""
from __future__ import annotations

import math
import os
import time

import torch
import triton
import triton.language as tl

# Read once at import: autotune configs are chosen when the kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


def _host_do_bench(kernel_call, quantiles=None, reps: int = 3):
    """Wall-clock benchmark for the interpreter, where triton.testing.do_bench needs a GPU driver."""
    kernel_call()
    times_ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        kernel_call()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    times_ms.sort()
    med = times_ms[len(times_ms) // 2]
    return [med for _ in quantiles] if quantiles else med


def _cfg(block_m, block_n, warps, stages):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


# GPU search spaces (Hopper/Ampere). Every entry is compiled for sm_90 by the test suite, which
# checks the shared-memory footprint, so an entry that cannot fit is caught without a GPU.
# Forward and dQ need BLOCK_M % BLOCK_N == 0: the causal loop splits at the diagonal tile.
GPU_CONFIGS = {
    "fwd": [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3),
            _cfg(128, 32, 4, 4), _cfg(64, 32, 4, 4)],
    "bwd_dkdv": [_cfg(64, 128, 8, 2), _cfg(32, 128, 4, 2), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3)],
    "bwd_dq": [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 3)],
}
# fp32 inputs (IEEE dots) need fp32 tiles, twice the shared memory of bf16: smaller tiles only.
FP32_CONFIG = {"fwd": _cfg(64, 32, 4, 2), "bwd_dkdv": _cfg(32, 64, 4, 2), "bwd_dq": _cfg(64, 32, 4, 2)}
# One small tile when interpreting: autotune cannot benchmark there, and 16-wide tiles make tiny
# test sequences span several tiles, which is where masking bugs live.
INTERPRET_CONFIG = _cfg(16, 16, 4, 1)


def _configs(kind: str):
    raw = [INTERPRET_CONFIG] if INTERPRET else GPU_CONFIGS[kind] + [FP32_CONFIG[kind]]
    return [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                          num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in raw]


def _prune(kind: str):
    """Offer the autotuner only configs that fit the input dtype's tile size."""
    if INTERPRET:
        return None
    fp32 = FP32_CONFIG[kind]

    def is_fp32_cfg(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == \
            (fp32["BLOCK_M"], fp32["BLOCK_N"], fp32["num_warps"], fp32["num_stages"])

    def prune(configs, named_args, **kwargs):
        want_fp32 = bool(kwargs.get("UPCAST"))
        return [c for c in configs if is_fp32_cfg(c) == want_fp32] or configs[-1:]

    return {"early_config_prune": prune}


_AUTOTUNE_KEY = ["T", "HEAD_DIM", "CAUSAL", "HAS_DOC", "UPCAST"]
_BENCH = _host_do_bench if INTERPRET else None


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, doc_q, doc_base,
               offs_m, offs_d, lo, hi, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
               HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_seq = cols < T
        kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=in_seq[None, :] & mask_d[:, None], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        valid = in_seq[None, :]
        if CAUSAL_MASK:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        if HAS_DOC:
            doc_k = tl.load(doc_base + cols, mask=in_seq, other=-2)
            valid = valid & (doc_q[:, None] == doc_k[None, :])
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row can see no key in this tile (document or padding): keep exp2 away from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                    mask=in_seq[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs("fwd"), key=_AUTOTUNE_KEY, prune_configs_by=_prune("fwd"),
                 do_bench=_BENCH)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, DOC, DOC_LO, DOC_HI, qk_scale,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              H, GROUP, T,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kh = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < HEAD_DIM

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh
    doc_base = DOC + off_b * T

    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (start_m + 1) * BLOCK_M)
    doc_q = offs_m
    if HAS_DOC:
        doc_q = tl.load(doc_base + offs_m, mask=mask_m, other=-1)
        first_row = start_m * BLOCK_M
        last_row = tl.minimum(T, (start_m + 1) * BLOCK_M) - 1
        lo = (tl.load(DOC_LO + off_b * T + first_row) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, tl.load(DOC_HI + off_b * T + last_row))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Tiles left of the diagonal need no causal mask; only the diagonal tile(s) pay for it.
        diag = start_m * BLOCK_M
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, doc_q,
                                   doc_base, offs_m, offs_d, lo, diag, T, qk_scale,
                                   HEAD_DIM, BLOCK_N, False, HAS_DOC, UPCAST, DOT_PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, doc_q,
                                   doc_base, offs_m, offs_d, diag, hi, T, qk_scale,
                                   HEAD_DIM, BLOCK_N, True, HAS_DOC, UPCAST, DOT_PRECISION)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, doc_q,
                                   doc_base, offs_m, offs_d, lo, hi, T, qk_scale,
                                   HEAD_DIM, BLOCK_N, False, HAS_DOC, UPCAST, DOT_PRECISION)

    # Rows past T saw nothing; give them l = 1 so the (unstored) division stays finite.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_safe), mask=mask_m)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
               H, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32: the softmax-Jacobian term shared by every key tile."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.autotune(configs=_configs("bwd_dkdv"), key=_AUTOTUNE_KEY, prune_configs_by=_prune("bwd_dkdv"),
                 do_bench=_BENCH)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, DOC, DOC_LO, DOC_HI, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                   H, KH, GROUP, T,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key tile, batch, KV head); it sums over every query head of its group,
    which is how GQA gets dK/dV without repeating K/V or atomics."""
    start_n = tl.program_id(0)
    off_bk = tl.program_id(1)
    off_b = (off_bk // KH).to(tl.int64)
    off_kh = (off_bk % KH).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < T
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]

    k = tl.load(K + off_b * stride_kb + off_kh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    lo = 0
    hi = T
    if CAUSAL:
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    doc_k = offs_n
    if HAS_DOC:
        doc_k = tl.load(DOC + off_b * T + offs_n, mask=mask_n, other=-2)
        first_col = start_n * BLOCK_N
        last_col = tl.minimum(T, (start_n + 1) * BLOCK_N) - 1
        lo = tl.maximum(lo, (tl.load(DOC_LO + off_b * T + first_col) // BLOCK_M) * BLOCK_M)
        hi = tl.load(DOC_HI + off_b * T + last_col)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        off_h = off_kh * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * H + off_h) * T
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            mask_m = offs_m < T
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :],
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            valid = mask_n[:, None] & mask_m[None, :]
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            if HAS_DOC:
                doc_q = tl.load(DOC + off_b * T + offs_m, mask=mask_m, other=-1)
                valid = valid & (doc_k[:, None] == doc_q[None, :])
            pT = tl.where(valid, tl.math.exp2(qkT - lse[None, :]), 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    tl.store(DK + off_b * stride_dkb + off_kh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_kh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs("bwd_dq"), key=_AUTOTUNE_KEY, prune_configs_by=_prune("bwd_dq"),
                 do_bench=_BENCH)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, DOC, DOC_LO, DOC_HI, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 H, GROUP, T,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kh = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + off_bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh

    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (start_m + 1) * BLOCK_M)
    doc_q = offs_m
    if HAS_DOC:
        doc_q = tl.load(DOC + off_b * T + offs_m, mask=mask_m, other=-1)
        first_row = start_m * BLOCK_M
        last_row = tl.minimum(T, (start_m + 1) * BLOCK_M) - 1
        lo = (tl.load(DOC_LO + off_b * T + first_row) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, tl.load(DOC_HI + off_b * T + last_row))

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        in_seq = cols < T
        kv_mask = in_seq[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = mask_m[:, None] & in_seq[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        if HAS_DOC:
            doc_k = tl.load(DOC + off_b * T + cols, mask=in_seq, other=-2)
            valid = valid & (doc_q[:, None] == doc_k[None, :])
        p = tl.where(valid, tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def doc_bounds(doc_ids_BT: torch.Tensor):
    """Per token: the id of its document run and the [start, end) positions of that run.

    A new document starts wherever the id changes, so `[0, 0, 1, 1, 0]` is three documents.
    """
    B, T = doc_ids_BT.shape
    pos_T = torch.arange(T, device=doc_ids_BT.device, dtype=torch.int32)
    starts_BT = torch.ones(B, T, dtype=torch.bool, device=doc_ids_BT.device)
    starts_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    ends_BT = torch.ones_like(starts_BT)
    ends_BT[:, :-1] = starts_BT[:, 1:]
    run_BT = torch.cumsum(starts_BT, dim=1, dtype=torch.int32)
    lo_BT = torch.cummax(torch.where(starts_BT, pos_T, 0), dim=1).values
    hi_BT = torch.where(ends_BT, pos_T + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return run_BT.int().contiguous(), lo_BT.int().contiguous(), hi_BT.int().contiguous()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _common_meta(q_BHTd: torch.Tensor, causal: bool, has_doc: bool) -> dict:
    d = q_BHTd.shape[-1]
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=causal, HAS_DOC=has_doc,
                UPCAST=INTERPRET or q_BHTd.dtype == torch.float32,
                # fp32 callers asked for fp32: keep TF32 out so results match an fp32 reference.
                DOT_PRECISION="ieee" if q_BHTd.dtype == torch.float32 else "tf32")


def _dummy_doc(device):
    return torch.zeros(1, dtype=torch.int32, device=device)


def attention_fwd(q_BHTd, k_BKTd, v_BKTd, causal: bool, sm_scale: float, doc=None):
    B, H, T, d = q_BHTd.shape
    KH = k_BKTd.shape[1]
    o_BHTd = torch.empty_like(q_BHTd)
    lse_BHT = torch.empty(B, H, T, device=q_BHTd.device, dtype=torch.float32)
    run_BT, lo_BT, hi_BT = doc if doc is not None else (_dummy_doc(q_BHTd.device),) * 3
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _attn_fwd[grid](q_BHTd, k_BKTd, v_BKTd, o_BHTd, lse_BHT, run_BT, lo_BT, hi_BT, sm_scale * LOG2E,
                    *q_BHTd.stride()[:3], *k_BKTd.stride()[:3], *v_BKTd.stride()[:3], *o_BHTd.stride()[:3],
                    H, H // KH, T, **_common_meta(q_BHTd, causal, doc is not None))
    return o_BHTd, lse_BHT


def attention_bwd(do_BHTd, q_BHTd, k_BKTd, v_BKTd, o_BHTd, lse_BHT, causal: bool, sm_scale: float,
                  doc=None):
    B, H, T, d = q_BHTd.shape
    KH = k_BKTd.shape[1]
    meta = _common_meta(q_BHTd, causal, doc is not None)
    delta_BHT = torch.empty_like(lse_BHT)
    block = 16 if INTERPRET else 128
    _bwd_delta[(triton.cdiv(T, block), B * H)](
        o_BHTd, do_BHTd, delta_BHT, *o_BHTd.stride()[:3], *do_BHTd.stride()[:3], H, T,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block)
    run_BT, lo_BT, hi_BT = doc if doc is not None else (_dummy_doc(q_BHTd.device),) * 3
    dq_BHTd = torch.empty_like(q_BHTd)
    dk_BKTd = torch.empty_like(k_BKTd)
    dv_BKTd = torch.empty_like(v_BKTd)
    strides = (*q_BHTd.stride()[:3], *k_BKTd.stride()[:3], *v_BKTd.stride()[:3], *do_BHTd.stride()[:3])
    grid_kv = lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * KH)
    _attn_bwd_dkdv[grid_kv](q_BHTd, k_BKTd, v_BKTd, do_BHTd, dk_BKTd, dv_BKTd, lse_BHT, delta_BHT,
                            run_BT, lo_BT, hi_BT, sm_scale * LOG2E, sm_scale, *strides,
                            *dk_BKTd.stride()[:3], *dv_BKTd.stride()[:3], H, KH, H // KH, T, **meta)
    grid_q = lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)
    _attn_bwd_dq[grid_q](q_BHTd, k_BKTd, v_BKTd, do_BHTd, dq_BHTd, lse_BHT, delta_BHT,
                         run_BT, lo_BT, hi_BT, sm_scale * LOG2E, sm_scale, *strides,
                         *dq_BHTd.stride()[:3], H, H // KH, T, **meta)
    return dq_BHTd, dk_BKTd, dv_BKTd


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHTd, k_BKTd, v_BKTd, causal, sm_scale, doc_ids_BT):
        q_BHTd, k_BKTd, v_BKTd = (_last_dim_contiguous(x) for x in (q_BHTd, k_BKTd, v_BKTd))
        doc = doc_bounds(doc_ids_BT) if doc_ids_BT is not None else None
        o_BHTd, lse_BHT = attention_fwd(q_BHTd, k_BKTd, v_BKTd, causal, sm_scale, doc)
        ctx.save_for_backward(q_BHTd, k_BKTd, v_BKTd, o_BHTd, lse_BHT, *(doc or ()))
        ctx.causal, ctx.sm_scale, ctx.has_doc = causal, sm_scale, doc is not None
        return o_BHTd

    @staticmethod
    def backward(ctx, do_BHTd):
        q_BHTd, k_BKTd, v_BKTd, o_BHTd, lse_BHT, *doc = ctx.saved_tensors
        dq, dk, dv = attention_bwd(_last_dim_contiguous(do_BHTd), q_BHTd, k_BKTd, v_BKTd, o_BHTd,
                                   lse_BHT, ctx.causal, ctx.sm_scale, tuple(doc) if ctx.has_doc else None)
        return dq, dk, dv, None, None, None


def triton_attention(q_BHTd: torch.Tensor, k_BKTd: torch.Tensor, v_BKTd: torch.Tensor, *,
                     causal: bool = True, sm_scale: float | None = None,
                     doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention; differentiable in q, k, v. `doc_ids_BT` masks attention across documents."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q_BHTd.shape[-1])
    return TritonAttention.apply(q_BHTd, k_BKTd, v_BKTd, causal, sm_scale, doc_ids_BT)
