"""Compile every Triton kernel and GPU autotune config for a CUDA target without a GPU.

The interpreter executes kernels as numpy and hides lowering errors and shared-memory overflows; a
real compile for sm_90 catches both. Must run with TRITON_INTERPRET unset (the kernel modules pick
their GPU config lists at import), so the test runs it in a subprocess:

    python -m keel.kernels.triton_compile_check
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

# Hopper allows 227 KB of shared memory per block (228 KB per SM minus 1 KB reserved).
SM90_MAX_SHARED_BYTES = 227 * 1024
_TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_REPORTED_CONSTEXPRS = ("HEAD_DIM", "CAUSAL", "HAS_DOC", "BACKWARD", "BLOCK_H", "BLOCK_K", "BLOCK_F", "BLOCK_V",
                        "HAS_GRAD")


@dataclass
class Case:
    kernel: str
    config: dict
    constexprs: dict
    dtype: str
    pointers: dict = field(default_factory=dict)  # arg name -> element type where not `dtype`
    floats: tuple = ()
    ints: tuple = ("H", "KH", "GROUP", "T")  # upper-case scalar args; other upper-case args are tensors


def _compile(jit_fn, case: Case, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    elem = _TRITON_DTYPES[case.dtype]
    constexprs = dict(case.constexprs)
    constexprs.update({k: v for k, v in case.config.items() if k.startswith("BLOCK")})
    signature, attrs = {}, {}
    for i, name in enumerate(jit_fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper() and name not in case.ints:  # tensors are upper-case in these kernels
            signature[name] = "*" + case.pointers.get(name, elem)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in case.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):  # contiguous tensors with d in {64, 128}: every stride % 16 == 0
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": case.config["num_warps"], "num_stages": case.config["num_stages"]}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def attention_cases(head_dims=(64, 128)):
    from . import triton_attention as ta
    cases = []
    for d in head_dims:
        for kind, name in (("fwd", "_attn_fwd"), ("bwd_dkdv", "_attn_bwd_dkdv"), ("bwd_dq", "_attn_bwd_dq")):
            for cfg in ta.GPU_CONFIGS[kind]:
                # causal + documents is the superset of code paths (most registers, same tiles).
                for dtype in ("bfloat16",):
                    cases.append(Case(name, cfg, dict(HEAD_DIM=d, BLOCK_D=d, CAUSAL=True, HAS_DOC=True,
                                                      UPCAST=False, DOT_PRECISION="tf32"), dtype,
                                      pointers=dict(LSE="fp32", DELTA="fp32", DOC="i32", DOC_LO="i32",
                                                    DOC_HI="i32"),
                                      floats=("qk_scale", "sm_scale")))
        # fp16 and fp32 (IEEE dots, fp32 tiles: twice the shared memory) with the first config each.
        for kind, name in (("fwd", "_attn_fwd"), ("bwd_dkdv", "_attn_bwd_dkdv"), ("bwd_dq", "_attn_bwd_dq")):
            for dtype, upcast, prec in (("float16", False, "tf32"), ("float32", True, "ieee")):
                cfg = ta.FP32_CONFIG[kind] if dtype == "float32" else ta.GPU_CONFIGS[kind][0]
                cases.append(Case(name, cfg, dict(HEAD_DIM=d, BLOCK_D=d, CAUSAL=False, HAS_DOC=False,
                                                  UPCAST=upcast, DOT_PRECISION=prec), dtype,
                                  pointers=dict(LSE="fp32", DELTA="fp32", DOC="i32", DOC_LO="i32", DOC_HI="i32"),
                                  floats=("qk_scale", "sm_scale")))
        cases.append(Case("_bwd_delta", dict(BLOCK_M=128, num_warps=4, num_stages=1),
                          dict(HEAD_DIM=d, BLOCK_D=d), "bfloat16", pointers=dict(DELTA="fp32")))
    return cases


def all_cases():
    import importlib
    cases = [("triton_attention", c) for c in attention_cases()]
    for module_name in ("triton_ops", "triton_rope", "triton_cross_entropy"):
        try:
            module = importlib.import_module(f"{__package__}.{module_name}")
        except ImportError:
            continue
        cases += [(module_name, c) for c in module.compile_cases()]
    return cases


def run(arch: int = 90) -> list[dict]:
    import importlib

    from triton.runtime.autotuner import Autotuner
    results = []
    for module_name, case in all_cases():
        module = importlib.import_module(f"{__package__}.{module_name}")
        kernel = getattr(module, case.kernel)
        jit_fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        t0 = time.perf_counter()
        row = dict(kernel=case.kernel, dtype=case.dtype, config=case.config,
                   constexprs={k: v for k, v in case.constexprs.items() if k in _REPORTED_CONSTEXPRS})
        try:
            compiled = _compile(jit_fn, case, arch)
            row.update(ok=True, shared=compiled.metadata.shared, n_regs=getattr(compiled, "n_regs", None))
        except Exception as exc:  # report every failure, not just the first
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-400:]}")
        row["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(row)
    return results


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the check compiles the GPU configs", file=sys.stderr)
        return 2
    results = run(int(os.environ.get("KEEL_TRITON_ARCH", "90")))
    print(json.dumps(results))
    bad = [r for r in results if not r["ok"] or r["shared"] > SM90_MAX_SHARED_BYTES]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
