"""`keel bench OP`: time each op's kernels against each other and against an fp32 reference.

    keel bench attention --dtype bf16 --seqlen 512,1k,2k,4k,8k,16k --heads 32/8 --head-dim 128 --causal \\
        --impl triton,cuda,sdpa,flash_attn --mode fwd,bwd,fwd+bwd
    keel bench rmsnorm --dim 4096            keel bench swiglu --ffn-dim 14336
    keel bench rope --heads 32/8 --head-dim 128
    keel bench cross_entropy --vocab 128256 --dim 4096 --impl unfused,chunked,triton,liger
    keel bench step configs/tiny.yaml [--set key=value ...]     (whole training steps: launcher/bench_step.py)

Shape legend: B batch, T sequence, H query heads, K key/value heads, d head dim, D model dim, F ffn hidden
size, V vocabulary, N = B*T tokens, s bytes per element. The ops themselves (shapes, formulas, references)
are bench_ops.py's registry; this file is the harness that times them and reports.

On a GPU, for each case: the median of CUDA-event timings over warmed-up repetitions, each preceded by
overwriting a 256 MB buffer so that none starts with a warm L2; TFLOP/s from the op's printed FLOP formula
(causal attention counts half); GB/s from its printed byte formula (the least traffic: every input read and
every output written once); % of the device's peak (compute-bound ops: the published bf16 dense peak, or
a measured fp32 matmul peak for fp32, as MFU uses; memory-bound ops: the published memory bandwidth; both
from kernels/peaks.py); peak memory (max_memory_allocated during one call, its inputs included); and
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
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .bench_ops import MODES, OPS, Case, Op, elem_size, max_err, parse_list, parse_modes, parse_sizes

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NO_GPU = ("No CUDA device: running only the CPU reference and the Triton interpreter on small shapes. These "
          "times are not GPU performance; TFLOP/s, GB/s, % of peak and peak memory are not reported.")




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
    from .peaks import peak_bandwidth, peak_flops  # the figures MFU uses
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
        print(f"bytes (s = {elem_size(dtype)}): {op.byte_formula}")
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
    report_rows(rows, op, Path(args.out), on_gpu)
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
        errors = {m: max_err((out_pairs if m != "bwd" else []) + (grad_pairs if m != "fwd" else [])) for m in modes}
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
# Output

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_rows(rows: list[dict], op: Op | None, out_dir: Path, on_gpu: bool) -> None:
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

def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=parse_sizes, default=None, metavar="T,...",
                   help="sequence lengths, k = 1024 (GPU default 512,1k,2k,4k,8k,16k; CPU 32,64)")
    p.add_argument("--out", default="runs/bench", help="directory for OP.csv and OP.png")


def add_bench_parser(subparsers) -> argparse._SubParsersAction:
    """`keel bench OP`, one sub-command per op; returns the sub-commands, which `keel bench step` (whole
    training steps: launcher/bench_step.py, as it runs the trainer) joins."""
    p = subparsers.add_parser("bench", help="benchmark kernels per op, or whole training steps (GPU timings; "
                              "CPU: reference and interpreter only)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    for op in OPS.values():
        q = ops.add_parser(op.name, help=op.help, description=f"{op.help}. FLOPs: {op.flop_formula}."
                           + (f" Bytes: {op.byte_formula}." if op.byte_formula else ""))
        add_common_args(q)
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
    return ops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="keel")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
