"""The engine a config asks for (parallel.engine and the layout), built for this rank."""
from __future__ import annotations

import torch

from ..training.config import Config, ConfigError
from .dims import ParallelDims
from .engine import Engine


def make_engine(cfg: Config, device: torch.device, dims: ParallelDims) -> Engine:
    if cfg.parallel.engine != "native":
        raise ConfigError(f"parallel.engine={cfg.parallel.engine} arrives with the DeepSpeed / megatron-core "
                          f"engines issue; use parallel.engine=native")
    # Imported on demand: a one-process run never loads the mesh and FSDP machinery.
    if dims.world_size == 1:
        from .local import LocalEngine

        return LocalEngine(cfg, device)
    from .native import NativeEngine

    return NativeEngine(cfg, device, dims)
