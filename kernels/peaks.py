"""What a device can do at best: the peak FLOP/s and memory bandwidth that MFU and `keel bench` compare
against. Published figures for known GPUs; anything else is measured."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# Published dense bf16 tensor-core peaks (FLOP/s) for GPUs whose name contains the key.
PUBLISHED_BF16_PEAK = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12, "RTX 4090": 165e12,
}
# Published memory bandwidth (bytes/s), same matching; the first key contained in the name wins, so the
# more specific names come first. What `keel bench` compares memory-bound kernels against.
PUBLISHED_MEMORY_BANDWIDTH = {
    "H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "B200": 8.0e12,
    "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12,
    "A10G": 0.6e12, "L4": 0.3e12, "RTX 4090": 1.008e12,
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()} threads"


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None,
                        budget_s: float = 2.0) -> float:
    """FLOP/s of the best timed n x n x n matmul.

    Without an `n`, the size grows from 256 until one matmul takes 50 ms or reaches the device's cap (8192
    on a GPU, 2048 on a CPU), and the timing stops after ten matmuls or `budget_s`, whichever comes first.
    The measurement must cost seconds everywhere: a CPU without native bf16 (AVX2 only) runs a bf16 matmul
    at ~2 GFLOP/s (fp32: ~156 on the same cores), where a fixed 2048^3 took 10 s a matmul and 31 of them
    blocked the run's start for 5 minutes.
    """
    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def operands(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up: the first call pays for kernel selection and page faults
        return a, b

    if n is None:
        cap = 8192 if device.type == "cuda" else 2048
        n = 256
        a, b = operands(n)
        while n < cap and once(a, b) < 0.05:
            n *= 2
            a, b = operands(n)
    else:
        a, b = operands(n)
    best, start = float("inf"), time.perf_counter()
    for _ in range(10):
        best = min(best, once(a, b))
        if time.perf_counter() - start > budget_s:
            break
    return 2 * n ** 3 / best


def measure_copy_bandwidth(device: torch.device, n_bytes: int = 2 << 30) -> float:
    """Bytes/s of the best of ten device-to-device copies of n_bytes, counting each byte read and written (the
    convention of the published bandwidths and of `keel bench`'s GB/s)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """(published memory bandwidth in bytes/s, where it comes from), or (None, why) when unknown."""
    name = device_name(device)
    if device.type == "cuda":
        for key, value in PUBLISHED_MEMORY_BANDWIDTH.items():
            if key in name:
                return value, f"published memory bandwidth of {key}"
    return None, f"no published memory bandwidth for {name}"


def peak_flops(device: torch.device, precision: str, cache: Path | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from).

    Known GPUs in bf16 use the published dense peak. Anything else is measured with a large matmul in the
    run's dtype (once, when a `cache` file keeps it per device, dtype and thread count), so MFU on a CPU
    compares against what this machine can actually do rather than a number from a datasheet.
    """
    name = device_name(device)
    if device.type == "cuda" and precision == "bf16":
        for key, value in PUBLISHED_BF16_PEAK.items():
            if key in name:
                return value, f"published bf16 peak of {key}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    source = f"measured {str(dtype).removeprefix('torch.')} matmul peak on {name}"
    if cache is None:
        return measure_matmul_peak(device, dtype), source
    key = f"{name}|{dtype}"
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in table:
        table[key] = measure_matmul_peak(device, dtype)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=2))
        os.replace(tmp, cache)
    return table[key], source
