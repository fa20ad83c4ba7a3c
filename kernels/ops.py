"""The fused ops the model calls besides attention: RMSNorm, SwiGLU and RoPE, each behind one dispatch.

Shape legend: R rows (leading dims flattened), D normalised size, F feed-forward hidden size, B batch,
H query heads, K key/value heads, T sequence, d head dim, f = d/2 rotation pairs.

Backends (`impl`):
  rmsnorm  torch | triton | cuda | liger | auto
  swiglu   torch | triton | liger | auto
  rope     torch | triton | auto         (no liger: Liger's RoPE pairs x[i] with x[i + d/2], keel's
                                          model pairs x[2i] with x[2i+1]; see README)

`torch` is the model's own math, written once here (the reference every other backend is tested
against, and bit-identical to the model before this dispatch existed). `auto` is torch on CPU (never the
Triton interpreter), inside torch.compile (Inductor generates its own fused kernel) and for DTensor
inputs (tensor parallel's sequence-parallel norms). On CUDA it is triton only for the ops in
GPU_VERIFIED, whose Triton kernel has been run on a GPU, checked against torch and measured faster by
`keel bench rmsnorm|swiglu|rope`; until then (no GPU was available when this was written, so the set is
empty) `auto` stays with torch, and the Triton kernels run only when asked for by name.

Non-torch RMSNorm backends return x's dtype; the torch one promotes with the weight's (so under bf16
autocast a bf16 input with an fp32 gain gives fp32 there, bf16 here).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .available import has_module, interpreting, is_dtensor

OP_IMPLS = {
    "rmsnorm": ("auto", "torch", "triton", "cuda", "liger"),
    "swiglu": ("auto", "torch", "triton", "liger"),
    "rope": ("auto", "torch", "triton"),
}
# Ops whose Triton kernel `auto` may pick on CUDA: run there, matched against torch, measured faster. An
# interpreter test and an sm_90 compile are not enough to hand every GPU run a kernel nobody has run.
GPU_VERIFIED: frozenset[str] = frozenset()
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest sizes the Triton kernels are compile-checked for at sm_90 (kernels/triton_compile_check.py):
# RMSNorm holds a whole row in registers; RoPE a whole position's heads x pairs.
TRITON_RMSNORM_MAX_DIM = 8192
TRITON_ROPE_MAX_TILE = 64 * 64  # next_pow2(max(H, K)) * next_pow2(d / 2), as for (64, 8, 128)
# The CUDA RMSNorm backward keeps a row's dw partial in shared memory (fp32, <= 227 KB on sm_90).
CUDA_RMSNORM_MAX_DIM = 227 * 1024 // 4


# ---------------------------------------------------------------------------------------------------
# The reference math: exactly what training/model.py computed before these ops had backends.

def torch_rms_norm(x: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32: bf16 sums of squares lose the precision that keeps the norm stable.
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight_D


def torch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def apply_rope(x_BHTd: torch.Tensor, cos_Tf: torch.Tensor, sin_Tf: torch.Tensor) -> torch.Tensor:
    # Rotate interleaved pairs (x0, x1), (x2, x3), ... as Llama does.
    T = x_BHTd.shape[-2]
    x = x_BHTd.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = cos_Tf[:T], sin_Tf[:T]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHTd)


def torch_rope(q_BHTd, k_BKTd, cos_Tf, sin_Tf):
    return apply_rope(q_BHTd, cos_Tf, sin_Tf), apply_rope(k_BKTd, cos_Tf, sin_Tf)


# ---------------------------------------------------------------------------------------------------
# Checks: what each backend can run, said before any work starts.



def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _rope_tile(n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    return _next_pow2(max(n_heads, n_kv_heads)) * _next_pow2(head_dim // 2)


def check_op_impl(op: str, impl: str, device_type: str, *, dtype: torch.dtype = torch.float32,
                  dim: int | None = None, n_heads: int | None = None, n_kv_heads: int | None = None) -> None:
    """Raise ValueError, naming the problem and the fix, if `impl` cannot run `op` here.

    Sizes, where known, let the shape limits be checked too: `dim` is the normalised size (rmsnorm) or
    the head dim (rope); `n_heads`/`n_kv_heads` the heads one process rotates (rope).
    """
    if op not in OP_IMPLS:
        raise ValueError(f"unknown op {op!r}; choose one of {', '.join(OP_IMPLS)}")
    choices = OP_IMPLS[op]
    if impl not in choices:
        why = ""
        if (op, impl) == ("rope", "liger"):
            why = " (Liger's RoPE rotates a different pair layout than keel's model)"
        raise ValueError(f"unknown {op} impl {impl!r}{why}; choose one of {', '.join(choices)}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op} dtype {str(dtype).replace('torch.', '')} is not supported; use float32, bfloat16 "
                         "or float16")
    if impl in ("auto", "torch"):
        return
    if impl == "triton":
        if not has_module("triton"):
            raise ValueError(f"{op} impl 'triton' needs the triton package: pip install triton==3.9.0, or set it "
                             "to 'torch'")
        if device_type != "cuda" and not interpreting():
            raise ValueError(f"{op} impl 'triton' needs a CUDA device, got {device_type!r}; use 'torch' or 'auto' "
                             "on CPU (TRITON_INTERPRET=1 runs it on CPU, slowly, for debugging)")
        if op == "rmsnorm" and dim is not None and dim > TRITON_RMSNORM_MAX_DIM:
            raise ValueError(f"rmsnorm impl 'triton' keeps a whole row in registers and is compile-checked up to "
                             f"{TRITON_RMSNORM_MAX_DIM}, got {dim}; use 'torch', 'cuda' or 'liger'")
        if op == "rope" and None not in (dim, n_heads, n_kv_heads) and \
                _rope_tile(n_heads, n_kv_heads, dim) > TRITON_ROPE_MAX_TILE:
            raise ValueError(f"rope impl 'triton' rotates all heads of a position in one program; (heads, kv heads, "
                             f"head dim) = ({n_heads}, {n_kv_heads}, {dim}) is larger than the compile-checked "
                             f"(64, 8, 128); use 'torch' (or tensor parallelism to split the heads)")
        return
    if impl == "liger":
        if not has_module("liger_kernel"):
            raise ValueError(f"{op} impl 'liger' needs the liger-kernel package (pip install liger-kernel==0.8.5, "
                             "CUDA only); or use 'triton'/'torch'")
        if device_type != "cuda":
            raise ValueError(f"{op} impl 'liger' needs a CUDA device, got {device_type!r} (Liger's kernels fail "
                             "under the Triton interpreter); use 'torch'")
        return
    # impl == "cuda" (rmsnorm only)
    if device_type != "cuda":
        raise ValueError(f"rmsnorm impl 'cuda' needs a CUDA device, got {device_type!r}; use 'torch'")
    if dim is not None and dim > CUDA_RMSNORM_MAX_DIM:
        raise ValueError(f"rmsnorm impl 'cuda' supports sizes up to {CUDA_RMSNORM_MAX_DIM}, got {dim}; use 'torch'")
    from .cuda_build import cuda_ops_buildable
    ok, why = cuda_ops_buildable()
    if not ok:
        raise ValueError(f"rmsnorm impl 'cuda' cannot be built: {why}")


@functools.lru_cache(maxsize=None)
def _checked(op, impl, device_type, dtype, dim, n_heads, n_kv_heads) -> None:
    check_op_impl(op, impl, device_type, dtype=dtype, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads)



def resolve_op_impl(op: str, impl: str, x: torch.Tensor, *, dim: int | None = None, n_heads: int | None = None,
                    n_kv_heads: int | None = None) -> str:
    """The concrete backend `impl` means for input `x` (see the module docstring for `auto`)."""
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if (op not in GPU_VERIFIED or x.device.type != "cuda" or is_dtensor(x) or torch.compiler.is_compiling()
                or not has_module("triton")):
            return "torch"
        try:
            _checked(op, "triton", "cuda", x.dtype, dim, n_heads, n_kv_heads)
        except ValueError:
            return "torch"
        return "triton"
    _checked(op, impl, x.device.type, x.dtype, dim, n_heads, n_kv_heads)
    if is_dtensor(x):
        raise TypeError(f"{op} impl {impl!r} runs on plain tensors, got a DTensor (tensor parallelism's sharded "
                        f"activations); use impl 'torch' or 'auto'")
    return impl


# ---------------------------------------------------------------------------------------------------
# The entry points the model calls.

def rms_norm(x: torch.Tensor, weight_D: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim, scaled by `weight_D`."""
    backend = resolve_op_impl("rmsnorm", impl, x, dim=x.shape[-1])
    if backend == "torch":
        return torch_rms_norm(x, weight_D, eps)
    if backend == "triton":
        from .triton_ops import triton_rms_norm
        return triton_rms_norm(x, weight_D, eps)
    if backend == "cuda":
        from .cuda_ops import cuda_rms_norm
        return cuda_rms_norm(x, weight_D.to(x.dtype), eps)  # the binding wants one dtype
    from liger_kernel.transformers.functional import liger_rms_norm
    # "llama" casting is keel's torch math (fp32 rstd, x * rstd rounded before the gain); not in place,
    # because the incoming gradient is also the residual branch's.
    return liger_rms_norm(x, weight_D.to(x.dtype), eps, 0.0, "llama", False)


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up: the elementwise half of the SwiGLU feed-forward."""
    backend = resolve_op_impl("swiglu", impl, gate)
    if backend == "torch":
        return torch_swiglu(gate, up)
    if backend == "triton":
        from .triton_ops import triton_swiglu
        return triton_swiglu(gate, up)
    from liger_kernel.transformers.functional import liger_swiglu
    return liger_swiglu(gate, up)


def rope(q_BHTd: torch.Tensor, k_BKTd: torch.Tensor, cos_Tf: torch.Tensor, sin_Tf: torch.Tensor,
         impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k with the model's [T_max, d/2] tables."""
    backend = resolve_op_impl("rope", impl, q_BHTd, dim=q_BHTd.shape[-1], n_heads=q_BHTd.shape[1],
                              n_kv_heads=k_BKTd.shape[1])
    if backend == "torch":
        return torch_rope(q_BHTd, k_BKTd, cos_Tf, sin_Tf)
    from .triton_rope import triton_rope
    return triton_rope(q_BHTd, k_BKTd, cos_Tf, sin_Tf)
