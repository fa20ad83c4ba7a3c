"""Process-group start-up and the one device mesh every parallel plan is applied on.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, tp (torchtitan's order): tensor-parallel
ranks are adjacent, so with one process per GPU they share a node and its NVLink.
"""
from __future__ import annotations

import os
import socket
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


def _bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and nothing wider. torch's own store server binds the wildcard
    address (0.0.0.0 or ::): every interface, where peers only ever use MASTER_ADDR."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's server does
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind the rendezvous store to {host}:{port} "
                               f"(MASTER_ADDR:MASTER_PORT): {e.strerror}") from None
    return sock


def _store_hosted_here(timeout: timedelta) -> dist.Store:
    """The rendezvous store, hosted by rank 0 on MASTER_ADDR only: loopback for a local run, the node's
    cluster address on a cluster (the launcher sets MASTER_ADDR to rank 0's node address). The other ranks
    connect to it as clients."""
    host, port, world_size = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"])
    if int(os.environ["RANK"]) != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    sock = _bound_socket(host, port)
    # Bound, not listening: both store backends call listen() on the descriptor themselves, and both take
    # it over (close it when the store goes), so detach() it from Python's socket object: otherwise
    # Python closes it first, under a running server (measured in torch 2.13: the non-libuv server
    # aborts at exit, "Unexpected poll revent on the master's listening socket: 32"). libuv, torch's
    # default backend, accepts a listen fd (uv_tcp_open) as well; we follow USE_LIBUV as torch's env://
    # rendezvous does.
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=sock.detach(),
                         use_libuv=os.environ.get("USE_LIBUV", "1") == "1")


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
        store = _store_hosted_here(timeout)
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout, device_id=device_id)


def build_mesh(dims: ParallelDims, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The 4-D mesh, and its data-parallel ranks flattened into one "dp" dimension: a rank's place on
    that decides which slice of the global batch it reads."""
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp),
                            mesh_dim_names=MESH_DIMS)
    return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")
