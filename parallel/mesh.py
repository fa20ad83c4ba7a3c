"""Process-group start-up and the one device mesh every parallel plan is applied on.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, tp (torchtitan's order): tensor-parallel
ranks are adjacent, so with one process per GPU they share a node and its NVLink.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .dims import ParallelDims

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def _store_of_this_attempt(timeout: timedelta) -> dist.Store | None:
    """Under torchrun the agent hosts the TCPStore and keeps it across `--max-restarts` restarts, and
    torch adds no per-attempt prefix to its keys: a restarted rank could read the address a dead peer
    published in the previous attempt and fail (measured in torch 2.13: "Gloo connectFullMesh failed ...
    Connection refused" on every restart). So each attempt gets its own key space."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"keel/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> None:
    """Join the process group torchrun / the launcher described in the environment."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Always a finite timeout: torch's default is 30 minutes, and a hung peer would hold everyone that long.
    timeout = timedelta(seconds=timeout_s)
    device_id = device if device.type == "cuda" else None
    store = _store_of_this_attempt(timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout, device_id=device_id)


def build_mesh(dims: ParallelDims, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The 4-D mesh, and its data-parallel ranks flattened into one "dp" dimension: a rank's place on
    that decides which slice of the global batch it reads."""
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp),
                            mesh_dim_names=MESH_DIMS)
    return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")
