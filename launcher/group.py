"""The worker group: one Ray actor per rank, placed together in one placement group.

Placement: one bundle per node slot holding that node's `nproc_per_node` ranks, and the slots spread
over distinct nodes (STRICT_SPREAD) when there are several. Ranks are numbered node-slot-major and the
mesh puts tensor-parallel ranks next to each other (parallel/mesh.py), so as long as tp divides
nproc_per_node every tensor-parallel group shares a node, while data-parallel replicas spread.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .cluster import LauncherError, free_port


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
        per_node = plan.bundles()[0]
        fit = nodes_that_fit(per_node)
        if fit < plan.nnodes:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            raise LauncherError(f"the job asks for {plan.nnodes} nodes with {per_node} each, but only {fit} of the "
                                f"cluster's {alive} nodes could hold that")


def nodes_that_fit(bundle: dict) -> int:
    """How many live nodes could each hold `bundle` (one node slot of the group) when empty."""
    return sum(all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())
               for n in ray.nodes() if n.get("Alive"))


@ray.remote(max_concurrency=3)  # one thread waits on the training process, the others answer polls and stop()
class RankWorker:
    """A rank's agent, as torchrun's agent is a node's: it outlives the training processes it starts.

    Training runs in a child process forked from a forkserver that imported torch and keel once, when the
    actor started. A restart after a crash, a kill or a hang kills and re-forks only that child: no new
    actor, no new imports. Only a dead actor (its node gone, the agent itself killed) costs a new one.
    """

    def __init__(self, rank: int, local_rank: int, world_size: int, cwd: str):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.records: list[dict] = []
        self.attempt = -1
        self.lock = threading.Lock()
        self.proc = None
        self.outcome: dict | None = None
        # Relative paths in the config (data, runs/) mean the driver's folder when it exists here too.
        if os.path.isdir(cwd):
            os.chdir(cwd)
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        # Start the forkserver now, in the background of placement, so its imports overlap the others'.
        from multiprocessing import forkserver
        forkserver.ensure_running()

    def __repr__(self) -> str:  # Ray prefixes this actor's streamed log lines with it: "(rank1 pid=…)"
        return f"rank{self.rank}"

    def where(self) -> dict:
        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def free_port(self) -> int:
        # Free on the address rank 0's store will bind (MASTER_ADDR = this node's address, as where()
        # reports it; 127.0.0.1 for the embedded Ray), and no wider, not even for a moment.
        return free_port(ray.util.get_node_ip_address())

    def run(self, cfg, master_addr: str, master_port: int, attempt: int) -> dict:
        """Train in a fresh child process until it finishes (its summary), fails (its exception is re-raised
        here) or dies (RankProcessDied). `attempt` numbers the supervisor's attempts: heartbeats are
        answered per attempt, so a poll that overtakes this call never sees the last attempt's steps."""
        env = dict(os.environ, MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                   WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank))
        # Ray narrows CUDA_VISIBLE_DEVICES to the GPU it gave this actor, which is then cuda:0.
        on_gpu = bool(ray.get_gpu_ids())
        rank_env = RankEnvArgs(self.rank, 0 if on_gpu else self.local_rank, self.world_size,
                               set_threads=not on_gpu and not cfg.train.cpu_threads)
        receive, send = self.ctx.Pipe(duplex=False)
        with self.lock:
            self.attempt, self.records, self.outcome = attempt, [], None
            records = self.records  # this attempt's, even if a later one replaces self.records
            self.proc = self.ctx.Process(target=_train_process, name=f"keel-rank{self.rank}",
                                         args=(cfg, env, rank_env, send))
            self.proc.start()
        send.close()  # the child holds the only writer: EOF on `receive` means it is gone
        proc, last = self.proc, None
        while True:
            try:
                kind, payload = receive.recv()
            except (EOFError, OSError):
                break
            except Exception as e:  # noqa: BLE001 - a message cut short by the kill that ended the child
                last = e
                break
            if kind == "beat":
                with self.lock:
                    records.append(payload)
            elif kind == "event":  # rank 0's training events travel with its beats to the supervisor
                with self.lock:
                    records.append({"time": payload["time"], "phase": "event", "event": payload})
            else:
                last = (kind, payload)
        proc.join()
        receive.close()
        if isinstance(last, tuple) and last[0] == "done":
            self.outcome = {"state": "done"}
            return last[1]
        if isinstance(last, tuple) and last[0] == "error":
            error, facts = last[1]
            self.outcome = {"state": "error", "exitcode": proc.exitcode, **facts}
            raise error
        self.outcome = {"state": "died", "exitcode": proc.exitcode}
        raise RankProcessDied(self.rank, proc.exitcode)

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Kill the training process (a hung collective ignores anything gentler); True once it is gone."""
        proc = self.proc
        if proc is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout_s)
        return proc is None or not proc.is_alive()

    def probe(self) -> dict | None:
        """The training process's state letter from /proc (R running, S sleeping, T stopped, ...) and the CPU
        seconds it and its children have used; None when there is none. The state tells a frozen rank
        (SIGSTOP, a debugger) from the peers waiting on it; the CPU time, a rank stuck in a collective (no
        CPU) from a slow step (launcher/hang.py IdleWatch)."""
        proc = self.proc
        if proc is None or proc.pid is None:
            return None
        try:
            state, cpu = _stat(proc.pid)
            for child in _descendants(proc.pid):
                try:
                    cpu += _stat(child)[1]
                except OSError:  # it ended meanwhile
                    continue
        except (OSError, IndexError, ValueError):
            return None
        return {"state": state, "cpu_s": cpu}

    def status(self) -> dict | None:
        """How the last training process ended (None while it runs): the supervisor's evidence of who died."""
        return self.outcome

    def heartbeat(self, attempt: int, seen: int = 0) -> list[dict]:
        """Attempt `attempt`'s beats (and rank 0's events, as beats of phase "event") after the first
        `seen` (the supervisor asks for what it has not seen); none while that attempt has not started
        here. Counted by arrival, not by step number: after a loss-spike rollback the loop steps
        backwards, and its replayed steps are progress too."""
        with self.lock:
            return self.records[seen:] if attempt == self.attempt else []


class RankProcessDied(RuntimeError):
    """A rank's training process ended without a result or an exception: killed (SIGKILL, the OOM killer)
    or crashed in native code."""

    def __init__(self, rank: int, exitcode: int | None):
        self.rank, self.exitcode = rank, exitcode
        how = (f"killed by {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0
               else f"exited with code {exitcode}")
        super().__init__(f"rank {rank}'s training process {how}")

    def __reduce__(self):
        return RankProcessDied, (self.rank, self.exitcode)


# How a collective fails when a peer has died or stopped: the echo of another rank's failure.
ECHOES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport", "NCCL")

# What a training process's beats carry to the supervisor: a step's numbers, or a phase (eval, save,
# restore) starting or ending with its duration (training/loop.py `Beats`).
BEAT_FIELDS = ("phase", "step", "loss", "step_s", "tokens_per_s", "tokens", "seconds")

# What the forkserver imports once per actor; every training process forked from it starts warm. Ray is
# among them because a child re-runs the actor's __main__ (Ray's worker script, which imports ray) and
# unpickles its target from this module (which does too): ~0.7 s a restart if each child imported it.
PRELOAD = ["ray", "torch", "keel.launcher.group", "keel.training.loop", "keel.parallel.native",
           "keel.checkpoints.manager"]


@dataclass(frozen=True)
class RankEnvArgs:
    rank: int
    device_index: int
    world_size: int
    set_threads: bool


def _train_process(cfg, env: dict, args: RankEnvArgs, send) -> None:
    """The body of a rank's training process (a child of the actor's forkserver, so torch is imported)."""
    _die_with_parent(f"keel-rank{args.rank}")
    os.environ.clear()
    os.environ.update(env)
    import torch

    from ..training.loop import RankEnv, train

    if args.set_threads:
        torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))

    def beat(record: dict) -> None:
        send.send(("beat", {"time": time.time(), **{k: record[k] for k in BEAT_FIELDS if k in record}}))

    def event(record: dict) -> None:
        send.send(("event", record))

    try:
        summary = train(cfg, RankEnv(args.rank, args.device_index, args.world_size), on_beat=beat, on_event=event)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the actor, which re-raises it
        from ..training.run import user_errors

        text, user_error = str(e).strip(), isinstance(e, user_errors())
        if not user_error:  # a user error is one line, said by the driver; anything else needs its traceback
            traceback.print_exc()
        facts = {"time": time.time(), "user_error": user_error,
                 "echo": isinstance(e, torch.distributed.DistError) or any(s in text for s in ECHOES),
                 "detail": text if user_error else f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]}
        try:
            send.send(("error", (e, facts)))
        except Exception:  # noqa: BLE001 - an exception that does not pickle still reports its text
            send.send(("error", (RuntimeError(facts["detail"]), facts)))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    send.send(("done", {"rank": args.rank, "final_loss": summary.final_loss, "val_loss": summary.val_loss,
                        "first_val_loss": summary.first_val_loss, "steps": summary.steps, "tokens": summary.tokens,
                        "wall_s": summary.wall_s, "tokens_per_s": summary.tokens_per_s, "mfu": summary.mfu,
                        "run_dir": str(summary.run_dir), "incidents": summary.incidents}))


def _stat(pid: int) -> tuple[str, float]:
    """A process's state letter and CPU seconds (user + system), from /proc/PID/stat: "pid (comm) state ..."
    where comm may hold spaces, so the fields are counted after its closing parenthesis."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return fields[0], (int(fields[11]) + int(fields[12])) / _TICKS


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the thread ended, or the kernel has no children files
                continue
            found += children
            todo += children
    return found


_TICKS = os.sysconf("SC_CLK_TCK")


def _die_with_parent(name: str) -> None:
    """SIGKILL this process when its parent (the forkserver, which exits with the actor) dies: a rank's
    training must never outlive its actor, or a torn-down group would go on training behind the new one.
    Also names the process (`keel-rankN` in ps and /proc/PID/comm), which is how `keel chaos` finds it."""
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.prctl(15, name.encode()[:15])  # PR_SET_NAME
    except OSError:  # not Linux: the forkserver's exit still closes the pipe the child writes to
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


class WorkerGroup:
    """Placed and torn down as a whole; between the two it runs one attempt after another. Every attempt
    restarts every rank's training process (a failure anywhere restarts all of them), on the same actors."""

    def __init__(self, plan: GroupPlan):
        self.plan = plan
        self.pg = None
        self.workers: list = []
        self.where: list[dict] = []
        self.run_refs: list = []
        self.attempt = -1

    def place(self, timeout_s: float) -> bool:
        """Reserve the group's resources; False if the cluster has no room within `timeout_s`."""
        self.pg = placement_group(self.plan.bundles(), strategy=self.plan.strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        return bool(ready)

    def start(self, cwd: str, env_vars: dict | None = None) -> None:
        """Start one actor per rank in the placement group."""
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

    def launch(self, cfg, attempt: int) -> None:
        """Start attempt number `attempt`: a training process per rank, meeting at a fresh port on rank 0's
        node."""
        master_port = ray.get(self.workers[0].free_port.remote(), timeout=30)
        self.attempt = attempt
        self.run_refs = [w.run.remote(cfg, self.where[0]["ip"], master_port, attempt) for w in self.workers]

    def stop_training(self, timeout_s: float = 10.0) -> bool:
        """Kill every rank's training process and wait for the attempt to end; False if some actor did not
        answer (then only a teardown helps)."""
        try:
            stopped = ray.get([w.stop.remote() for w in self.workers], timeout=timeout_s)
            ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a dead or unreachable actor
            return False
        self.run_refs = []
        return all(stopped)

    def shutdown(self) -> None:
        # ray.kill, not ray.cancel: a task blocked in a collective ignores cancellation. A training process
        # dies with its actor (PR_SET_PDEATHSIG through the forkserver).
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
