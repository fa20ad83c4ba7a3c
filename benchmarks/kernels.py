"""Kernel benchmarks; the same as `keel bench` (see kernels/bench.py for what is measured and how).

    python benchmarks/kernels.py bench attention --seqlen 1k,2k,4k --impl sdpa,triton,flash_attn --mode fwd+bwd
    python benchmarks/kernels.py bench rmsnorm --dim 4096 --seqlen 2k,8k
"""
if __name__ == "__main__":
    try:
        from keel.kernels.bench import main
    except ImportError:
        raise SystemExit("keel is not installed: run `make install` (pip install -e .) first") from None
    main()
