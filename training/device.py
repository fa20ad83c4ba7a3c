"""Device choice, seeding, mixed precision and the peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from ..kernels import peaks
from .config import ConfigError
from .corpus import cache_dir


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        # A user error, not a failure: a restart on the same machine would find no GPU either.
        raise ConfigError("train.device=cuda but no CUDA device is visible here; use train.device=auto or cpu")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def slow_precision_warning(device: torch.device, precision: str) -> str | None:
    """Why this run's precision is a poor choice on this device, or None.

    A CPU without native bf16 (AVX512-BF16 or AMX; an AVX2-only EPYC here) runs bf16 matmuls through a
    scalar fallback: measured 1.9 GFLOP/s against 156 for fp32 on the same two cores.
    """
    if device.type == "cpu" and precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ("train.precision=bf16 on a CPU without native bf16 matmuls (AVX512-BF16 or AMX) runs each "
                "matmul ~80x slower than fp32; use train.precision=fp32 here")
    return None


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """kernels.peaks.peak_flops with keel's cache (KEEL_CACHE), where a measured peak is kept."""
    return peaks.peak_flops(device, precision, cache_dir() / "peak_flops.json")
