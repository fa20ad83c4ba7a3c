"""`keel bench`: time attention backends against each other and against an fp32 reference.

Shape legend: B batch, H query heads, K key/value heads, T sequence, d head dim.

On a GPU: median of CUDA-event timings over warmed-up repetitions, L2 flushed before each, TFLOP/s
from the stated formula, max error vs fp32. Without a GPU it says so and runs only the CPU
reference (SDPA) and the Triton interpreter on small shapes; those times say nothing about GPUs.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import torch

FLOP_FORMULA = ("forward FLOPs = 4*B*H*T*T*d (QK^T and PV, 2 FLOPs per multiply-add), x0.5 when causal; "
                "forward+backward = 3.5x forward (backward = 5 matmuls vs 2; recomputation not counted)")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_flops(B, H, T, d, causal: bool, backward: bool) -> float:
    fwd = 4.0 * B * H * T * T * d * (0.5 if causal else 1.0)
    return fwd * 3.5 if backward else fwd


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark attention kernels (GPU timings; CPU: reference only)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="sdpa,triton,flash_attn,cuda",
                   help="comma-separated attention impls; unavailable ones are reported and skipped")
    p.add_argument("--seqlens", default=None, help="comma-separated T (default GPU 1024..8192, CPU 64,128)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backward", action=argparse.BooleanOptionalAction, default=False,
                   help="time forward+backward instead of forward only")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="runs/bench", help="directory for bench.csv and bench.png")
    p.set_defaults(func=run_bench)
    return p


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


def _reference_error(out_BHTd, q, k, v, causal) -> float:
    """Max abs error vs fp32 SDPA (math backend) on batch 0 and the first KV group, to bound memory."""
    group = q.shape[1] // k.shape[1]
    q0, k0, v0 = (x[:1, :n].float() for x, n in ((q, group), (k, 1), (v, 1)))
    ref = torch.nn.functional.scaled_dot_product_attention(q0, k0.expand(-1, group, -1, -1),
                                                           v0.expand(-1, group, -1, -1), is_causal=causal)
    return (out_BHTd[:1, :group].float() - ref).abs().max().item()


def run_bench(args) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # Must precede the first import of triton_attention: it picks configs by this at import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("No CUDA device: running only the CPU reference (sdpa) and the Triton interpreter on small "
              "shapes. These times are not GPU performance; TFLOP/s is not reported.")
    from .attention import attention, check_attention_impl

    dtype = _DTYPES[args.dtype]
    seqlens = [int(s) for s in (args.seqlens or ("1024,2048,4096,8192" if on_gpu else "64,128")).split(",")]
    batch = args.batch or (4 if on_gpu else 1)
    heads, kv_heads, d = args.heads, args.kv_heads, args.head_dim
    if not on_gpu:
        heads, kv_heads = min(heads, 4), min(kv_heads, 2)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    device = "cuda" if on_gpu else "cpu"
    print(f"shape B={batch} H={heads} K={kv_heads} d={d} dtype={args.dtype} causal={args.causal} "
          f"{'fwd+bwd' if args.backward else 'fwd'}; {FLOP_FORMULA}")

    rows = []
    for impl in impls:
        try:
            check_attention_impl(impl, d, dtype, device, requires_grad=args.backward)
        except ValueError as exc:
            print(f"skip {impl}: {exc}")
            continue
        for T in seqlens:
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(batch, h, T, d, generator=gen, device=device, dtype=dtype)
                       for h in (heads, kv_heads, kv_heads))
            if args.backward:
                q, k, v = (x.requires_grad_() for x in (q, k, v))

            def step():
                out = attention(q, k, v, causal=args.causal, impl=impl)
                if args.backward:
                    out.backward(torch.ones_like(out))
                return out

            with torch.set_grad_enabled(args.backward):
                out = step()
                ms = (_time_gpu if on_gpu else _time_cpu)(step, args.warmup if on_gpu else 1,
                                                          args.reps if on_gpu else 3)
            flops = attention_flops(batch, heads, T, d, args.causal, args.backward)
            rows.append(dict(impl=impl, T=T, ms=round(ms, 4),
                             tflops=round(flops / ms / 1e9, 2) if on_gpu else None,
                             max_err=float(f"{_reference_error(out.detach(), q.detach(), k.detach(), v.detach(), args.causal):.3g}"),
                             device=torch.cuda.get_device_name() if on_gpu else "cpu"))
    _report(rows, Path(args.out), on_gpu)
    return rows


def _report(rows, out_dir: Path, on_gpu: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="attention benchmark" + ("" if on_gpu else " (CPU: not GPU performance)"))
    for col in ("impl", "T", "ms", "TFLOP/s", "max err vs fp32"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["impl"], str(r["T"]), f"{r['ms']:.3f}", "-" if r["tflops"] is None else f"{r['tflops']:.1f}",
                      f"{r['max_err']:.2e}")
    Console().print(table)
    if not rows:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = "tflops" if on_gpu else "ms"
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = [(r["T"], r[metric]) for r in rows if r["impl"] == impl]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("TFLOP/s" if on_gpu else "ms per call (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=120)
    print(f"wrote {out_dir / 'bench.csv'} and {out_dir / 'bench.png'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="keel")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
