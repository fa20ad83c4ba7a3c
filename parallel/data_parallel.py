"""Data parallelism with FSDP2 (HSDP when both dp axes are > 1), activation checkpointing and compile.

Order, as torchtitan applies it: tensor parallel -> activation checkpointing -> compile -> FSDP.
Checkpointing wraps a block before compile so the compiled graph includes the recomputation; FSDP goes
last because it shards whatever parameters (plain or tensor-parallel DTensors) the earlier steps left.
"""
from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..training.model import Transformer

def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    for i, (name, block) in enumerate(list(model.layers.items())):
        # "selective": every other block, trading half the recomputation for half the saving.
        if mode == "full" or (mode == "selective" and i % 2 == 0):
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    # In place (Module.compile), so parameter names stay unchanged.
    for block in model.layers.values():
        block.compile()


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, precision: str, reshard_after_forward: bool) -> None:
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                              reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root unit holds what is left: embedding, final norm, output layer.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
