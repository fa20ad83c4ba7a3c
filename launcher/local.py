"""Several local processes through torchrun, until the Ray launcher takes over this path.

The layout is validated here, in the driver, so an impossible one fails before any process starts.
"""
from __future__ import annotations

import subprocess
import sys

from ..parallel.dims import ParallelDims, check_layout
from ..training.config import load_config
from .cluster import free_port


def run_torchrun(config: str, overrides: list[str], nproc: int) -> int:
    cfg = load_config(config, overrides)
    check_layout(cfg, ParallelDims.of(cfg.parallel, nproc))
    sets = [arg for item in overrides for arg in ("--set", item)]
    # Rendezvous on loopback: a single-machine run has no reason to listen on a public interface.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "keel.training", config, *sets]
    return subprocess.call(cmd)
