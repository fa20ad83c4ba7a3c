"""Triton RMSNorm and SwiGLU, forward + backward (fp32 arithmetic whatever the storage dtype).

Shape legend: R rows (leading dims flattened), D hidden size, P programs in the backward (dw partials),
F feed-forward hidden size (SwiGLU).
On GPU prefer Liger-Kernel's RMSNorm and SwiGLU (see README); these exist so the ops run and are tested
under the interpreter, and so keel has a Triton reference to compare against.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_attention import INTERPRET


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, R, D, rows_per_program,
                 BLOCK_D: tl.constexpr):
    """Each program owns a contiguous slab of rows and writes one fp32 dw partial: no atomics, so dw
    is reproducible; the host sums the P partials."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    # 64-bit row index: row * stride overflows int32 for large activations.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, R)
    for row64 in range(row_start, row_end):
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        x_hat = x * rstd
        wdy = w * dy
        # d/dx of x * rstd: the projection term removes the component along x_hat.
        dx = rstd * (wdy - x_hat * (tl.sum(wdy * x_hat, 0) / D))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols, dw, mask=mask)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _num_warps(D: int) -> int:
    return 1 if INTERPRET else min(16, max(1, _block_d(D) // 256))


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_D, eps):
        shape = x.shape
        x_RD = x.reshape(-1, shape[-1])
        if x_RD.stride(-1) != 1:
            x_RD = x_RD.contiguous()
        R, D = x_RD.shape
        y_RD = torch.empty_like(x_RD)
        rstd_R = torch.empty(R, dtype=torch.float32, device=x.device)
        _rmsnorm_fwd[(R,)](x_RD, weight_D, y_RD, rstd_R, x_RD.stride(0), y_RD.stride(0), D, eps,
                           BLOCK_D=_block_d(D), num_warps=_num_warps(D))
        ctx.save_for_backward(x_RD, weight_D, rstd_R)
        ctx.shape = shape
        return y_RD.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x_RD, weight_D, rstd_R = ctx.saved_tensors
        R, D = x_RD.shape
        dy_RD = dy.reshape(R, D)
        if dy_RD.stride(-1) != 1:
            dy_RD = dy_RD.contiguous()
        n_sm = torch.cuda.get_device_properties(x_RD.device).multi_processor_count if x_RD.is_cuda else 2
        P = max(1, min(R, 4 * n_sm))
        rows_per_program = triton.cdiv(R, P)
        P = triton.cdiv(R, rows_per_program)
        dx_RD = torch.empty_like(x_RD)
        dw_partial_PD = torch.empty(P, D, dtype=torch.float32, device=x_RD.device)
        _rmsnorm_bwd[(P,)](dy_RD, x_RD, weight_D, rstd_R, dx_RD, dw_partial_PD, dy_RD.stride(0), x_RD.stride(0),
                           dx_RD.stride(0), R, D, rows_per_program, BLOCK_D=_block_d(D),
                           num_warps=_num_warps(D))
        return dx_RD.view(ctx.shape), dw_partial_PD.sum(0).to(weight_D.dtype), None


def triton_rms_norm(x: torch.Tensor, weight_D: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return TritonRMSNorm.apply(x, weight_D, eps)


# ----------------------------------------------------------------------------------------------
# SwiGLU: y = silu(gate) * up, the elementwise half of the feed-forward w2(silu(w1 x) * w3 x)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_fwd(G, U, Y, stride_g, stride_u, stride_y, F, BLOCK_F: tl.constexpr):
    # 2-D grid (row, column block): any F with a fixed tile, and row strides let gate/up be column
    # halves of one fused w13 projection without a copy.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, F,
                BLOCK_F: tl.constexpr):
    """Recomputes silu(gate) from the saved inputs rather than saving it: one [R, F] tensor less
    held between forward and backward, at the cost of a sigmoid (gate and up are loaded anyway)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g)/dg = sig + g * sig * (1 - sig) = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)


# 1024 elements = 8 per thread at 4 warps (16-byte bf16 vectors). 32 when interpreting: the test
# sizes then span several column blocks with a ragged last one.
SWIGLU_BLOCK_F = 32 if INTERPRET else 1024
SWIGLU_NUM_WARPS = 1 if INTERPRET else 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [R, F] with unit column stride, as a view whenever the layout allows."""
    t_RF = t.reshape(-1, t.shape[-1])
    return t_RF if t_RF.stride(-1) == 1 else t_RF.contiguous()


class TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"gate and up must match: {tuple(gate.shape)} {gate.dtype} vs "
                             f"{tuple(up.shape)} {up.dtype}")
        shape = gate.shape
        g_RF, u_RF = _rows(gate), _rows(up)
        R, F = g_RF.shape
        y_RF = torch.empty(R, F, dtype=gate.dtype, device=gate.device)
        if R > 0:
            _swiglu_fwd[(R, triton.cdiv(F, SWIGLU_BLOCK_F))](
                g_RF, u_RF, y_RF, g_RF.stride(0), u_RF.stride(0), y_RF.stride(0), F,
                BLOCK_F=SWIGLU_BLOCK_F, num_warps=SWIGLU_NUM_WARPS)
        ctx.save_for_backward(g_RF, u_RF)
        ctx.shape = shape
        return y_RF.view(shape)

    @staticmethod
    def backward(ctx, dy):
        g_RF, u_RF = ctx.saved_tensors
        R, F = g_RF.shape
        dy_RF = _rows(dy)
        dg_RF = torch.empty(R, F, dtype=g_RF.dtype, device=g_RF.device)
        du_RF = torch.empty_like(dg_RF)
        if R > 0:
            _swiglu_bwd[(R, triton.cdiv(F, SWIGLU_BLOCK_F))](
                dy_RF, g_RF, u_RF, dg_RF, du_RF, dy_RF.stride(0), g_RF.stride(0), u_RF.stride(0),
                dg_RF.stride(0), du_RF.stride(0), F, BLOCK_F=SWIGLU_BLOCK_F, num_warps=SWIGLU_NUM_WARPS)
        return dg_RF.view(ctx.shape), du_RF.view(ctx.shape)


def triton_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one pass; `gate`, `up` are the w1 and w3 outputs, any leading shape."""
    return TritonSwiGLU.apply(gate, up)


def compile_cases():
    """Cases for triton_compile_check: model hidden sizes, bf16."""
    from .triton_compile_check import Case
    cases = []
    for D in (2048, 4096, 8192):
        cfg = dict(num_warps=min(16, max(1, D // 256)), num_stages=1)
        for name in ("_rmsnorm_fwd", "_rmsnorm_bwd"):
            cases.append(Case(name, cfg, dict(BLOCK_D=D), "bfloat16",
                              pointers=dict(RSTD="fp32", DW_PARTIAL="fp32"), floats=("eps",), ints=("R", "D")))
    # SwiGLU's tile does not depend on F; fp32 too, since its loads are twice as wide.
    for dtype in ("bfloat16", "float32"):
        for name in ("_swiglu_fwd", "_swiglu_bwd"):
            cases.append(Case(name, dict(num_warps=SWIGLU_NUM_WARPS, num_stages=1), dict(BLOCK_F=SWIGLU_BLOCK_F),
                              dtype, ints=("F",)))
    return cases
