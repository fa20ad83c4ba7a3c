"""`keel train` on Ray: validate, connect, place the worker group, supervise it until the run finishes."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..parallel.dims import LayoutError, ParallelDims, check_layout
from ..training.config import Config, load_config
from ..training.run import summary_line
from .cluster import LauncherError, connect


def world_size_of(cfg: Config, nproc_per_node: int | None, nnodes: int) -> int:
    """--nproc-per-node x --nnodes when given; else the product of the layout's degrees when none is -1
    (`--set parallel.dp_shard=2` alone means two processes); else one."""
    if nproc_per_node:
        return nproc_per_node * nnodes
    p = cfg.parallel
    degrees = [p.dp_replicate, p.dp_shard, p.tp, p.pp]
    if all(d > 0 for d in degrees):
        total = 1
        for d in degrees:
            total *= d
        return total
    return nnodes


def validate(cfg: Config, world_size: int, nnodes: int) -> ParallelDims:
    if world_size % nnodes:
        raise LayoutError(f"{world_size} processes do not split evenly over --nnodes {nnodes}")
    p = cfg.parallel
    dims = ParallelDims.of(p, world_size)
    check_layout(cfg, dims)
    per_node = world_size // nnodes
    if nnodes > 1 and per_node % dims.tp:
        raise LayoutError(f"parallel.tp={dims.tp} must divide the {per_node} processes per node: a tensor-parallel "
                          f"group has to share a node")
    return dims


def train_on_ray(config: str | None, overrides: list[str], nproc_per_node: int | None = None, nnodes: int = 1,
                 address: str | None = None, cpus_per_worker: float | None = None,
                 gpus_per_worker: float | None = None, system_config: dict | None = None) -> dict:
    """Run the config to the end on Ray; returns {"summary": rank 0's summary, "goodput": ...}."""
    # Everything about the config and layout is checked before a cluster is touched.
    cfg = load_config(config, overrides)
    world = world_size_of(cfg, nproc_per_node, nnodes)
    validate(cfg, world, nnodes)
    if cfg.data.path is not None and not (address or os.environ.get("RAY_ADDRESS")):
        from ..training.corpus import read_meta

        # This machine is where the ranks will read it: a missing or unprepared folder is one line now.
        read_meta(Path(cfg.data.path))
    per_node = world // nnodes
    conn = connect(address, system_config=system_config)  # imports Ray only once its environment is set
    import ray

    from .group import GroupPlan
    from .supervisor import Supervisor, goodput_line

    try:
        resources = ray.cluster_resources()
        if gpus_per_worker is None:
            wants_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and resources.get("GPU", 0) > 0)
            gpus_per_worker = 1.0 if wants_gpu else 0.0
        if cpus_per_worker is None:
            # The embedded instance is one machine: share all of its cores out among the ranks (a lone
            # rank gets every core, as it would inline) rather than queue ranks or leave cores idle.
            cpus = resources.get("CPU", 1.0)
            cpus_per_worker = cpus / per_node if conn.embedded else 1.0
        plan = GroupPlan(nnodes, per_node, cpus_per_worker, gpus_per_worker)
        env_vars = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]} \
            if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in os.environ else None
        where = "embedded local Ray" if conn.embedded else \
            f"Ray cluster {address or os.environ.get('RAY_ADDRESS') or '(connected already)'}"
        dashboard = f"; Ray dashboard {conn.dashboard_url}" if conn.dashboard_url else ""
        print(f"keel: {world} worker{'s' if world > 1 else ''} on {where} ({nnodes} node(s) x {per_node}; "
              f"{cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU each), supervised{dashboard}",
              file=sys.stderr, flush=True)
        sup = Supervisor(cfg, plan, os.getcwd(), env_vars)
        out = sup.run()
        s = out["summary"]
        print(summary_line(s), flush=True)
        print(goodput_line(out["goodput"]), flush=True)
        return out
    finally:
        conn.close()


__all__ = ["LauncherError", "train_on_ray", "world_size_of", "validate"]
