"""Process-group start-up and the one device mesh every parallel plan is applied on.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, tp (torchtitan's order): tensor-parallel
ranks are adjacent, so with one process per GPU they share a node and its NVLink.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .dims import ParallelDims

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> None:
    """Join the process group torchrun / the launcher described in the environment."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Always a finite timeout: torch's default is 30 minutes, and a hung peer would hold everyone that long.
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def build_mesh(dims: ParallelDims, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The 4-D mesh, and its data-parallel ranks flattened into one "dp" dimension: a rank's place on
    that decides which slice of the global batch it reads."""
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp),
                            mesh_dim_names=MESH_DIMS)
    return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")
