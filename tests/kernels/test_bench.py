"""`keel bench` on a machine without a GPU: reference and interpreter only, with its outputs."""
import argparse
import csv

import pytest
import torch

from keel.kernels.bench import add_bench_parser, attention_flops


def test_attention_flops_counts_causal_as_half_and_fwd_bwd_as_three_and_a_half_forwards():
    full = attention_flops(1, 1, 1024, 64, causal=False, backward=False)
    assert full == 4 * 1024 * 1024 * 64
    assert attention_flops(1, 1, 1024, 64, causal=True, backward=False) == full / 2
    assert attention_flops(1, 1, 1024, 64, causal=False, backward=True) == full * 3.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_gpu_says_so_and_writes_csv_and_png(tmp_path, capsys):
    pytest.importorskip("triton", reason="triton is not installed")
    parser = argparse.ArgumentParser(prog="keel")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--seqlens", "32", "--impls", "sdpa,triton,flash_attn", "--head-dim", "32",
                              "--out", str(tmp_path)])
    rows = args.func(args)
    out = capsys.readouterr().out
    assert "No CUDA device" in out and "skip flash_attn" in out
    assert {r["impl"] for r in rows} == {"sdpa", "triton"}
    assert all(r["max_err"] <= 2e-2 and r["tflops"] is None for r in rows)
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "bench.png").stat().st_size > 0
