"""`keel bench OP` and `keel bench step`: formulas, and on a machine without a GPU the reference and
interpreter paths with their outputs (table, CSV, PNG) and errors within each op's tolerance."""
import argparse
import csv
import time

import pytest
import torch

from keel.kernels.bench import Peaks, add_bench_parser, rates
from keel.kernels.bench_ops import OPS, Case, parse_heads, parse_sizes
from keel.kernels.peaks import measure_matmul_peak
from keel.launcher.bench_step import add_step_parser

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def bench(argv):
    parser = argparse.ArgumentParser(prog="keel")
    add_step_parser(add_bench_parser(parser.add_subparsers(dest="command")))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def test_sizes_take_a_k_suffix_and_heads_a_kv_count():
    assert parse_sizes("512,1k,2K,16k") == [512, 1024, 2048, 16384]
    assert parse_heads("32/8") == (32, 8) and parse_heads("16") == (16, 16)
    with pytest.raises(argparse.ArgumentTypeError, match="must divide"):
        parse_heads("32/5")


def test_attention_flops_count_causal_as_half_and_fwd_bwd_as_three_and_a_half_forwards():
    op = OPS["attention"]
    case = Case([torch.empty(1, 1, 1024, 64, device="meta")])
    full = op.flops(argparse.Namespace(causal=False), case, "fwd")
    assert full == 4 * 1024 * 1024 * 64
    assert op.flops(argparse.Namespace(causal=True), case, "fwd") == full / 2
    assert op.flops(argparse.Namespace(causal=False), case, "fwd+bwd") == full * 3.5


def test_percent_of_peak_is_of_flops_for_compute_bound_ops_and_of_bandwidth_for_memory_bound_ones():
    peaks = Peaks(flops=1e15, flops_source="test", bandwidth=2e12, bandwidth_source="test")
    args = argparse.Namespace(causal=True, dim=4096)
    attention = rates(OPS["attention"], args, Case([torch.empty(1, 1, 1024, 64, device="meta")]), "fwd",
                      torch.bfloat16, ms=1.0, peaks=peaks)
    assert attention["tflops"] == pytest.approx(2 * 1024 * 1024 * 64 / 1e9, rel=1e-3)
    assert attention["pct_peak"] == pytest.approx(100 * attention["tflops"] * 1e12 / 1e15, abs=0.05)
    # RMSNorm fwd moves 2*N*D*s bytes: 2 * 8192 * 4096 * 2 = 134 MB in 0.1 ms = 1342 GB/s = 67% of 2 TB/s.
    norm = rates(OPS["rmsnorm"], args, Case([], tokens=8192), "fwd", torch.bfloat16, ms=0.1, peaks=peaks)
    assert norm["gbps"] == pytest.approx(1342.2, abs=0.1) and norm["pct_peak"] == pytest.approx(67.1)


# Tiny shapes: the interpreter runs one program at a time.
CPU_CASES = {
    "attention": ["--heads", "2/1", "--head-dim", "16", "--impl", "sdpa,triton,flash_attn,cuda"],
    "rmsnorm": ["--dim", "48"],
    "swiglu": ["--ffn-dim", "40"],
    "rope": ["--heads", "2/1", "--head-dim", "16"],
    "cross_entropy": ["--vocab", "96", "--dim", "16", "--chunk-size", "8"],
}


@no_gpu
@pytest.mark.parametrize("op", list(CPU_CASES))
def test_each_op_without_gpu_says_so_runs_reference_and_interpreter_and_writes_csv_and_png(op, tmp_path, capsys):
    rows = bench([op, "--seqlen", "16", "--warmup", "0", "--reps", "1", "--out", str(tmp_path), *CPU_CASES[op]])
    out = capsys.readouterr().out
    assert "No CUDA device" in out
    assert {r["impl"] for r in rows} == set(OPS[op].cpu_impls)
    assert all(r["ok"] and r["ms"] > 0 and r["tflops"] is None and r["peak_mem_mib"] is None for r in rows), rows
    if op == "attention":
        assert "skip flash_attn fwd" in out and "skip cuda fwd+bwd" in out
    if op == "cross_entropy":  # the fused impls cannot run a backward alone
        assert {r["mode"] for r in rows if r["impl"] == "chunked"} == {"fwd", "fwd+bwd"}
    with open(tmp_path / f"{op}.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / f"{op}.png").stat().st_size > 0


def test_bench_step_times_training_steps_of_a_config(tiny_overrides, corpus_dir, tmp_path, monkeypatch, capsys):
    # The CPU's matmul peak is measured once per machine (seconds); a stated one keeps this test fast.
    monkeypatch.setattr("keel.kernels.peaks.measure_matmul_peak", lambda device, dtype: 1e11)
    sets = [a for o in [*tiny_overrides, f"data.path={corpus_dir}", "model.n_layers=1"] for a in ("--set", o)]
    rows = bench(["step", "configs/tiny.yaml", *sets, "--steps", "3", "--warmup", "1", "--out", str(tmp_path)])
    (row,) = rows
    assert row["seqlen"] == 32 and row["ms"] > 0 and row["tokens_per_s"] > 0 and 0 < row["pct_peak"] < 100
    assert (tmp_path / "step.csv").is_file() and (tmp_path / "step.png").stat().st_size > 0


def test_a_matmul_peak_costs_seconds_even_where_bf16_is_emulated():
    # The peak is measured at each run's start: a fixed 2048^3 bf16 matmul on an AVX2-only CPU took 10 s a
    # time, and 31 of them held a 10-step test past its 15-minute limit. The size and count adapt instead.
    start = time.perf_counter()
    flops = measure_matmul_peak(torch.device("cpu"), torch.bfloat16, budget_s=1.0)
    assert flops > 0 and time.perf_counter() - start < 20
