"""`keel submit/status/logs/stop/list/chaos`: runs on a cluster through the Ray Jobs API.

A submitted job is `keel train` run by the cluster: the working directory (code and config) travels as the
job's runtime_env; inside the job RAY_ADDRESS points at the cluster, so `keel train` joins it and
supervises its worker group exactly as in the foreground.
"""
from __future__ import annotations

import asyncio
import os
import random
import secrets
import shlex
import sys
import time
from pathlib import Path

from .cluster import LauncherError, auth_message, connect, job_client

# What never travels with a job: environments, VCS data, earlier runs' outputs and build products.
EXCLUDES = [".git", ".venv", "venv", "runs", "__pycache__", "*.egg-info", "build", "*.pt", "wandb"]


AGENT_WAIT_S = 60.0


def _call(fn, address: str):
    """Run a job-API call; auth and connection failures become one-line errors."""
    import ray

    try:
        return fn()
    except ray.exceptions.AuthenticationError:
        raise LauncherError(auth_message(address)) from None
    except (RuntimeError, ValueError, ConnectionError) as e:
        text = str(e).strip()
        if "401" in text or "Unauthorized" in text or "authentication" in text.lower():
            raise LauncherError(auth_message(address)) from None
        if "does not exist" in text or "not found" in text.lower() or "404" in text:
            raise LauncherError(f"no such job on {address}: {text.splitlines()[-1][:200]}") from None
        raise LauncherError(f"the Ray job API at {address} said: {text.splitlines()[-1][:300]}") from None


def submit(config: str, overrides: list[str], address: str | None, train_args: list[str],
           working_dir: str = ".", python: str = "python", nproc_per_node: int | None = None,
           nnodes: int = 1) -> str:
    # Here rather than at the top: status, logs, stop and list never read a config.
    from ..training.config import load_config
    from .raylaunch import validate, world_size_of

    cfg = load_config(config, overrides)  # a bad config never reaches the cluster
    validate(cfg, world_size_of(cfg, nproc_per_node, nnodes), nnodes)
    wd = Path(working_dir).resolve()
    cfg_path = Path(config).resolve()
    if not cfg_path.is_relative_to(wd):
        raise LauncherError(f"the config {config} is outside the working directory {wd}, so it would not travel "
                            f"with the job; copy it there or pass --working-dir")
    if not Path(cfg.train.output_dir).is_absolute():
        print(f"keel: warning: train.output_dir={cfg.train.output_dir!r} is relative, so the run's files land in "
              f"the job's temporary copy of {wd} on the head node; set an absolute, shared path to keep them",
              file=sys.stderr)
    sets = [a for o in overrides for a in ("--set", o)]
    entry = [python, "-m", "keel.launcher.cli", "train", str(cfg_path.relative_to(wd)), *sets, *train_args]
    client = job_client(address)
    addr = client.get_address()
    job_id = f"keel-{cfg.train.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"

    def send():
        return client.submit_job(entrypoint=shlex.join(entry), submission_id=job_id,
                                 runtime_env={"working_dir": str(wd), "excludes": EXCLUDES},
                                 metadata={"keel_run": cfg.train.name, "output_dir": cfg.train.output_dir})

    # A head that has just started answers before its job agent is up ("No available agent to submit job,
    # please try again later"): do as it says for a while rather than fail a freshly started cluster.
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return _call(send, addr)
        except LauncherError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1.0)


def status(address: str | None, job_id: str | None) -> list[str]:
    client = job_client(address)
    addr = client.get_address()
    if job_id is None:
        return list_jobs(address, limit=5)
    info = _call(lambda: client.get_job_info(job_id), addr)
    lines = [f"{job_id}: {info.status}"]
    if info.message:
        lines.append(f"  {info.message}")
    if info.start_time:
        end = (info.end_time or time.time() * 1000) / 1000
        lines.append(f"  running time {end - info.start_time / 1000:.1f}s")
    if getattr(info, "driver_exit_code", None) is not None:
        lines.append(f"  exit code {info.driver_exit_code}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    return lines


def list_jobs(address: str | None, limit: int | None = None) -> list[str]:
    client = job_client(address)
    addr = client.get_address()
    jobs = sorted(_call(client.list_jobs, addr), key=lambda j: j.start_time or 0, reverse=True)
    if limit:
        jobs = jobs[:limit]
    if not jobs:
        return ["no jobs"]
    out = []
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        out.append(f"{j.submission_id or j.job_id}  {j.status:<9}  {started}  {j.entrypoint[:80]}")
    return out


def logs(address: str | None, job_id: str, follow: bool = False) -> None:
    client = job_client(address)
    addr = client.get_address()
    if not follow:
        sys.stdout.write(_call(lambda: client.get_job_logs(job_id), addr))
        return
    _call(lambda: client.get_job_info(job_id), addr)  # a clear error for an unknown id

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def stop(address: str | None, job_id: str, wait_s: float = 30.0) -> str:
    client = job_client(address)
    addr = client.get_address()
    _call(lambda: client.stop_job(job_id), addr)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        st = _call(lambda: client.get_job_status(job_id), addr)
        if st.is_terminal():
            return str(st)
        time.sleep(0.5)
    return str(_call(lambda: client.get_job_status(job_id), addr))


def chaos(address: str | None, seed: int | None = None, actor: bool = False) -> dict:
    """SIGKILL one rank of a running keel job, chosen at random: a drill for supervision.

    By default the victim is the rank's training process (what a crash or the OOM killer hits; the
    supervisor restarts the training processes in the same actors). With `actor=True` it is the rank's
    actor, the agent around it (as when a node's processes die; the supervisor replaces the actors).
    Connects as a Ray client, finds the live rank actors through the state API and kills the process from
    a task pinned to its node (a real process death, not a polite `ray.kill`)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise LauncherError("keel chaos needs the cluster: pass --address HOST:PORT or set RAY_ADDRESS")
    conn = connect(address)  # first: it sets what Ray reads at import
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import list_actors

    try:
        # The cluster we are connected to, by its GCS address: left to itself, the state API looks for "the"
        # Ray instance of this machine (/tmp/ray/ray_current_cluster), which may be another one.
        gcs = ray.get_runtime_context().gcs_address
        actors = [a for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], detail=True, limit=10000)
                  if a.class_name == "RankWorker"]
        if not actors:
            raise LauncherError(f"no running keel worker found on the cluster at {address}")
        victim = random.Random(seed).choice(actors)

        @ray.remote(num_cpus=0)
        def kill(actor_pid: int, whole_actor: bool) -> int:
            import signal
            from pathlib import Path

            def parent(pid: int) -> int:
                try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces
                    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    return 0

            def descends(pid: int) -> bool:
                while pid > 1:
                    pid = parent(pid)
                    if pid == actor_pid:
                        return True
                return False

            target = actor_pid
            if not whole_actor:
                # The training process names itself keel-rankN (launcher/group.py) under the actor's forkserver.
                for entry in Path("/proc").iterdir():
                    if entry.name.isdigit():
                        try:
                            comm = (entry / "comm").read_text().strip()
                        except OSError:
                            continue
                        if comm.startswith("keel-rank") and descends(int(entry.name)):
                            target = int(entry.name)
                            break
            os.kill(target, signal.SIGKILL)
            return target

        pid = ray.get(kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(victim.node_id, soft=False))
                      .remote(victim.pid, actor), timeout=30)
        return {"actor_id": victim.actor_id, "pid": pid, "actor_pid": victim.pid, "node_id": victim.node_id,
                "name": victim.name, "what": "actor" if pid == victim.pid else "training process"}
    finally:
        conn.close()
