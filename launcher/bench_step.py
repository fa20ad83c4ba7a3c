"""`keel bench step`: whole training steps of a config, through the trainer itself (one process), reported
like the per-op benchmarks of kernels/bench.py: median step time, tokens/s, TFLOP/s, MFU, peak memory.

With --baseline, the same steps also run in a bare PyTorch loop (below) in the same process, and each row
says how fast keel's trainer is against it: what the trainer's data loader, stability judge, logging and
checkpoint bookkeeping cost."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels.bench import add_common_args, report_rows
from ..parallel.data_parallel import apply_compile
from ..parallel.engine import adamw
from ..training.config import load_config
from ..training.device import autocast, peak_flops, pick_device
from ..training.flops import count_params, training_flops_per_token
from ..training.loop import train
from ..training.metrics import peak_memory_gb
from ..training.model import build_model

STEP_FLOPS = "6*N_matmul_weights + 6*L*H*d*T per token (causal attention counted at half; training/flops.py)"


def run_step(args) -> list[dict]:
    """Train `--steps` steps of CONFIG on this machine in one process (keel's own loop and engine) and
    report the median step time over the steps after `--warmup`, tokens/s, TFLOP/s, MFU and peak memory."""
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
            peak_gb = max(r["peak_mem_gb"] for r in steps_run)
            # Measured once per run where the device has no published peak (a CPU): both rows share it.
            peak = peak_flops(pick_device(cfg.train.device), cfg.train.precision)
            row = _row(cfg, peak, name, step_s, peak_gb, f"final loss {summary.final_loss:.4f}")
            rows.append(row)
            if args.baseline:
                bare_s, bare_peak_gb, bare_loss = bare_loop(cfg, steps, warmup)
                bare = _row(cfg, peak, f"{name} bare PyTorch loop", bare_s, bare_peak_gb,
                            f"final loss {bare_loss:.4f}")
                ratio = bare_s / step_s  # keel tokens/s over the bare loop's
                row.update(vs_bare=round(ratio, 4), note=row["note"] + f"; keel/bare {ratio:.3f}")
                rows.append(bare)
    report_rows(rows, None, out_dir, on_gpu)
    return rows


def _row(cfg, peak_and_source: tuple[float, str], impl: str, step_s: float, peak_gb: float, note: str) -> dict:
    T, tokens = cfg.data.seq_len, cfg.train.global_batch_size * cfg.data.seq_len
    device = pick_device(cfg.train.device)
    peak, source = peak_and_source
    flops_per_s = training_flops_per_token(cfg.model, T) * tokens / step_s
    return dict(
        op="step", impl=impl, mode="step", seqlen=T, dtype=cfg.train.precision,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        shape=f"B={cfg.train.global_batch_size} T={T} params={_params(cfg)}",
        ms=round(step_s * 1e3, 3), tokens_per_s=round(tokens / step_s, 1),
        tflops=float(f"{flops_per_s / 1e12:.4g}"), gbps=None, pct_peak=round(100 * flops_per_s / peak, 2),
        peak_mem_mib=round(peak_gb * 1e9 / 2**20, 1), max_err=None, tol=None, ok=None,
        note=f"{tokens / step_s:,.0f} tok/s; {note}; MFU vs {source}"
             + ("; memory is the process's max RSS" if device.type != "cuda" else ""))


def bare_loop(cfg, steps: int, warmup: int) -> tuple[float, float, float]:
    """The same model, optimizer, precision and batch in the loop anyone would write by hand: random tokens
    already on the device, autocast, backward per micro-batch, clip, step. Block compilation is keel's own
    (parallel.compile), so the comparison isolates the trainer around the model. No z-loss: set
    model.z_loss=0 for equal work. Returns (median step seconds after `warmup`, peak memory in GB, last loss)."""
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, "meta")
    if cfg.parallel.compile:
        apply_compile(model)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(cfg.train.seed)
    optimizer = adamw(model, cfg, device)
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    accum = cfg.train.global_batch_size // B
    data = torch.randint(0, cfg.model.vocab_size, (accum, B, T + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for tokens in data:
            with autocast(device, cfg.train.precision):
                logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / accum
            loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_gb = peak_memory_gb(device)
    final = loss.item() * accum
    del model, optimizer, data, logits, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times[warmup:]), peak_gb, final


def _params(cfg) -> str:
    n = count_params(cfg.model).total
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def add_step_parser(ops: argparse._SubParsersAction) -> None:
    q = ops.add_parser("step", help="whole training steps of a config on this machine (one process): tokens/s, "
                       "MFU, peak memory", description=run_step.__doc__)
    q.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    add_common_args(q)
    q.add_argument("--steps", type=int, default=None, help="steps per run (GPU default 20, CPU 4)")
    q.add_argument("--warmup", type=int, default=None, help="first steps left out of the median (GPU 3, CPU 1)")
    q.add_argument("--baseline", action="store_true",
                   help="also run the same steps in a bare PyTorch loop and report keel/bare tokens/s")
    q.set_defaults(func=run_step)
