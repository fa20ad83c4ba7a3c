"""Attention kernel benchmark; the same as `keel bench` (see kernels/bench.py for what is measured).

    python benchmarks/kernels.py bench --seqlens 1024,2048,4096 --impls sdpa,triton,flash_attn --backward
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        from keel.kernels.bench import main
    except ImportError:  # not pip-installed yet: map keel.kernels onto this checkout's kernels/
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
        from _keel_path import ensure_keel_kernels
        ensure_keel_kernels()
        from keel.kernels.bench import main
    main()
