"""The three shims that let megatron-core's GPTModel and its pipeline schedules run on a CPU (tests and
CPU-only machines), and nothing else: used by parallel/megatron.py only when the device is a CPU.

megatron-core 0.16 allocates some buffers on "the current CUDA device" (its global memory buffer, RoPE
frequencies, the tensor-parallel all-gather buffers, the pipeline's receive buffers), its pipeline schedules
count tokens in a tensor made with `device="cuda"`, and it forks a CUDA RNG tracker around its dropouts; all
fail without CUDA (measured: ../shared/PLATFORM.md, "megatron-core on CPU"; the schedules' token count by
tests/test_megatron.py's pipeline runs).
"""
from __future__ import annotations

import torch

_installed = False


class _TorchWithoutCuda:
    """torch as megatron-core's schedules see it: `torch.zeros(..., device="cuda")` makes a CPU tensor."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)


def install() -> None:
    """Point megatron-core's CUDA-only calls at the CPU, for the rest of this process."""
    global _installed
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import schedules

    if not _installed:
        if torch.cuda.is_available():
            raise RuntimeError("megatron_cpu.install() on a machine with CUDA would send megatron-core's CUDA "
                               "buffers to the CPU; it is for CPU-only processes")
        # torch.cuda.current_device() raises without CUDA; every caller in megatron-core passes its result
        # as a `device=` argument, which a CPU device satisfies.
        torch.cuda.current_device = lambda: torch.device("cpu")
        # Each schedule's token count (used only for a per-token loss, which keel does not ask for).
        schedules.torch = _TorchWithoutCuda()
        _installed = True
    # The inference tracker forks no CUDA RNG state (keel runs megatron-core without dropout, so no RNG
    # stream is drawn inside a fork). Reset each time: parallel_state is re-initialised per run.
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
