"""Materialise a meta-device model (plain, wrapped or sharded) with layout-independent initial values."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..training.model import Transformer, initial_value

# Wrappers that prefix parameter names; the canonical name (what initialisation and checkpoints use)
# leaves them out, so every layout names a weight the same way.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def materialise(model: Transformer, device: torch.device, seed: int) -> None:
    """Allocate on `device` and give each (possibly sharded) parameter its initial value, the same a
    single unwrapped process would give it (see training.model.initial_value)."""
    model.to_empty(device=device)
    model.tie_weights()  # to_empty() materialises each module's parameters separately, untying them
    model.init_buffers()
    for name, param in model.named_parameters():
        full = initial_value(model.cfg, canonical_name(name), param.shape, seed)
        if isinstance(param, DTensor):
            # Every rank computes the same full tensor, so each can cut its own shard: no communication.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
