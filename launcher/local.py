"""Several local processes through torchrun, until the Ray launcher takes over this path.

The layout is validated here, in the driver, so an impossible one fails before any process starts.
"""
from __future__ import annotations

import socket
import subprocess
import sys

from ..parallel.dims import ParallelDims, check_layout
from ..training.config import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(config: str, overrides: list[str], nproc: int) -> int:
    cfg = load_config(config, overrides)
    p = cfg.parallel
    check_layout(cfg, ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.tp, p.pp, nproc))
    sets = [arg for item in overrides for arg in ("--set", item)]
    # Rendezvous on loopback: a single-machine run has no reason to listen on a public interface.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "keel.training", config, *sets]
    return subprocess.call(cmd)
