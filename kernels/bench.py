"""`keel bench OP`: time each op's kernels against each other and against an fp32 reference.

    keel bench attention --dtype bf16 --seqlen 512,1k,2k,4k,8k,16k --heads 32/8 --head-dim 128 --causal \\
        --impl triton,cuda,sdpa,flash_attn --mode fwd,bwd,fwd+bwd
    keel bench rmsnorm --dim 4096            keel bench swiglu --ffn-dim 14336
    keel bench rope --heads 32/8 --head-dim 128
    keel bench cross_entropy --vocab 128256 --dim 4096 --impl unfused,chunked,triton,liger
    keel bench step configs/tiny.yaml [--set key=value ...]     (whole training steps of a config)

Shape legend: B batch, T sequence, H query heads, K key/value heads, d head dim, D model dim, F ffn hidden
size, V vocabulary, N = B*T tokens, s bytes per element.

On a GPU, for each case: the median of CUDA-event timings over warmed-up repetitions, each preceded by
overwriting a 256 MB buffer so that none starts with a warm L2; TFLOP/s from the op's printed FLOP formula
(causal attention counts half); GB/s from its printed byte formula (the least traffic: every input read and
every output written once); % of the device's peak (compute-bound ops: the published bf16 dense peak, or
a measured fp32 matmul peak for fp32, as MFU uses; memory-bound ops: the published memory bandwidth; both
from training/device.py); peak memory (max_memory_allocated during one call, its inputs included); and
the max abs error against an fp32 reference on the same inputs. Modes: fwd (under no_grad: inference),
bwd (the backward of one retained forward graph), fwd+bwd.

Without a GPU it says so and runs only the CPU reference and the Triton interpreter, on small shapes:
those times say nothing about GPUs, so the FLOP/s, bandwidth, % of peak and memory columns stay empty.
Output: a rich table, OUT/OP.csv and OUT/OP.png (TFLOP/s, or GB/s for memory-bound ops, against the
sequence length, one line per impl and one panel per mode; ms per call on CPU).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
NO_GPU = ("No CUDA device: running only the CPU reference and the Triton interpreter on small shapes. These "
          "times are not GPU performance; TFLOP/s, GB/s, % of peak and peak memory are not reported.")


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


def _elem(dtype: torch.dtype) -> int:
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


def _max_err(pairs) -> tuple[float, float]:
    """(max abs error, the reference's largest magnitude) over (value, reference) pairs."""
    err = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    scale = max(b.float().abs().max().item() for _, b in pairs)
    return err, scale


class Attention(Op):
    name, bound = "attention", "compute"
    impls = ("sdpa", "triton", "cuda", "flash_attn")
    cpu_impls = ("sdpa", "triton")
    flop_formula = ("fwd = 4*B*H*T*T*d (QK^T and PV, 2 FLOPs per multiply-add), x0.5 when causal; bwd = 2.5x fwd "
                    "(5 matmuls vs 2; recomputation not counted); fwd+bwd = 3.5x fwd")
    help = "attention backends (attention(impl=...)): sdpa, triton, cuda (forward only), flash_attn"

    def add_args(self, p):
        p.add_argument("--heads", type=parse_heads, default=None, metavar="H/K",
                       help="query/key-value heads (GPU default 32/8, CPU 4/2)")
        p.add_argument("--head-dim", type=int, default=None, help="GPU default 128, CPU 32")
        p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)

    def fill_defaults(self, args, on_gpu):
        args.heads = args.heads or ((32, 8) if on_gpu else (4, 2))
        args.head_dim = args.head_dim or (128 if on_gpu else 32)

    def check(self, impl, args, device, dtype, mode):
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
        from .attention import attention
        q, k, v = case.inputs
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
        return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * case.tokens * args.dim * _elem(dtype)


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
        return {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[mode] * case.tokens * args.ffn_dim * _elem(dtype)


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
        return (2 if mode == "fwd+bwd" else 1) * 2 * case.tokens * sum(args.heads) * args.head_dim * _elem(dtype)


class CrossEntropy(Op):
    name, bound = "cross_entropy", "compute"
    impls = ("unfused", "chunked", "triton", "liger")
    cpu_impls = ("unfused", "chunked", "triton")
    flop_formula = ("fwd = 2*N*D*V (the logits matmul; softmax not counted); bwd = 4*N*D*V (grad hidden and grad "
                    "weight); fwd+bwd = 6*N*D*V. The fused impls compute the gradients inside a forward that "
                    "needs them: time them as fwd+bwd")
    byte_formula = ("fwd = (N*D + V*D)*s (read hidden and weight once); bwd = fwd+bwd = 2*(N*D + V*D)*s (and "
                    "write both gradients); logits never counted, which is the point of fusing")
    help = "fused linear + cross-entropy (kernels/cross_entropy.py): unfused, chunked, triton, liger; peak memory"

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
        from .cross_entropy import check_cross_entropy_impl
        check_cross_entropy_impl(impl, device)
        if mode == "bwd" and not self.supports_bwd_alone(impl):
            raise ValueError(f"'{impl}' computes its gradients in the forward and hands them over once (no "
                             "retained-graph backward): time it as fwd+bwd")

    def supports_bwd_alone(self, impl):
        return impl == "unfused"

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
        return (1 if mode == "fwd" else 2) * (case.tokens + args.vocab) * args.dim * _elem(dtype)


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


# ---------------------------------------------------------------------------------------------------
# Timing and measuring

def _time_gpu(fn, warmup: int, reps: int) -> float:
    # 256 MB scratch, larger than any L2 (H100: 50 MB), rewritten before each rep so no rep starts warm.
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _time_cpu(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_memory_mib(fn) -> float:
    """max_memory_allocated during one call, with what is already allocated (its inputs) included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _callable(op: Op, impl: str, case: Case, args, mode: str, dy):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return op.run(impl, case, args)
        return fwd
    if mode == "bwd":
        outs = op.run(impl, case, args)  # one forward graph, kept; each call differentiates it again
        return lambda: torch.autograd.grad(outs, case.inputs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(op.run(impl, case, args), case.inputs, dy)


@dataclass
class Peaks:
    flops: float | None
    flops_source: str
    bandwidth: float | None
    bandwidth_source: str


def _device_peaks(on_gpu: bool, dtype) -> Peaks | None:
    if not on_gpu:
        return None
    from ..training.device import peak_bandwidth, peak_flops  # the table MFU uses
    device = torch.device("cuda", torch.cuda.current_device())
    flops, flops_source = peak_flops(device, "fp32" if dtype == torch.float32 else "bf16")
    bandwidth, bandwidth_source = peak_bandwidth(device)
    return Peaks(flops, flops_source, bandwidth, bandwidth_source)


def run_op(args) -> list[dict]:
    op: Op = OPS[args.op]
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # Before the first import of a Triton kernel module: they pick their configs by it at import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(NO_GPU)
    device = "cuda" if on_gpu else "cpu"
    dtype = _DTYPES[args.dtype]
    op.fill_defaults(args, on_gpu)
    seqlens = args.seqlen or ([512, 1024, 2048, 4096, 8192, 16384] if on_gpu else [32, 64])
    impls = args.impl or list(op.impls if on_gpu else op.cpu_impls)
    modes = args.mode or list(MODES)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    reps = args.reps if args.reps is not None else (20 if on_gpu else 3)
    peaks = _device_peaks(on_gpu, dtype)
    device_label = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"{op.name} on {device_label}, {args.dtype}; FLOPs: {op.flop_formula}")
    if op.byte_formula:
        print(f"bytes (s = {_elem(dtype)}): {op.byte_formula}")
    if peaks:
        against = (f"{peaks.flops / 1e12:.0f} TFLOP/s ({peaks.flops_source})" if op.bound == "compute" else
                   f"{peaks.bandwidth / 1e9:.0f} GB/s ({peaks.bandwidth_source})" if peaks.bandwidth else
                   f"nothing ({peaks.bandwidth_source})")
        print(f"% of peak: against {against}")
    print(f"median of {reps} timed calls after {warmup} warm-up calls; error: max abs vs an fp32 reference on the "
          f"same inputs")

    rows = []
    for impl in impls:
        runnable = []
        for mode in modes:
            try:
                if impl not in op.impls:
                    raise ValueError(f"unknown impl; {op.name} has {', '.join(op.impls)}")
                op.check(impl, args, device, dtype, mode)
                runnable.append(mode)
            except ValueError as exc:
                print(f"skip {impl} {mode}: {exc}")
        if not runnable:
            continue
        for T in seqlens:
            rows += _run_case(op, impl, T, runnable, args, device, dtype, on_gpu, peaks, warmup, reps, device_label)
            if on_gpu:
                torch.cuda.empty_cache()
    _report(rows, op, Path(args.out), on_gpu)
    return rows


def _failure(exc: Exception) -> str:
    """A row's note for a case that could not run. Out of memory is a result (the cross-entropy headline);
    any other error is reported and the sweep goes on, since most GPU paths here have never run."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(text)
    return text


def _run_case(op, impl, T, modes, args, device, dtype, on_gpu, peaks, warmup, reps, device_label) -> list[dict]:
    base = dict(op=op.name, impl=impl, seqlen=T, dtype=args.dtype, device=device_label)
    note = None
    try:
        case = op.make(args, T, dtype, device)
        gen = torch.Generator().manual_seed(1)
        # One checked call: outputs (and gradients, if a timed mode has a backward) against the reference.
        need_grads = any(m != "fwd" for m in modes)
        with torch.set_grad_enabled(need_grads):
            outs = op.run(impl, case, args)
        dy = op.grad_outputs(outs, gen)
        grads = torch.autograd.grad(outs, case.inputs, dy) if need_grads else None
        out_pairs, grad_pairs = op.compare(case, args, tuple(o.detach() for o in outs), grads, dy)
        errors = {m: _max_err((out_pairs if m != "bwd" else []) + (grad_pairs if m != "fwd" else [])) for m in modes}
        del outs, grads, out_pairs, grad_pairs
    except Exception as exc:  # noqa: BLE001  (see _failure)
        note = _failure(exc)
    if note is not None:  # outside the except: its traceback no longer holds the tensors
        if on_gpu:
            torch.cuda.empty_cache()
        return [dict(base, mode=m, note=note) for m in modes]
    rows = []
    for mode in modes:
        row = dict(base, mode=mode, shape=case.shape, ms=None, tflops=None, gbps=None, pct_peak=None,
                   peak_mem_mib=None, max_err=None, tol=None, ok=None, note="")
        err, scale = errors[mode]
        tol = op.tolerance(dtype) * max(1.0, scale)
        row.update(max_err=float(f"{err:.3g}"), tol=float(f"{tol:.3g}"), ok=err <= tol)
        try:
            fn = _callable(op, impl, case, args, mode, dy)
            if on_gpu:
                fn()  # compile / autotune outside the memory measurement
                row["peak_mem_mib"] = round(_peak_memory_mib(fn), 1)
                ms = _time_gpu(fn, warmup, reps)
            else:
                ms = _time_cpu(fn, warmup, reps)
        except Exception as exc:  # noqa: BLE001
            row["note"] = _failure(exc)
        fn = None
        if row["note"]:
            if on_gpu:
                torch.cuda.empty_cache()
            rows.append(row)
            continue
        row["ms"] = round(ms, 4)
        if on_gpu:
            row.update(rates(op, args, case, mode, dtype, ms, peaks))
        rows.append(row)
    return rows


def rates(op: Op, args, case: Case, mode: str, dtype, ms: float, peaks: Peaks) -> dict:
    """TFLOP/s, GB/s and % of the device's peak (FLOP/s for compute-bound ops, bandwidth for the others)."""
    tflops = op.flops(args, case, mode) / ms / 1e9
    nbytes = op.bytes(args, case, mode, dtype)
    gbps = nbytes / ms / 1e6 if nbytes is not None else None
    if op.bound == "compute":
        pct = 100 * tflops * 1e12 / peaks.flops
    else:
        pct = 100 * gbps * 1e9 / peaks.bandwidth if peaks.bandwidth and gbps is not None else None
    return dict(tflops=float(f"{tflops:.4g}"), gbps=None if gbps is None else round(gbps, 1),
                pct_peak=None if pct is None else round(pct, 1))


# ---------------------------------------------------------------------------------------------------
# `keel bench step`: whole training steps of a config, through the trainer itself

STEP_FLOPS = "6*N_matmul_weights + 6*L*H*d*T per token (causal attention counted at half; training/flops.py)"


def run_step(args) -> list[dict]:
    """Train `--steps` steps of CONFIG on this machine in one process (keel's own loop and engine) and
    report the median step time over the steps after `--warmup`, tokens/s, TFLOP/s, MFU and peak memory."""
    import json
    import tempfile

    from ..training.config import load_config
    from ..training.device import peak_flops, pick_device
    from ..training.flops import training_flops_per_token
    from ..training.loop import train

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print("No CUDA device: timing training steps on the CPU (MFU against this CPU's measured matmul peak).")
    steps = args.steps or (20 if on_gpu else 4)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    if steps <= warmup:
        raise SystemExit(f"keel bench step: --steps {steps} must exceed --warmup {warmup}")
    out_dir = Path(args.out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="keel-bench-step-") as runs:
        # The bench's settings first, so that --set can change any of them; then the measured sizes.
        fixed = ["train.eval_every=0", "train.eval_batches=1", "checkpoint.interval=0", "checkpoint.resume=never",
                 "logging.progress=false", "logging.wandb.mode=disabled", "logging.log_every=1000000",
                 f"train.output_dir={runs}"]
        base = load_config(args.config, [*fixed, *args.overrides])
        name = Path(args.config).stem
        print(f"keel bench step {args.config}: {steps} steps, median over the last {steps - warmup}; "
              f"FLOPs: {STEP_FLOPS}")
        for T in (args.seqlen or [base.data.seq_len]):
            sizes = [f"data.seq_len={T}", f"train.steps={steps}", f"train.name={name}-T{T}"]
            if T > base.model.max_seq_len:
                sizes.append(f"model.max_seq_len={T}")
            cfg = load_config(args.config, [*fixed, *args.overrides, *sizes])
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()  # each sequence length's own peak
            summary = train(cfg)
            records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
            steps_run = [r for r in records if r["kind"] == "step"]
            step_s = statistics.median(r["step_s"] for r in steps_run[warmup:])
            tokens = cfg.train.global_batch_size * T
            device = pick_device(cfg.train.device)
            peak, source = peak_flops(device, cfg.train.precision)
            flops_per_s = training_flops_per_token(cfg.model, T) * tokens / step_s
            rows.append(dict(
                op="step", impl=name, mode="step", seqlen=T, dtype=cfg.train.precision,
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                shape=f"B={cfg.train.global_batch_size} T={T} params={_params(cfg)}",
                ms=round(step_s * 1e3, 3), tokens_per_s=round(tokens / step_s, 1),
                tflops=float(f"{flops_per_s / 1e12:.4g}"), gbps=None, pct_peak=round(100 * flops_per_s / peak, 2),
                peak_mem_mib=round(max(r["peak_mem_gb"] for r in steps_run) * 1e9 / 2**20, 1),
                max_err=None, tol=None, ok=None,
                note=f"{tokens / step_s:,.0f} tok/s; final loss {summary.final_loss:.4f}; MFU vs {source}"
                     + ("; memory is the process's max RSS" if device.type != "cuda" else "")))
    _report(rows, None, out_dir, on_gpu)
    return rows


def _params(cfg) -> str:
    from ..training.flops import count_params
    n = count_params(cfg.model).total
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ---------------------------------------------------------------------------------------------------
# Output

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _report(rows: list[dict], op: Op | None, out_dir: Path, on_gpu: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    name = op.name if op else "step"
    table = Table(title=f"keel bench {name}" + ("" if on_gpu or not op else " (CPU: not GPU performance)"))
    columns = {  # header: (CSV key, format); a column with nothing in it is left out
        "impl": ("impl", "s"), "mode": ("mode", "s"), "shape": ("shape", "s"), "ms": ("ms", ".3f"),
        "TFLOP/s": ("tflops", ".3g"), "GB/s": ("gbps", ".0f"), "% peak": ("pct_peak", ".1f"),
        "peak MiB": ("peak_mem_mib", ".0f"), "max err": ("max_err", ".2e"), "ok": ("ok", ""), "note": ("note", "s")}
    shown = {h: kf for h, kf in columns.items() if any(r.get(kf[0]) not in (None, "") for r in rows)}
    for header in shown:
        table.add_column(header, justify="left" if shown[header][1] == "s" else "right")
    for r in rows:
        cells = []
        for key, spec in shown.values():
            value = r.get(key)
            if key == "ok":
                cells.append("-" if value is None else ("yes" if value else "[red]NO[/]"))
            else:
                cells.append(str(value) if spec == "s" and value is not None else _fmt(value, spec))
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file: do not squeeze the table into 80 columns
    console.print(table)
    if not rows:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, op, out_dir / f"{name}.png", on_gpu)
    print(f"wrote {out_dir / f'{name}.csv'} and {out_dir / f'{name}.png'}")


def _plot(rows, op: Op | None, path: Path, on_gpu: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if op is None:
        metric, label = ("tflops", "TFLOP/s (model FLOPs)")
    elif not on_gpu:
        metric, label = "ms", "ms per call (CPU)"
    elif op.bound == "memory":
        metric, label = "gbps", "GB/s"
    else:
        metric, label = "tflops", "TFLOP/s"
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["seqlen"], r[metric]) for r in rows
                   if r["impl"] == impl and r["mode"] == mode and r.get(metric) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        if metric == "ms":
            ax.set_yscale("log")  # the interpreter is orders of magnitude slower than the reference
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.set_title(f"{op.name if op else 'training step'} {mode}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Command line

def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=parse_sizes, default=None, metavar="T,...",
                   help="sequence lengths, k = 1024 (GPU default 512,1k,2k,4k,8k,16k; CPU 32,64)")
    p.add_argument("--out", default="runs/bench", help="directory for OP.csv and OP.png")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark kernels per op, or whole training steps (GPU timings; "
                              "CPU: reference and interpreter only)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    for op in OPS.values():
        q = ops.add_parser(op.name, help=op.help, description=f"{op.help}. FLOPs: {op.flop_formula}."
                           + (f" Bytes: {op.byte_formula}." if op.byte_formula else ""))
        _common_args(q)
        q.add_argument("--impl", type=parse_list, default=None, metavar="A,B",
                       help=f"impls to compare (GPU default {','.join(op.impls)}; CPU {','.join(op.cpu_impls)}); "
                            "unavailable ones are reported and skipped")
        q.add_argument("--mode", type=parse_modes, default=None, metavar="M,...",
                       help="fwd, bwd, fwd+bwd (default all three)")
        q.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
        q.add_argument("--batch", type=int, default=None)
        q.add_argument("--warmup", type=int, default=None, help="untimed calls first (GPU default 5, CPU 1)")
        q.add_argument("--reps", type=int, default=None, help="timed calls (GPU default 20, CPU 3)")
        op.add_args(q)
        q.set_defaults(func=run_op)
    q = ops.add_parser("step", help="whole training steps of a config on this machine (one process): tokens/s, "
                       "MFU, peak memory", description=run_step.__doc__)
    q.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    _common_args(q)
    q.add_argument("--steps", type=int, default=None, help="steps per run (GPU default 20, CPU 4)")
    q.add_argument("--warmup", type=int, default=None, help="first steps left out of the median (GPU 3, CPU 1)")
    q.set_defaults(func=run_step)
    return p


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="keel")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
