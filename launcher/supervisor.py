"""Supervision: watch the worker group, and on any failure tear it down and start it again.

Failures it tells apart (the `cause` in events.jsonl):
  process_died  a rank's training process, or its actor, ended without an exception (SIGKILL, the OOM
                killer, a crash in native code)
  node_lost     the node under a rank is gone (Ray marks it dead, or the rank stops answering there)
  hang          some rank made no progress for longer than the run's steps and phases justify
                (a stuck collective, a deadlock, a frozen process; launcher/hang.py)
  error         a rank raised an exception
A restart kills every rank's training process and starts new ones in the same actors (warm: nothing is
imported again); a lost node or a dead actor instead gets a new group, waiting up to
fault.capacity_timeout_s for room. Either way the training loop resumes from the newest committed
checkpoint; fault.max_restarts bounds the restarts.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from ..parallel.dims import LayoutError, ParallelDims, check_layout
from .cluster import LauncherError
from .group import GroupPlan, RankProcessDied, WorkerGroup, check_capacity, nodes_that_fit
from .hang import HangClock, IdleWatch

POLL_S = 0.2
# How often the process states of silent ranks are asked for (a frozen or idle group is a hang at once).
STATE_CHECK_S = 1.0
# How long blame waits for the cause when every failure seen so far is the echo of another rank's.
ECHO_WAIT_S = 10.0
# On a multi-node cluster, how long an actor death may wait for its node to be declared dead.
NODE_DEATH_GRACE_S = 3.0
CAUSES = ("process_died", "node_lost", "hang", "error")


class RunFailed(LauncherError):
    """The run failed more often than fault.max_restarts allows."""


@dataclass
class Failure:
    cause: str
    detail: str
    rank: int | None
    detected: float          # time.time() when the supervisor saw it
    last_step: int           # the newest step any rank had reported
    # False for errors a restart would only repeat: a bad config, missing data, an unusable checkpoint,
    # a run still unstable after its rollbacks.
    retryable: bool = True


@dataclass
class Attempt:
    started: float
    steps: list[dict] = field(default_factory=list)   # rank 0's step records, in order
    failure: Failure | None = None
    ended: float | None = None


class EventLog:
    """The run's events.jsonl, and its only writer while the run is supervised: the launcher's own events
    and rank 0's training events, which travel with its heartbeats, are appended as they arrive. A run that
    starts from step 0 (rank 0's `run_start` with `fresh`) drops the lines from before this launch, as an
    inline run's fresh start truncates the file; a restart that starts from step 0 again keeps them."""

    def __init__(self, path: Path):
        self.path, self.events = path, []

    def write(self, kind: str, **fields) -> None:
        self.append({"kind": kind, "time": time.time(), "source": "launcher", **fields})

    def append(self, event: dict) -> None:
        self.events.append(event)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if event["kind"] == "run_start" and event.get("fresh"):
            self.path.write_text("".join(json.dumps(e) + "\n" for e in self.events))
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")


def say(message: str) -> None:
    print(f"keel: {message}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, cfg, plan: GroupPlan, cwd: str, env_vars: dict | None = None):
        self.cfg, self.plan, self.cwd, self.env_vars = cfg, plan, cwd, env_vars
        self.run_dir = Path(cwd) / cfg.train.output_dir / cfg.train.name
        self.log = EventLog(self.run_dir / "events.jsonl")
        self.attempts: list[Attempt] = []
        self.clock: HangClock | None = None  # the hang clock of the newest attempt

    # -- the restart loop ------------------------------------------------------------------------
    def run(self) -> dict:
        fault = self.cfg.fault
        check_capacity(self.plan)
        t0 = time.time()
        self.log.write("launch", world_size=self.plan.world_size, nnodes=self.plan.nnodes,
                       nproc_per_node=self.plan.nproc_per_node, max_restarts=fault.max_restarts,
                       hang_timeout_s=fault.hang_timeout_s if fault.hang_timeout_s is not None else "adaptive")
        restarts, group = 0, None
        try:
            while True:
                if group is None:
                    group = self.place(restarts, t0)
                    group.start(self.cwd, self.env_vars)
                    self.log.write("group_started", attempt=restarts, actors_s=group.actors_s,
                                   nodes=sorted({w["ip"] for w in group.where}))
                attempt = Attempt(started=time.time())
                self.attempts.append(attempt)
                group.launch(self.cfg, len(self.attempts) - 1)
                result = self.watch(group, attempt)
                attempt.ended = time.time()
                if result is not None:
                    self.finish(t0, result)
                    return {"summary": result, "goodput": self.goodput(t0)}
                failure = attempt.failure
                self.log.write("failure", cause=failure.cause, detail=failure.detail, rank=failure.rank,
                               last_step=failure.last_step, attempt=restarts,
                               detect_s=failure.detected - self._last_beat(attempt, failure.detected))
                if not failure.retryable:
                    self.log.write("gave_up", reason="not_retryable", detail=failure.detail)
                    self.finish(t0, None)
                    raise RunFailed(f"{failure.detail} (not retried: a restart would repeat it)")
                if restarts >= fault.max_restarts:
                    self.log.write("gave_up", reason="max_restarts", restarts=restarts)
                    self.finish(t0, None)
                    raise RunFailed(f"rank {failure.rank} failed ({failure.cause}: {failure.detail}) after "
                                    f"{restarts} restarts; fault.max_restarts={fault.max_restarts}. Events: "
                                    f"{self.log.path}")
                restarts += 1
                # Warm restart: the actors (and the imports their forkservers hold) stay, only the training
                # processes are started again. A lost node, or an actor that does not answer, needs new ones.
                warm = failure.cause != "node_lost" and group.stop_training()
                if not warm:
                    group.shutdown()
                    group = None
                say(f"{failure.cause} on rank {failure.rank} at step {failure.last_step} ({failure.detail}); "
                    f"restarting ({restarts}/{fault.max_restarts}, {'same' if warm else 'new'} worker actors) from "
                    f"the newest checkpoint")
                self.log.write("restart", attempt=restarts, cause=failure.cause, warm=warm,
                               teardown_s=time.time() - failure.detected)
        finally:
            if group is not None:
                group.shutdown()

    def place(self, restarts: int, t0: float) -> WorkerGroup:
        """A placed group, waiting up to fault.capacity_timeout_s for the room; with fault.elastic, a
        smaller group on the nodes that are left when the room does not come back."""
        fault = self.cfg.fault
        group = WorkerGroup(self.plan)
        place_t = time.time()
        placed = group.place(fault.capacity_timeout_s)
        if not placed and fault.elastic and restarts and self.shrink():
            group.shutdown()
            group = WorkerGroup(self.plan)
            placed = group.place(fault.capacity_timeout_s)
        if not placed:
            group.shutdown()
            self.log.write("gave_up", reason="no_capacity", waited_s=time.time() - place_t)
            self.finish(t0, None)
            raise RunFailed(f"the cluster had no room for {self.plan.world_size} workers "
                            f"({self.plan.bundles()[0]} on each of {self.plan.nnodes} nodes) within "
                            f"fault.capacity_timeout_s={fault.capacity_timeout_s:g}")
        if restarts:
            self.log.write("restart_placed", attempt=restarts, waited_for_capacity_s=time.time() - place_t)
        return group

    def shrink(self) -> bool:
        """Fit the run to the nodes that can hold a slot now, with fewer data-parallel replicas; False if
        no smaller layout works (then the run gives up as without elastic)."""
        nnodes = min(nodes_that_fit(self.plan.bundles()[0]), self.plan.nnodes - 1)
        if nnodes < 1:
            return False
        try:
            cfg = elastic_layout(self.cfg, self.plan.world_size, nnodes * self.plan.nproc_per_node)
        except LayoutError as e:
            self.log.write("elastic_refused", nnodes=nnodes, reason=str(e))
            say(f"cannot continue on {nnodes} node(s): {e}")
            return False
        old, p = self.plan, cfg.parallel
        self.plan = GroupPlan(nnodes, old.nproc_per_node, old.cpus_per_worker, old.gpus_per_worker)
        self.cfg = cfg
        self.log.write("elastic_shrink", from_world_size=old.world_size, to_world_size=self.plan.world_size,
                       from_nnodes=old.nnodes, to_nnodes=nnodes, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard)
        say(f"no room for {old.nnodes} nodes within fault.capacity_timeout_s; fault.elastic: going on with "
            f"{nnodes} node(s), {self.plan.world_size} workers (dp_replicate={p.dp_replicate}, "
            f"dp_shard={p.dp_shard})")
        return True

    # -- watching one attempt ----------------------------------------------------------------------
    def watch(self, group: WorkerGroup, attempt: Attempt) -> dict | None:
        """Until the group finishes (rank 0's summary) or fails (attempt.failure is set, None returned)."""
        n = len(group.workers)
        seen = [0] * n                        # beats received from each rank in this attempt
        clock = self.clock = HangClock.for_run(self.cfg.fault, attempt.started, n, history=self.clock)
        pending: dict[int, object] = {}       # rank -> heartbeat ref in flight
        done: dict[int, dict] = {}
        idle = IdleWatch(self.idle_hang_s())

        def take(rank: int, beats: list[dict]) -> None:
            seen[rank] += len(beats)
            now = time.time()
            for beat in beats:
                clock.observe(rank, beat, now)
                if beat.get("phase") == "event":
                    self.log.append(beat["event"])
            if rank == 0:
                attempt.steps.extend(b for b in beats if b.get("phase", "step") == "step")

        try:
            next_poll = next_state_check = time.time()
            while True:
                # At most one round of polls per POLL_S: an actor answers a heartbeat poll at once, with or
                # without news, so an unpaced loop spins on Ray calls. Measured on 2 cores: the driver and the
                # rank's actor took ~0.7 of a core between them, and a one-process run trained at 0.39x its
                # inline tokens/s.
                time.sleep(max(0.0, next_poll - time.time()))
                next_poll = time.time() + POLL_S
                for rank, w in enumerate(group.workers):
                    if rank not in pending and rank not in done:
                        pending[rank] = w.heartbeat.remote(group.attempt, seen[rank])
                ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=POLL_S)
                for rank, ref in list(pending.items()):
                    if ref not in ready:
                        continue
                    del pending[rank]
                    try:
                        take(rank, ray.get(ref, timeout=5))
                    except (RayActorError, GetTimeoutError):
                        continue  # the run ref tells the story
                finished, _ = ray.wait(group.run_refs, num_returns=len(group.run_refs), timeout=0)
                for ref in finished:
                    rank = group.run_refs.index(ref)
                    if rank in done:
                        continue
                    try:
                        done[rank] = ray.get(ref, timeout=5)
                    except Exception as e:  # noqa: BLE001 - any way a rank ends badly is a failure
                        attempt.failure = self.classify(group, rank, e, clock.newest_step)
                        return None
                if len(done) == n:
                    return done[0]
                now = time.time()
                if now >= next_state_check and (suspects := clock.suspects(now, set(done))):
                    next_state_check = now + STATE_CHECK_S
                    probes = self._probe(group)
                    frozen = self._frozen(probes)
                    if frozen is not None:
                        c = clock.clocks[frozen]
                        detail = (f"rank {frozen}'s training process is stopped (SIGSTOP?); no progress for "
                                  f"{now - c.last:.1f}s after step {c.step}; "
                                  f"ranks {', '.join(map(str, suspects))} silent")
                        attempt.failure = Failure("hang", detail, frozen, now, clock.newest_step)
                        return None
                    silent_s = clock.silent_mid_step(now, set(done))
                    active = [r for r in range(n) if r not in done]
                    if silent_s is None or probes is None:
                        idle.reset()
                    elif detail := idle.observe(now, silent_s, [probes[r] for r in active]):
                        c = clock.clocks[active[0]]
                        attempt.failure = Failure("hang", f"no progress after step {c.step}: {detail}", active[0],
                                                  now, clock.newest_step)
                        return None
                elif not clock.suspects(now, set(done)):
                    idle.reset()
                if stalled := clock.stalled(now, set(done)):
                    rank, silent, how = stalled
                    c = clock.clocks[rank]
                    where = f"in {c.phase} " if c.phase else ""
                    detail = f"no progress {where}for {silent:.1f}s after step {c.step} ({how})"
                    # Its peers wait on a frozen rank in their collectives and fall silent with it: name the
                    # one whose process is stopped, when one is.
                    frozen = self._frozen(self._probe(group))
                    if frozen is not None:
                        rank, detail = frozen, f"rank {frozen}'s training process is stopped (SIGSTOP?); " + detail
                    elif len(silent := clock.silent(now, set(done))) > 1:
                        # A rank stuck in Python or a collective looks like the peers waiting on it: say so.
                        detail += f"; ranks {', '.join(map(str, silent))} all silent since that step"
                    attempt.failure = Failure("hang", detail, rank, now, clock.newest_step)
                    return None
        finally:
            # What rank 0 said after the last poll (the events before its failure, or its run_end) is
            # still held by its actor: collect it, unless the actor cannot answer.
            try:
                take(0, ray.get(group.workers[0].heartbeat.remote(group.attempt, seen[0]), timeout=2))
            except Exception:  # noqa: BLE001
                pass

    def classify(self, group: WorkerGroup, rank: int, error: Exception, last_step: int) -> Failure:
        detected = time.time()
        # First the machinery: a lost node, or a rank whose actor is gone or does not answer.
        dead_nodes = {n["NodeID"] for n in ray.nodes() if not n.get("Alive")}
        pings = {r: w.where.remote() for r, w in enumerate(group.workers)}
        ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=1.0)
        lost = dead = None
        for r, ref in pings.items():
            node = group.where[r]["node_id"] if r < len(group.where) else None
            if node in dead_nodes:
                return Failure("node_lost", f"node {group.where[r]['ip']} ({node[:8]}) is gone", r, detected,
                               last_step)
            if ref not in ready:
                lost = lost if lost is not None else r
                continue
            try:
                ray.get(ref, timeout=1)
            except (ActorDiedError, RayActorError) as e:
                dead = dead or (r, _first_line(e))
        if lost is not None:
            return Failure("node_lost", "the rank stopped answering (its node is unreachable)", lost, detected,
                           last_step)
        if dead is not None:
            return self._actor_died(group, *dead, detected, last_step)
        # Every actor answers: ask how each rank's training process ended.
        culprit = self._culprit(group)
        if culprit is not None:
            r, o = culprit
            if o["state"] == "died":
                return Failure("process_died", str(RankProcessDied(r, o["exitcode"])), r, detected, last_step)
            return Failure("error", o["detail"], r, detected, last_step, retryable=not o["user_error"])
        cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
        return Failure("error", _first_line(cause), rank, detected, last_step)

    @staticmethod
    def _actor_died(group: WorkerGroup, rank: int, detail: str, detected: float, last_step: int) -> Failure:
        if rank < len(group.where) and len(ray.nodes()) > 1:
            # When a node vanishes its processes die with it, and Ray reports the dead actors before its
            # health checks declare the node dead: give them a moment to tell a lost node from a crash.
            node = group.where[rank]["node_id"]
            deadline = time.time() + NODE_DEATH_GRACE_S
            while time.time() < deadline:
                if any(n["NodeID"] == node and not n.get("Alive") for n in ray.nodes()):
                    return Failure("node_lost", f"node {group.where[rank]['ip']} ({node[:8]}) is gone", rank,
                                   detected, last_step)
                time.sleep(0.2)
        return Failure("process_died", detail, rank, detected, last_step)

    @staticmethod
    def _culprit(group: WorkerGroup, wait_s: float = 1.0) -> tuple[int, dict] | None:
        """The rank that failed first, with how its training process ended.

        A failure echoes: when one rank dies or raises, its peers' collectives fail too (gloo: "connection
        closed by peer"), and those errors can reach the supervisor first. So wait a moment for every rank
        to tell how its process ended, then blame a process that died without an exception, else the
        first exception that is not such an echo, else the first exception."""
        start = time.time()
        while True:
            try:
                outcomes = ray.get([w.status.remote() for w in group.workers], timeout=wait_s)
            except Exception:  # noqa: BLE001 - an actor that cannot answer is judged by the caller
                return None
            failed = [o for o in outcomes if o and o["state"] in ("died", "error")]
            # An echo means the cause is elsewhere: a rank that raised reports only after tearing down its
            # process group (which is what its peers' collectives noticed), so give it longer to tell.
            only_echoes = bool(failed) and all(o.get("echo") for o in failed)
            waited = time.time() - start
            if any(o["state"] == "died" for o in failed) or all(outcomes) or \
                    waited > (ECHO_WAIT_S if only_echoes else wait_s):
                break
            time.sleep(0.05)
        failed = [(r, o) for r, o in enumerate(outcomes) if o and o["state"] in ("died", "error")]
        if not failed:
            return None
        return min(failed, key=lambda ro: (ro[1]["state"] != "died", ro[1].get("echo", False),
                                           ro[1].get("time", 0.0)))

    def idle_hang_s(self) -> float:
        """fault.idle_hang_s where an idle group can be told from a slow one: with the adaptive limit (a set
        fault.hang_timeout_s is the one rule) and no GPUs (a rank waiting on its GPU may use no CPU either)."""
        fault = self.cfg.fault
        return 0.0 if fault.hang_timeout_s is not None or self.plan.gpus_per_worker else fault.idle_hang_s

    @staticmethod
    def _probe(group: WorkerGroup) -> list[dict | None] | None:
        """Every rank's training process state and CPU time (group.py probe); None if an actor cannot answer."""
        try:
            return ray.get([w.probe.remote() for w in group.workers], timeout=2)
        except Exception:  # noqa: BLE001 - an actor that cannot answer: the hang limit still stands
            return None

    @staticmethod
    def _frozen(probes: list[dict | None] | None) -> int | None:
        """The first rank whose training process is stopped (state T), if any."""
        return next((r for r, p in enumerate(probes or []) if p and p["state"] in ("T", "t")), None)

    @staticmethod
    def _last_beat(attempt: Attempt, default: float) -> float:
        return attempt.steps[-1]["time"] if attempt.steps else attempt.started

    # -- accounting --------------------------------------------------------------------------------
    def goodput(self, t0: float) -> dict:
        """Wall time split into productive steps, re-computed steps and time lost to failures.

        A step counts once, at its last execution; every earlier execution of the same step number was
        lost work, charged to what made the run do it again: the failure that ended that attempt, or a
        rollback when the step was replayed within the same attempt."""
        wall = time.time() - t0
        last_run: dict[int, tuple[int, float]] = {}   # step -> (attempt index, step_s) of its newest execution
        lost_s: dict[str, float] = {}
        lost_steps: dict[str, int] = {}
        for i, a in enumerate(self.attempts):
            for r in a.steps:
                if (prev := last_run.get(r["step"])) is not None:
                    j, seconds = prev
                    cause = "rollback" if j == i else (self.attempts[j].failure.cause
                                                       if self.attempts[j].failure else "restart")
                    lost_s[cause] = lost_s.get(cause, 0.0) + seconds
                    lost_steps[cause] = lost_steps.get(cause, 0) + 1
                last_run[r["step"]] = (i, r["step_s"])
        productive = sum(seconds for _, seconds in last_run.values())
        recover = []
        for prev, nxt in zip(self.attempts, self.attempts[1:]):
            if prev.failure and nxt.steps:
                recover.append(nxt.steps[0]["time"] - prev.failure.detected)
        by_cause = {c: sum(1 for a in self.attempts[:-1] if a.failure and a.failure.cause == c) for c in CAUSES}
        detect = [a.failure.detected - self._last_beat(a, a.failure.detected)
                  for a in self.attempts if a.failure]
        return {"wall_s": wall, "productive_s": productive, "recomputed_s": sum(lost_s.values()),
                "recomputed_steps": sum(lost_steps.values()),
                "recomputed_by_cause": {c: {"steps": lost_steps[c], "seconds": lost_s[c]} for c in lost_s},
                "restarts": len(self.attempts) - 1,
                "restarts_by_cause": {c: k for c, k in by_cause.items() if k},
                "detect_s": detect, "recover_s": recover,
                "lost_to_restarts_s": sum(detect) + sum(recover),
                "goodput": productive / wall if wall > 0 else float("nan")}

    def finish(self, t0: float, result: dict | None) -> None:
        g = self.goodput(t0)
        self.log.write("goodput", **g)
        self.last_goodput = g


def elastic_layout(cfg, world_size: int, new_world_size: int):
    """`cfg` with its data-parallel degrees cut down to fit `new_world_size` processes (tp and pp kept;
    dp_shard kept while it still divides the replicas left, so a hybrid run stays hybrid). Raises
    LayoutError when no such layout exists or the global batch does not split over it."""
    p = cfg.parallel
    dims = ParallelDims.of(p, world_size)
    if new_world_size % (dims.tp * dims.pp):
        raise LayoutError(f"{new_world_size} processes do not hold whole tp={dims.tp} x pp={dims.pp} groups")
    dp = new_world_size // (dims.tp * dims.pp)
    shard = dims.dp_shard if dp % dims.dp_shard == 0 else dp
    new = dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp_replicate=dp // shard, dp_shard=shard,
                                                                tp=dims.tp, pp=dims.pp))
    check_layout(new, ParallelDims.of(new.parallel, new_world_size))
    return new


def goodput_line(g: dict) -> str:
    causes = ", ".join(f"{k} {v}" for k, v in g["restarts_by_cause"].items()) or "none"
    redone = ", ".join(f"{c} {v['steps']}" for c, v in g.get("recomputed_by_cause", {}).items())
    return (f"goodput {100 * g['goodput']:.0f}%: wall {g['wall_s']:.1f}s, productive steps {g['productive_s']:.1f}s, "
            f"re-computed {g['recomputed_steps']} steps ({g['recomputed_s']:.1f}s{'; ' + redone if redone else ''}), "
            f"lost to restarts {g['lost_to_restarts_s']:.1f}s; restarts {g['restarts']} ({causes})")


def _first_line(e: BaseException) -> str:
    if isinstance(e, (ActorDiedError, RayActorError)) and not isinstance(e, RayTaskError):
        text = str(e)
        exit_type = text.split("Worker exit type: ")[1].split()[0] if "Worker exit type: " in text else "unknown"
        return f"{type(e).__name__}: the rank's process died (Ray worker exit type {exit_type})"
    text = str(e).strip().splitlines()
    # Ray's wrapped errors start with a banner; the last line names the exception.
    for line in reversed(text):
        if line.strip():
            return f"{type(e).__name__}: {line.strip()}"[:300]
    return type(e).__name__
