"""GPU tests: `pytest -m gpu tests/gpu` on a CUDA machine (benchmarks/gpu_check.py runs them). Without a CUDA
device they skip, unless KEEL_GPU_DRY_RUN=1: then they run on the CPU at toy sizes through the Triton
interpreter, so that a typo shows in CI rather than in the first minute of a rare GPU.

Run this folder on its own: tests/kernels/conftest.py turns the interpreter on for the whole process, and a
kernel module imported after that would run interpreted on a GPU too (the `device` fixture refuses that).
"""
import contextlib
import os

import pytest
import torch

DRY_RUN = os.environ.get("KEEL_GPU_DRY_RUN") == "1" and not torch.cuda.is_available()
if not torch.cuda.is_available():
    # Before any Triton kernel module is imported (they read it at import, and pytest collects this folder
    # before tests/kernels/, whose conftest sets the same): without a GPU only the interpreter can run them.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> str:
    if torch.cuda.is_available():
        from keel.kernels import triton_attention
        if triton_attention.INTERPRET:
            pytest.fail("the Triton kernels were imported with TRITON_INTERPRET=1, so they would run interpreted "
                        "on the GPU: run `pytest -m gpu tests/gpu` on its own, without TRITON_INTERPRET")
        return "cuda"
    if DRY_RUN:
        return "cpu"
    pytest.skip("no CUDA device (KEEL_GPU_DRY_RUN=1 runs these on the CPU through the Triton interpreter, at toy "
                "sizes)")


@contextlib.contextmanager
def poisoned():
    """Every torch.empty inside (the kernels' outputs included) comes back filled with NaN, integers with their
    maximum, so an element a kernel forgets to write shows as NaN instead of as yesterday's memory."""
    import torch.utils.deterministic
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    # The fill works only with deterministic algorithms on; warn_only keeps ops without a deterministic
    # version (cuBLAS without a workspace config) running.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


@pytest.fixture(scope="session")
def poison():
    """The `poisoned()` context manager (a fixture: `from conftest import` is ambiguous with several)."""
    return poisoned
