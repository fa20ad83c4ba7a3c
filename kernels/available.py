"""What a kernel choice depends on besides the tensors: installed packages, the Triton interpreter, DTensors.

One place for the checks that attention, the fused ops and the fused cross-entropy all make at config time
and dispatch time.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def has_module(name: str) -> bool:
    """Whether `name` is importable, without importing it."""
    return importlib.util.find_spec(name) is not None


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (tensor parallelism's sharded activations and weights)."""
    if type(t) is torch.Tensor or not torch.distributed.is_available():  # the common case: no import
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)
