"""The engine a config asks for (parallel.engine and the layout), built for this rank."""
from __future__ import annotations

import torch

from ..training.config import Config
from .dims import ParallelDims
from .engine import Engine


def make_engine(cfg: Config, device: torch.device, dims: ParallelDims) -> Engine:
    # parallel.engine was checked with the layout (dims.check_layout).
    # Imported on demand: a one-process run never loads the mesh and FSDP machinery.
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, device, dims)
    if cfg.parallel.engine == "megatron":
        from .megatron import MegatronEngine

        return MegatronEngine(cfg, device, dims)
    if dims.world_size == 1:
        from .local import LocalEngine

        return LocalEngine(cfg, device)
    from .native import NativeEngine

    return NativeEngine(cfg, device, dims)
