"""The ops `keel bench` measures, one registry entry each: the shapes it builds, the impls it can compare,
its FLOP and byte formulas and its fp32 reference (the harness that times them is bench.py).

Shape legend: B batch, T sequence, H query heads, K key/value heads, d head dim, D model dim, F ffn hidden
size, V vocabulary, N = B*T tokens, s bytes per element.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MODES = ("fwd", "bwd", "fwd+bwd")
# Attention through SDPA with one backend forced, to compare keel's kernels against each of PyTorch's.
SDPA_FORCED = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")


# ---------------------------------------------------------------------------------------------------
# Command-line values

def parse_sizes(text: str) -> list[int]:
    """'512,1k,2K,4096' -> [512, 1024, 2048, 4096] (k = 1024)."""
    sizes = []
    for item in (s.strip().lower() for s in text.split(",") if s.strip()):
        try:
            sizes.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {item!r} (use e.g. 512,1k,2k)") from None
    return sizes


def parse_heads(text: str) -> tuple[int, int]:
    """'32/8' -> (32 query heads, 8 key/value heads); '16' -> (16, 16)."""
    try:
        h, _, k = text.partition("/")
        heads = (int(h), int(k or h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a head count: {text!r} (use e.g. 32/8)") from None
    if heads[0] % heads[1]:
        raise argparse.ArgumentTypeError(f"{heads[1]} key/value heads must divide {heads[0]} query heads")
    return heads


def parse_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_modes(text: str) -> list[str]:
    modes = parse_list(text)
    for m in modes:
        if m not in MODES:
            raise argparse.ArgumentTypeError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    return modes


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------------
# The ops: one entry each (shapes, impls, formulas, fp32 reference)

@dataclass
class Case:
    inputs: list[torch.Tensor]                    # leaves that receive gradients
    extra: dict = field(default_factory=dict)     # other arguments (tables, targets)
    shape: str = ""
    tokens: int = 0


class Op:
    name = ""
    bound = "memory"                 # what % of peak is measured against: "compute" or "memory"
    impls: tuple = ()                # every impl the op knows
    cpu_impls: tuple = ()            # what runs without a GPU: the CPU reference and the interpreter
    flop_formula = ""
    byte_formula = ""
    help = ""

    def add_args(self, p: argparse.ArgumentParser) -> None: ...

    def fill_defaults(self, args, on_gpu: bool) -> None:
        if args.batch is None:
            args.batch = 1

    def check(self, impl: str, args, device: str, dtype, mode: str) -> None:
        """Raise ValueError (the message is printed as the skip reason) if impl cannot run this."""

    def make(self, args, T: int, dtype, device) -> Case:
        raise NotImplementedError

    def run(self, impl: str, case: Case, args) -> tuple[torch.Tensor, ...]:
        """The differentiable outputs of one call."""
        raise NotImplementedError

    def reference(self, inputs32: list[torch.Tensor], case: Case, args) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def flops(self, args, case: Case, mode: str) -> float:
        raise NotImplementedError

    def bytes(self, args, case: Case, mode: str, dtype) -> float | None:
        return None

    def tolerance(self, dtype) -> float:
        """Max abs error vs fp32, relative to the reference's largest magnitude where that exceeds 1."""
        return 1e-4 if dtype == torch.float32 else 1.6e-2  # 4 bf16 ulps at 1

    def grad_outputs(self, outs, gen) -> tuple[torch.Tensor, ...]:
        return tuple((0.5 * torch.randn(o.shape, generator=gen, device="cpu")).to(o.device, o.dtype) for o in outs)

    def supports_bwd_alone(self, impl: str) -> bool:
        return True

    def compare(self, case: Case, args, outs, grads, dy) -> tuple[list, list]:
        """(output, fp32 reference) pairs and, when `grads` is given, (gradient, fp32 reference) pairs."""
        inputs32 = [x.detach().float().requires_grad_() for x in case.inputs]
        with torch.enable_grad():
            ref = self.reference(inputs32, case, args)
            ref_grads = torch.autograd.grad(ref, inputs32, [d.float() for d in dy]) if grads is not None else ()
        return list(zip(outs, ref)), list(zip(grads or (), ref_grads))


def max_err(pairs) -> tuple[float, float]:
    """(max abs error, the reference's largest magnitude) over (value, reference) pairs."""
    err = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    scale = max(b.float().abs().max().item() for _, b in pairs)
    return err, scale


class Attention(Op):
    name, bound = "attention", "compute"
    impls = ("sdpa", "triton", "cuda", "flash_attn", *SDPA_FORCED, "compile")
    cpu_impls = ("sdpa", "triton")
    flop_formula = ("fwd = 4*B*H*T*T*d (QK^T and PV, 2 FLOPs per multiply-add), x0.5 when causal; bwd = 2.5x fwd "
                    "(5 matmuls vs 2; recomputation not counted); fwd+bwd = 3.5x fwd")
    help = ("attention backends (attention(impl=...)): sdpa, triton, cuda (forward only), flash_attn; and, to "
            "compare against, one SDPA backend forced (sdpa_flash, sdpa_cudnn, sdpa_efficient) and compile "
            "(torch.compile of the plain softmax(QK^T)V math)")

    def add_args(self, p):
        p.add_argument("--heads", type=parse_heads, default=None, metavar="H/K",
                       help="query/key-value heads (GPU default 32/8, CPU 4/2)")
        p.add_argument("--head-dim", type=int, default=None, help="GPU default 128, CPU 32")
        p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)

    def fill_defaults(self, args, on_gpu):
        args.heads = args.heads or ((32, 8) if on_gpu else (4, 2))
        args.head_dim = args.head_dim or (128 if on_gpu else 32)

    def check(self, impl, args, device, dtype, mode):
        if impl == "compile":
            return
        if impl in SDPA_FORCED:
            if device != "cuda" and impl != "sdpa_flash":  # PyTorch's CPU SDPA has a flash kernel, no other
                raise ValueError(f"{impl} needs a CUDA device")
            return
        from .attention import check_attention_impl
        check_attention_impl(impl, args.head_dim, dtype, device, requires_grad=mode != "fwd")

    def make(self, args, T, dtype, device):
        # Batch: 16k tokens per call on a GPU unless given (the FlashAttention benchmarks' convention).
        B = args.batch or (max(1, 16384 // T) if device == "cuda" else 1)
        (H, K), d = args.heads, args.head_dim
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, T, d, generator=gen).to(device, dtype).requires_grad_() for h in (H, K, K))
        return Case([q, k, v], shape=f"B={B} H={H} K={K} T={T} d={d}", tokens=B * T)

    def run(self, impl, case, args):
        q, k, v = case.inputs
        if impl in SDPA_FORCED:
            return (_sdpa_forced(impl, q, k, v, args.causal),)
        if impl == "compile":
            return (_compiled_fn("attention", _plain_attention)(q, k, v, args.causal),)
        from .attention import attention
        return (attention(q, k, v, causal=args.causal, impl=impl),)

    def flops(self, args, case, mode):
        B, H, T, d = case.inputs[0].shape
        fwd = 4.0 * B * H * T * T * d * (0.5 if args.causal else 1.0)
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]

    def compare(self, case, args, outs, grads, dy):
        # fp32 reference on batch 0 and the first key/value group only, to bound its memory at long T.
        # Exact for those slices: the first K head's gradients come from its group's query heads alone.
        q, k, v = case.inputs
        g = q.shape[1] // k.shape[1]
        q32, k32, v32 = (x.detach()[:1, :n].float().requires_grad_() for x, n in ((q, g), (k, 1), (v, 1)))
        with torch.enable_grad():
            ref = F.scaled_dot_product_attention(q32, k32.expand(-1, g, -1, -1), v32.expand(-1, g, -1, -1),
                                                 is_causal=args.causal)
            grad_pairs = []
            if grads is not None:
                ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dy[0][:1, :g].float())
                grad_pairs = list(zip((grads[0][:1, :g], grads[1][:1, :1], grads[2][:1, :1]), ref_grads))
        return [(outs[0][:1, :g], ref.detach())], grad_pairs


class RMSNorm(Op):
    name = "rmsnorm"
    impls = ("torch", "triton", "cuda", "liger", "compile")
    cpu_impls = ("torch", "triton")
    flop_formula = "fwd = 4*N*D (square, sum, scale, gain); bwd = 9*N*D; fwd+bwd = 13*N*D"
    byte_formula = "fwd = 2*N*D*s (read x, write y); bwd = 3*N*D*s (read dy, x; write dx); fwd+bwd = 5*N*D*s"
    help = "RMSNorm (kernels/ops.rms_norm): torch, triton, cuda, liger, compile (torch.compile of the torch math)"

    def add_args(self, p):
        p.add_argument("--dim", type=int, default=None, help="D (GPU default 4096, CPU 64)")
        p.add_argument("--eps", type=float, default=1e-5)

    def fill_defaults(self, args, on_gpu):
        super().fill_defaults(args, on_gpu)
        args.dim = args.dim or (4096 if on_gpu else 64)

    def check(self, impl, args, device, dtype, mode):
        _check_elementwise("rmsnorm", impl, device, dtype, dim=args.dim)

    def make(self, args, T, dtype, device):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, T, args.dim, generator=gen).to(device, dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(args.dim, generator=gen)).to(device, dtype).requires_grad_()
        return Case([x, w], shape=f"B={args.batch} T={T} D={args.dim}", tokens=args.batch * T)

    def run(self, impl, case, args):
        from .ops import rms_norm, torch_rms_norm
        x, w = case.inputs
        if impl == "compile":
            return (_compiled_fn("rmsnorm", torch_rms_norm)(x, w, args.eps),)
        return (rms_norm(x, w, args.eps, impl),)

    def reference(self, inputs32, case, args):
        from .ops import torch_rms_norm
        return (torch_rms_norm(*inputs32, args.eps),)

    def flops(self, args, case, mode):
        return {"fwd": 4, "bwd": 9, "fwd+bwd": 13}[mode] * case.tokens * args.dim

    def bytes(self, args, case, mode, dtype):
        return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * case.tokens * args.dim * elem_size(dtype)


class SwiGLU(Op):
    name = "swiglu"
    impls = ("torch", "triton", "liger", "compile")
    cpu_impls = ("torch", "triton")
    flop_formula = "fwd = 6*N*F (sigmoid counted as 4); bwd = 12*N*F; fwd+bwd = 18*N*F"
    byte_formula = ("fwd = 3*N*F*s (read gate, up; write y); bwd = 5*N*F*s (read dy, gate, up; write both "
                    "gradients); fwd+bwd = 8*N*F*s")
    help = "silu(gate) * up (kernels/ops.swiglu): torch, triton, liger, compile"

    def add_args(self, p):
        p.add_argument("--ffn-dim", type=int, default=None, help="F (GPU default 14336, CPU 64)")

    def fill_defaults(self, args, on_gpu):
        super().fill_defaults(args, on_gpu)
        args.ffn_dim = args.ffn_dim or (14336 if on_gpu else 64)

    def check(self, impl, args, device, dtype, mode):
        _check_elementwise("swiglu", impl, device, dtype)

    def make(self, args, T, dtype, device):
        gen = torch.Generator().manual_seed(0)
        gate, up = (torch.randn(args.batch, T, args.ffn_dim, generator=gen).to(device, dtype).requires_grad_()
                    for _ in range(2))
        return Case([gate, up], shape=f"B={args.batch} T={T} F={args.ffn_dim}", tokens=args.batch * T)

    def run(self, impl, case, args):
        from .ops import swiglu, torch_swiglu
        if impl == "compile":
            return (_compiled_fn("swiglu", torch_swiglu)(*case.inputs),)
        return (swiglu(*case.inputs, impl),)

    def reference(self, inputs32, case, args):
        from .ops import torch_swiglu
        return (torch_swiglu(*inputs32),)

    def flops(self, args, case, mode):
        return {"fwd": 6, "bwd": 12, "fwd+bwd": 18}[mode] * case.tokens * args.ffn_dim

    def bytes(self, args, case, mode, dtype):
        return {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[mode] * case.tokens * args.ffn_dim * elem_size(dtype)


class RoPE(Op):
    name = "rope"
    impls = ("torch", "triton", "compile")
    cpu_impls = ("torch", "triton")
    flop_formula = "fwd = 3*N*(H+K)*d (4 multiplies + 2 adds per pair); bwd = fwd; fwd+bwd = 2x"
    byte_formula = ("fwd = 2*N*(H+K)*d*s (read q, k; write both; the fp32 tables are T*d*4 more); bwd = fwd; "
                    "fwd+bwd = 2x")
    help = "rotary embedding of q and k (kernels/ops.rope): torch, triton, compile (no liger: other pair layout)"

    def add_args(self, p):
        p.add_argument("--heads", type=parse_heads, default=None, metavar="H/K",
                       help="query/key-value heads (GPU default 32/8, CPU 4/2)")
        p.add_argument("--head-dim", type=int, default=None, help="GPU default 128, CPU 32")

    def fill_defaults(self, args, on_gpu):
        super().fill_defaults(args, on_gpu)
        args.heads = args.heads or ((32, 8) if on_gpu else (4, 2))
        args.head_dim = args.head_dim or (128 if on_gpu else 32)

    def check(self, impl, args, device, dtype, mode):
        _check_elementwise("rope", impl, device, dtype, dim=args.head_dim, n_heads=args.heads[0],
                           n_kv_heads=args.heads[1])

    def make(self, args, T, dtype, device):
        (H, K), d, B = args.heads, args.head_dim, args.batch
        gen = torch.Generator().manual_seed(0)
        # The model's layout: projections [B, T, heads, d] seen as [B, heads, T, d] (strided leaves).
        q, k = (torch.randn(B, T, h, d, generator=gen).to(device, dtype).transpose(1, 2).requires_grad_()
                for h in (H, K))
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # training.model.rope_tables
        angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
        return Case([q, k], extra=dict(cos=angles.cos().to(device), sin=angles.sin().to(device)),
                    shape=f"B={B} H={H} K={K} T={T} d={d}", tokens=B * T)

    def run(self, impl, case, args):
        from .ops import rope, torch_rope
        q, k = case.inputs
        if impl == "compile":
            return tuple(_compiled_fn("rope", torch_rope)(q, k, case.extra["cos"], case.extra["sin"]))
        return tuple(rope(q, k, case.extra["cos"], case.extra["sin"], impl))

    def reference(self, inputs32, case, args):
        from .ops import torch_rope
        return tuple(torch_rope(*inputs32, case.extra["cos"], case.extra["sin"]))

    def flops(self, args, case, mode):
        return (2 if mode == "fwd+bwd" else 1) * 3 * case.tokens * sum(args.heads) * args.head_dim

    def bytes(self, args, case, mode, dtype):
        return (2 if mode == "fwd+bwd" else 1) * 2 * case.tokens * sum(args.heads) * args.head_dim * elem_size(dtype)


class CrossEntropy(Op):
    name, bound = "cross_entropy", "compute"
    impls = ("unfused", "chunked", "triton", "liger", "compile")
    cpu_impls = ("unfused", "chunked", "triton")
    flop_formula = ("fwd = 2*N*D*V (the logits matmul; softmax not counted); bwd = 4*N*D*V (grad hidden and grad "
                    "weight); fwd+bwd = 6*N*D*V. The fused impls compute the gradients inside a forward that "
                    "needs them: time them as fwd+bwd")
    byte_formula = ("fwd = (N*D + V*D)*s (read hidden and weight once); bwd = fwd+bwd = 2*(N*D + V*D)*s (and "
                    "write both gradients); logits never counted, which is the point of fusing")
    help = ("fused linear + cross-entropy (kernels/cross_entropy.py): unfused, chunked, triton, liger, compile "
            "(torch.compile of the unfused math); peak memory")

    def add_args(self, p):
        p.add_argument("--vocab", type=int, default=None, help="V (GPU default 128256, CPU 512)")
        p.add_argument("--dim", type=int, default=None, help="D (GPU default 4096, CPU 64)")
        p.add_argument("--z-loss", type=float, default=0.0)
        p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the impl's)")

    def fill_defaults(self, args, on_gpu):
        super().fill_defaults(args, on_gpu)
        args.vocab = args.vocab or (128256 if on_gpu else 512)
        args.dim = args.dim or (4096 if on_gpu else 64)

    def check(self, impl, args, device, dtype, mode):
        if impl != "compile":
            from .cross_entropy import check_cross_entropy_impl
            check_cross_entropy_impl(impl, device)
        if mode == "bwd" and not self.supports_bwd_alone(impl):
            raise ValueError(f"'{impl}' computes its gradients in the forward and hands them over once (no "
                             "retained-graph backward): time it as fwd+bwd")

    def supports_bwd_alone(self, impl):
        return impl in ("unfused", "compile")

    def make(self, args, T, dtype, device):
        gen = torch.Generator().manual_seed(0)
        N, D, V = args.batch * T, args.dim, args.vocab
        hidden = torch.randn(N, D, generator=gen).to(device, dtype).requires_grad_()
        # Logits of a few units, as in training.
        weight = (torch.randn(V, D, generator=gen) / math.sqrt(D)).to(device, dtype).requires_grad_()
        targets = torch.randint(0, V, (N,), generator=gen).to(device)
        return Case([hidden, weight], extra=dict(targets=targets), shape=f"N={N} D={D} V={V}", tokens=N)

    def run(self, impl, case, args):
        from .cross_entropy import fused_linear_cross_entropy
        hidden, weight = case.inputs
        if impl == "compile":
            return (_compiled_fn("cross_entropy", _plain_linear_cross_entropy)(hidden, weight, case.extra["targets"],
                                                                               args.z_loss),)
        loss, _ce = fused_linear_cross_entropy(hidden, weight, case.extra["targets"], z_loss=args.z_loss, impl=impl,
                                               chunk_size=args.chunk_size)
        return (loss,)

    def grad_outputs(self, outs, gen):
        return (torch.ones_like(outs[0]),)

    def compare(self, case, args, outs, grads, dy):
        # fp32, 1024 tokens at a time with a backward per chunk, so the reference never holds [N, V] either.
        hidden, weight = case.inputs
        targets = case.extra["targets"]
        h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        N, loss = h32.shape[0], torch.zeros((), device=hidden.device)
        with torch.enable_grad():
            for start in range(0, N, 1024):
                logits = h32[start:start + 1024] @ w32.t()
                part = F.cross_entropy(logits, targets[start:start + 1024], reduction="sum") / N
                if args.z_loss:
                    part = part + args.z_loss * logits.logsumexp(-1).square().sum() / N
                if grads is not None:
                    part.backward()
                loss += part.detach()
        return [(outs[0], loss)], ([(grads[0], h32.grad), (grads[1], w32.grad)] if grads is not None else [])

    def flops(self, args, case, mode):
        return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * case.tokens * args.dim * args.vocab

    def bytes(self, args, case, mode, dtype):
        return (1 if mode == "fwd" else 2) * (case.tokens + args.vocab) * args.dim * elem_size(dtype)


def _plain_linear_cross_entropy(hidden, weight, targets, z_loss):
    """The unfused LM head and loss in plain tensor ops (fp32 logits): what torch.compile is given."""
    logits = (hidden @ weight.t()).float()
    loss = F.cross_entropy(logits, targets)
    return loss + z_loss * logits.logsumexp(-1).square().mean() if z_loss else loss


def _sdpa_forced(impl, q, k, v, causal):
    """SDPA restricted to one backend: a backend that cannot run the case raises (the row reports it) instead
    of SDPA quietly choosing another. K/V heads are broadcast with enable_gqa where the backend takes it,
    else repeated in memory (which backends refused is remembered in _GQA_REFUSED, not reported)."""
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(_sdpa_backend(impl)):
        gqa = k.shape[1] != q.shape[1]
        if gqa and _GQA_REFUSED.get(impl):
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            gqa = False
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        except RuntimeError:
            if not gqa:
                raise
            _GQA_REFUSED[impl] = True  # this backend has no GQA: from now on repeat K/V heads for it
            return _sdpa_forced(impl, q, k, v, causal)


def _plain_attention(q, k, v, causal):
    """softmax(QK^T / sqrt(d)) V in plain tensor ops, K/V heads repeated: what torch.compile is given."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        T = q.shape[2]
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _sdpa_backend(impl: str):
    from torch.nn.attention import SDPBackend
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[impl]


_GQA_REFUSED: dict[str, bool] = {}
_COMPILED = {}


def _compiled_fn(name, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def _check_elementwise(op, impl, device, dtype, **sizes):
    if impl == "compile":
        return
    from .ops import check_op_impl
    check_op_impl(op, impl, device, dtype=dtype, **sizes)


OPS = {op.name: op for op in (Attention(), RMSNorm(), SwiGLU(), RoPE(), CrossEntropy())}
