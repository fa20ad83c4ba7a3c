"""Triton softmax cross-entropy over one chunk of logits rows, with the gradient written in the same pass.

Shape legend: C rows in the chunk (tokens), V vocabulary.

The chunked fused linear + cross-entropy (kernels/cross_entropy.py) computes a chunk's fp32 logits with a
matmul and hands them to `ce_rows_triton`, which per row (one program each):
  1. streams the row in BLOCK_V-wide blocks with an online max / sum of exponentials (the row never has
     to fit on chip), giving logsumexp `lse`, the cross-entropy `lse - x[target]` and `lse` itself
     (the z-loss term z * lse^2 needs it);
  2. streams the row again and writes d loss / d logits = (softmax * (1 + 2 z lse) - onehot(target)) / n
     (n = number of non-ignored tokens in the whole batch, so the chunk's gradient is already that of
     the batch mean) into GRAD, which may be the logits buffer itself (in place, fp32) or a separate
     buffer of the matmul dtype (bf16), ready for the two gradient matmuls.
Ignored tokens (target == ignore_index) get zero loss, zero lse and a zero gradient row.
This is Liger-Kernel's cross-entropy kernel reduced to what keel needs (no label smoothing, class
weights or softcap).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_attention import INTERPRET


@triton.jit
def _ce_rows(LOGITS, GRAD, TARGETS, CE, LSE, INV_N, stride_logits, stride_grad, V, z_loss, ignore_index,
             HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_row = LOGITS + row * stride_logits
    grad_row = GRAD + row * stride_grad
    target = tl.load(TARGETS + row)
    if target == ignore_index:
        tl.store(CE + row, 0.0)
        tl.store(LSE + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(grad_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(GRAD.dtype.element_ty),
                         mask=cols < V)
        return

    # Pass 1: online logsumexp (Milakov & Gimelshein 2018): rescale the running sum when the max grows.
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    x_target = tl.load(logits_row + target).to(tl.float32)
    tl.store(CE + row, lse - x_target)
    tl.store(LSE + row, lse)

    # Pass 2: the gradient of (ce + z * lse^2) / n. Each block is read before it is overwritten, by the
    # same program, so GRAD may alias LOGITS.
    if HAS_GRAD:
        inv_n = tl.load(INV_N)
        scale = (1.0 + 2.0 * z_loss * lse) * inv_n
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse) * scale
            g = tl.where(cols == target, g - inv_n, g)
            tl.store(grad_row + cols, g.to(GRAD.dtype.element_ty), mask=mask)


# GPU: 16384-wide blocks (8 per 128k-vocab row) with 16 warps, 32 fp32 values per thread. Compiled for sm_90
# by ptxas (-v): 72 registers, no spills, 64 B of shared memory. Liger's choice (32768 with 32 warps) puts this
# kernel at the 64-register cap of 1024-thread blocks and spills 4 bytes in the fp32 in-place variant. Not
# tuned on a GPU (none was available). Interpreting: 64-wide blocks, so test vocabularies span several
# blocks with a ragged last one.
MAX_BLOCK_V = 64 if INTERPRET else 16384


def launch_config(V: int) -> dict:
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    return dict(BLOCK_V=block_v, num_warps=1 if INTERPRET else min(16, max(4, block_v // 1024)))


def ce_rows_triton(logits_CV: torch.Tensor, targets_C: torch.Tensor, ce_C: torch.Tensor, lse_C: torch.Tensor,
                   inv_n: torch.Tensor, z_loss: float, ignore_index: int, grad_CV: torch.Tensor | None) -> None:
    """Fill ce_C and lse_C (fp32) from fp32 logits rows; if grad_CV is given, write d(mean loss)/d logits into
    it (it may be logits_CV itself). `inv_n`: a one-element fp32 tensor, 1 / (non-ignored tokens in the
    batch), read on the device so there is no host synchronisation."""
    C, V = logits_CV.shape
    if C == 0:
        return
    if logits_CV.stride(1) != 1 or (grad_CV is not None and grad_CV.stride(1) != 1):
        raise ValueError("ce_rows_triton needs rows with unit column stride")
    grad = grad_CV if grad_CV is not None else logits_CV
    cfg = launch_config(V)
    _ce_rows[(C,)](logits_CV, grad, targets_C, ce_C, lse_C, inv_n, logits_CV.stride(0), grad.stride(0), V,
                   float(z_loss), int(ignore_index), HAS_GRAD=grad_CV is not None, BLOCK_V=cfg["BLOCK_V"],
                   num_warps=cfg["num_warps"])


def compile_cases():
    """Cases for triton_compile_check: a Llama-3 vocabulary (V = 128256), fp32 logits, the gradient written
    in place (fp32) or into a bf16 buffer; and the forward-only (eval) variant."""
    from .triton_compile_check import Case
    cfg = launch_config(128256)
    block = dict(num_warps=cfg.pop("num_warps"), num_stages=1)
    pointers = dict(LOGITS="fp32", TARGETS="i64", CE="fp32", LSE="fp32", INV_N="fp32")
    cases = []
    for grad_dtype, has_grad in (("float32", True), ("bfloat16", True), ("float32", False)):
        cases.append(Case("_ce_rows", block, dict(cfg, HAS_GRAD=has_grad), grad_dtype, pointers=pointers,
                          floats=("z_loss",), ints=("V",)))
    return cases
