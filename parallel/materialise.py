"""Materialise a meta-device model (plain, wrapped or sharded) with layout-independent initial values."""
from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..training.config import ModelConfig
from ..training.model import Transformer, initial_value

# Wrappers that prefix parameter names; the canonical name (what initialisation and checkpoints use)
# leaves them out, so every layout names a weight the same way.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def initial_values(cfg: ModelConfig, seed: int,
                   device: torch.device | str = "cpu") -> Callable[[str, torch.Size], torch.Tensor]:
    """name, full shape -> the parameter's starting value: random (training.model.initial_value, drawn on
    `device`), or read from the Hugging Face checkpoint named by model.init_from."""
    if cfg.init_from is None:
        return lambda name, shape: initial_value(cfg, name, shape, seed, device)
    from ..checkpoints.hf import HFWeights
    from ..checkpoints.hf_config import hf_path

    return HFWeights(hf_path(cfg.init_from), cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings).tensor


@torch.no_grad()
def materialise(model: Transformer, device: torch.device, seed: int) -> None:
    """Allocate on `device` and give each (possibly sharded) parameter its initial value, the same a
    single unwrapped process would give it, whatever the layout."""
    model.to_empty(device=device)
    model.tie_weights()  # to_empty() materialises each module's parameters separately, untying them
    model.init_buffers()
    value_of = initial_values(model.cfg, seed, device)
    for name, param in model.named_parameters():
        # A DTensor's shape is the full tensor's, so each rank reads (or draws) the whole and keeps its shard.
        full = value_of(canonical_name(name), param.shape)
        if isinstance(param, DTensor):
            # Every rank computes the same full tensor, so each can cut its own shard: no communication.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
