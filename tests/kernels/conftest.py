"""Kernel tests run Triton on CPU through its interpreter.

TRITON_INTERPRET must be set before triton is first imported: the kernel modules read it at import
to pick one interpreter-friendly tile config instead of the GPU autotune list.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
