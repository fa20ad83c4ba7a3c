"""The worker group: one Ray actor per rank, placed together in one placement group.

Placement: one bundle per node slot holding that node's `nproc_per_node` ranks, and the slots spread
over distinct nodes (STRICT_SPREAD) when there are several. Ranks are numbered node-slot-major and the
mesh puts tensor-parallel ranks next to each other (parallel/mesh.py), so as long as tp divides
nproc_per_node every tensor-parallel group shares a node, while data-parallel replicas spread.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .cluster import LauncherError


@dataclass(frozen=True)
class GroupPlan:
    nnodes: int
    nproc_per_node: int
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def bundles(self) -> list[dict]:
        bundle = {"CPU": self.cpus_per_worker * self.nproc_per_node}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker * self.nproc_per_node
        return [dict(bundle) for _ in range(self.nnodes)]

    @property
    def strategy(self) -> str:
        return "STRICT_SPREAD" if self.nnodes > 1 else "STRICT_PACK"


def check_capacity(plan: GroupPlan) -> None:
    """Ask for no more than the cluster could ever give: fail before placing anything."""
    total = ray.cluster_resources()
    for kind, per in (("GPU", plan.gpus_per_worker), ("CPU", plan.cpus_per_worker)):
        need = per * plan.world_size
        have = total.get(kind, 0.0)
        if need > have + 1e-9:
            hint = " (set train.device=cpu, or --gpus-per-worker 0)" if kind == "GPU" else \
                " (lower --cpus-per-worker, or add nodes)"
            raise LauncherError(f"the job asks for {need:g} {kind}s ({plan.world_size} workers x {per:g}) but the "
                                f"cluster has {have:g}{hint}")
    if plan.nnodes > 1:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        per_node = plan.bundles()[0]
        fit = sum(all(n["Resources"].get(k, 0) >= v for k, v in per_node.items()) for n in nodes)
        if fit < plan.nnodes:
            raise LauncherError(f"the job asks for {plan.nnodes} nodes with {per_node} each, but only {fit} of the "
                                f"cluster's {len(nodes)} nodes could hold that")


@ray.remote(max_concurrency=2)  # one thread trains, the other answers heartbeat polls
class RankWorker:
    def __init__(self, rank: int, local_rank: int, world_size: int, cwd: str):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.records: list[dict] = []
        self.lock = threading.Lock()
        # Relative paths in the config (data, runs/) mean the driver's folder when it exists here too.
        if os.path.isdir(cwd):
            os.chdir(cwd)

    def __repr__(self) -> str:  # Ray prefixes this actor's streamed log lines with it: "(rank1 pid=…)"
        return f"rank{self.rank}"

    def where(self) -> dict:
        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, cfg, master_addr: str, master_port: int) -> dict:
        import torch

        from ..training.loop import RankEnv, train

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank))
        # Ray narrows CUDA_VISIBLE_DEVICES to the GPU it gave this actor, which is then cuda:0.
        device_index = 0 if ray.get_gpu_ids() else self.local_rank
        if not ray.get_gpu_ids() and not cfg.train.cpu_threads:
            torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))
        summary = train(cfg, RankEnv(self.rank, device_index, self.world_size), on_step=self._beat)
        return {"rank": self.rank, "final_loss": summary.final_loss, "val_loss": summary.val_loss,
                "first_val_loss": summary.first_val_loss, "steps": summary.steps, "tokens": summary.tokens,
                "wall_s": summary.wall_s, "tokens_per_s": summary.tokens_per_s, "mfu": summary.mfu,
                "run_dir": str(summary.run_dir)}

    def _beat(self, record: dict) -> None:
        with self.lock:
            self.records.append({"time": time.time(), **{k: record[k] for k in
                                 ("step", "loss", "step_s", "tokens_per_s", "tokens") if k in record}})

    def heartbeat(self, since: int = 0) -> list[dict]:
        """Step records after step `since` (the supervisor asks for what it has not seen)."""
        with self.lock:
            return [r for r in self.records if r["step"] > since]


class WorkerGroup:
    """Placed, started and torn down as a whole: a failure anywhere restarts every rank."""

    def __init__(self, plan: GroupPlan):
        self.plan = plan
        self.pg = None
        self.workers: list = []
        self.where: list[dict] = []
        self.run_refs: list = []

    def place(self, timeout_s: float) -> bool:
        """Reserve the group's resources; False if the cluster has no room within `timeout_s`."""
        self.pg = placement_group(self.plan.bundles(), strategy=self.plan.strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        return bool(ready)

    def start(self, cfg, cwd: str, env_vars: dict | None = None) -> None:
        plan = self.plan
        opts = {"num_cpus": plan.cpus_per_worker, "num_gpus": plan.gpus_per_worker, "max_restarts": 0}
        if env_vars:
            opts["runtime_env"] = {"env_vars": env_vars}
        self.workers = [
            RankWorker.options(**opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank // plan.nproc_per_node)
            ).remote(rank, rank % plan.nproc_per_node, plan.world_size, cwd)
            for rank in range(plan.world_size)]
        t = time.time()
        self.where = ray.get([w.where.remote() for w in self.workers], timeout=300)
        self.actors_s = time.time() - t
        master_port = ray.get(self.workers[0].free_port.remote(), timeout=30)
        master_addr = self.where[0]["ip"]
        self.run_refs = [w.run.remote(cfg, master_addr, master_port) for w in self.workers]

    def shutdown(self) -> None:
        # ray.kill, not ray.cancel: a task blocked in a collective ignores cancellation.
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
        self.workers, self.run_refs, self.pg = [], [], None
