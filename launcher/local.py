"""Several local processes through torchrun, until the Ray launcher takes over this path.

The layout is validated here, in the driver, so an impossible one fails before any process starts.
"""
from __future__ import annotations

import socket
import subprocess
import sys

from ..parallel.dims import ParallelDims, check_layout
from ..training.config import load_config


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now: found by binding there, and no wider (never on every interface)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_torchrun(config: str, overrides: list[str], nproc: int) -> int:
    cfg = load_config(config, overrides)
    check_layout(cfg, ParallelDims.of(cfg.parallel, nproc))
    sets = [arg for item in overrides for arg in ("--set", item)]
    # Rendezvous on loopback: a single-machine run has no reason to listen on a public interface.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "keel.training", config, *sets]
    return subprocess.call(cmd)
