"""Claim (issue 8): the chunked fused linear + cross-entropy cuts the peak memory of an LM-head step with a
128k vocabulary by >= 2x against the unfused one.

One step = forward + backward of `loss = cross_entropy(hidden @ W^T, targets)` (kernels/cross_entropy.py's
fused_linear_cross_entropy) for N tokens, model dim D and the Llama-3 vocabulary V = 128256, measured for each
implementation in the same run:
  unfused  the [N, V] fp32 logits, then the loss (what the model does with model.cross_entropy.impl=unfused)
  chunked  the chunked algorithm in PyTorch (default chunk size: 256 MiB of fp32 logits)
  triton   the same with the Triton softmax kernel (CUDA only; the interpreter is far too slow for this size)
  liger    Liger-Kernel's fused linear + cross-entropy (CUDA, if liger-kernel is installed)
Peak memory is what the step adds on top of its inputs (hidden, W, targets already allocated), gradients
included:
  CUDA  torch.cuda.max_memory_allocated() minus memory_allocated() before the step.
  CPU   each implementation in a fresh process: peak resident set size after the step (getrusage ru_maxrss,
        with the high-water mark reset through /proc/self/clear_refs first where Linux allows) minus the
        resident set size just before it. A fresh process per implementation, so one's peak cannot hide
        the other's.
Time per step: the median of --steps steps after the measured one (which is reported apart: on CPU it also
pays for first-touching its memory in a fresh process; on CUDA a warm-up step runs before it).

    python benchmarks/cross_entropy_memory.py [--tokens 2048] [--dim 1024] [--vocab 128256] [--steps 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from keel.kernels.cross_entropy import default_chunk_size, fused_linear_cross_entropy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(args, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.tokens, args.dim, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, generator=gen) / args.dim ** 0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    return hidden, weight, targets


def step(impl, hidden, weight, targets, chunk_size) -> float:
    hidden.grad = weight.grad = None
    loss, _ = fused_linear_cross_entropy(hidden, weight, targets, impl=impl, chunk_size=chunk_size)
    loss.backward()
    return loss.item()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_cpu_child(args) -> dict:
    """Runs in a fresh process: one implementation, one measured step, then the timed ones."""
    torch.set_num_threads(args.threads)
    hidden, weight, targets = make_inputs(args, "cpu")
    # Warm up at a small vocabulary: first-call costs (thread pools, kernel selection) stay out of the peak.
    step(args.impl, hidden[:64].detach().requires_grad_(), weight[:512].detach().requires_grad_(),
         targets[:64] % 512, None)
    hidden.grad = weight.grad = None
    try:  # reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = rss_bytes()
    t0 = time.perf_counter()
    loss = step(args.impl, hidden, weight, targets, args.chunk_size)
    times = [time.perf_counter() - t0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(args.impl, hidden, weight, targets, args.chunk_size)
        times.append(time.perf_counter() - t0)
    return dict(peak_bytes=peak - before, loss=loss, first_s=times[0], step_s=statistics.median(times[1:] or times),
                hwm_reset=reset)


def measure_cpu(impl, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_cuda(impl, args, device) -> dict:
    hidden, weight, targets = make_inputs(args, device)
    step(impl, hidden, weight, targets, args.chunk_size)  # warm-up: Triton compiles, cuBLAS picks kernels
    hidden.grad = weight.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    loss = step(impl, hidden, weight, targets, args.chunk_size)
    torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - before
    times = []
    for _ in range(max(1, args.steps)):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(impl, hidden, weight, targets, args.chunk_size)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return dict(peak_bytes=peak, loss=loss, first_s=first, step_s=statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="N, tokens in the step (batch x sequence)")
    parser.add_argument("--dim", type=int, default=1024, help="D, model dim")
    parser.add_argument("--vocab", type=int, default=128256, help="V (Llama-3: 128256)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.child:
        print(json.dumps(measure_cpu_child(argparse.Namespace(**{**vars(args), "impl": args.child}))))
        return

    impls = ["unfused", "chunked"]
    if cuda:
        import importlib.util
        impls.append("triton")
        if importlib.util.find_spec("liger_kernel"):
            impls.append("liger")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    machine = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()} x{os.cpu_count()} cores"
    chunk = args.chunk_size or default_chunk_size(args.tokens, args.vocab)
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"LM head + loss, one forward+backward: N={args.tokens} tokens, D={args.dim}, V={args.vocab}, {args.dtype}, "
          f"chunk {chunk} tokens; full fp32 logits {logits_mib:,.0f} MiB | {machine}, torch {torch.__version__}"
          f"{'' if cuda else f', {args.threads} threads'}")
    rows = []
    for impl in impls:
        r = measure_cuda(impl, args, device) if cuda else measure_cpu(impl, args)
        rows.append(dict(impl=impl, device=device.type, tokens=args.tokens, dim=args.dim, vocab=args.vocab,
                         dtype=args.dtype, chunk_size=chunk if impl in ("chunked", "triton") else "",
                         peak_mib=round(r["peak_bytes"] / 2**20, 1), step_s=round(r["step_s"], 3),
                         first_step_s=round(r["first_s"], 3), loss=round(r["loss"], 6)))
        print(f"  {impl:8s} peak +{r['peak_bytes'] / 2**20:8,.0f} MiB   {r['step_s']:7.3f} s/step "
              f"(measured step {r['first_s']:.3f} s)   loss {r['loss']:.6f}", flush=True)
    base = rows[0]
    for row in rows:
        row["memory_ratio_vs_unfused"] = round(base["peak_mib"] / row["peak_mib"], 2)
        row["time_ratio_vs_unfused"] = round(row["step_s"] / base["step_s"], 2)
    for row in rows[1:]:
        verdict = "PASS" if row["memory_ratio_vs_unfused"] >= 2 else "FAIL"
        print(f"  unfused / {row['impl']} peak memory: {row['memory_ratio_vs_unfused']:.2f}x ({verdict}, "
              f"target >= 2x); "
              f"time {row['time_ratio_vs_unfused']:.2f}x unfused's; loss differs by "
              f"{abs(row['loss'] - base['loss']) / abs(base['loss']):.1e} (relative)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cross_entropy_memory.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    colors = ["#999999"] + ["#3a7bd5"] * (len(rows) - 1)
    bars = ax.bar([r["impl"] for r in rows], [r["peak_mib"] for r in rows], color=colors)
    ax.bar_label(bars, labels=[f"{r['peak_mib']:,.0f} MiB" for r in rows])
    ax.set_ylabel("peak memory added by the step (MiB)")
    ax.set_title(f"LM head + loss, N={args.tokens}, D={args.dim}, V={args.vocab}, {args.dtype}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "cross_entropy_memory.png", dpi=120)
    print(f"wrote {RESULTS / 'cross_entropy_memory.png'}")


if __name__ == "__main__":
    main()
