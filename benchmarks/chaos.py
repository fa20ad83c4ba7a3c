"""A chaos soak: one supervised 2-rank run of configs/tiny.yaml through the Ray launcher, hit by N faults
of ten kinds at random moments, against an uninterrupted run of the same seed and config.

Faults (--kinds picks among them):
  kill_process     SIGKILL of a rank's training process (`keel-rankN`, found in /proc)
  kill_actor       SIGKILL of that rank's Ray actor (`ray::RankWorker`, its ancestor): a cold restart
  freeze           SIGSTOP of a rank's training process: only hang detection can see it; the restart must
                   SIGKILL the stopped process (checked)
  hang_collective  `hang:rR@STEP`: a rank stops after a step, its peer waits in the next collective
  exception        `raise:rR@STEP`
  kill_in_save     `kill_in_save@STEP`: every rank SIGKILLed while that checkpoint is written
  corrupt_shard    bytes in the middle of a shard of the newest committed checkpoint overwritten (same
                   size), then a training process SIGKILLed: the restart must skip it for the previous one
  enospc           `enospc_in_save@STEP`: a full disk during a save (skipped with a note where
                   keel.training.config.FAULT_ACTIONS lacks it)
  nan              `nan@STEP`: NaN gradients (the loss-spike policy drops the update)
  garbage          `garbage@A-B`: random-token batches (the policy skips, then rolls back); placed after
                   the spike detector's warm-up (stability.warmup accepted steps), before which it judges
                   nothing by design
The first four are done by a thread of this script while the run goes on; the others are `fault.inject`
specs planned before the run (each fires once per run folder). Every fault gets a slot of its own,
drawn at random (seeded) over the run's steps, so no two overlap: an external fault is done once the run
has passed its slot's step (plus a random delay of up to two seconds), is training (a new step in
metrics.jsonl) and has recovered from the fault before.

Both runs go through keel's Python API (`keel.launcher.raylaunch.train_on_ray`, what `keel train` calls)
on one embedded Ray started here with keel's own defaults (loopback, private token), so the actors and
training processes the faults hit are this process's descendants and nobody else's. --short also sets
data.seq_len=64 (the model is tiny.yaml's) so that both runs and four recoveries fit in a few minutes.

Measured from the run's own files (metrics.jsonl, events.jsonl, fault markers), per fault: detected by
what (the failure / anomaly / checkpoint_failed / checkpoint_skipped event), detection time (external:
injection -> failure event; injected specs: the fault's marker, or the start of the faulty step -> the
event), recovery time (failure event -> the next step record), steps lost (computed again); for the run:
the effective training time ratio (productive step time / wall, from the supervisor's goodput event and
recomputed here from metrics.jsonl), the final loss against the clean run (identical to rel 1e-6 with
infrastructure faults only; with nan/garbage the final validation loss within 1%, since a rollback skips
data), and that every committed checkpoint left passes keel.checkpoints.manifest.problems. Exit status 1
if a fault went undetected or unrecovered, the run failed, or a check failed.

    python benchmarks/chaos.py                      # 12 faults, all kinds, 520 steps (0.5-1.3 s a step on 2 cores)
    python benchmarks/chaos.py --short              # 4 faults, 60 steps, for CI (tests/test_chaos.py)
    python benchmarks/chaos.py --faults 6 --kinds kill_process,freeze,corrupt_shard --seed 3

Writes OUT/chaos.csv (one row per fault), OUT/chaos.json (the summary) and OUT/chaos.png (loss of both
runs with the faults marked, and the chaos run's progress over wall time).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("kill_process", "kill_actor", "freeze", "hang_collective", "exception", "kill_in_save", "corrupt_shard",
         "enospc", "nan", "garbage")
EXTERNAL = ("kill_process", "kill_actor", "freeze", "corrupt_shard")
DATA = ("nan", "garbage")
# What each kind must show in events.jsonl: the failure causes that count as its detection.
FAILURE_CAUSES = {"kill_process": ("process_died",), "kill_actor": ("process_died", "node_lost"),
                  "freeze": ("hang",), "hang_collective": ("hang",), "exception": ("error",),
                  "kill_in_save": ("process_died",), "corrupt_shard": ("process_died",)}
SHORT_KINDS = ("kill_process", "corrupt_shard", "exception", "kill_in_save")
RANKS = 2
# tiny.yaml's global batch is 16: 8 a rank with dp_shard=2, one micro-batch each.
BASE = ["parallel.dp_shard=2", "train.micro_batch_size=8", "logging.progress=false", "logging.wandb.mode=disabled"]


@dataclass
class Fault:
    kind: str
    slot: int                        # the step the fault is planned at (external: done once the run passed it)
    rank: int | None = None
    spec: str | None = None          # the fault.inject spec, for injected kinds
    last: int | None = None          # garbage: the last batch of the range
    injected: bool = False
    t_inject: float | None = None    # wall time of the injection (marker time for injected specs)
    step_at_inject: int | None = None
    pid: int | None = None           # the process signalled
    target: str | None = None        # corrupt_shard: the file overwritten
    note: str = ""
    frozen_killed: bool | None = None
    moot: bool = False               # garbage whose batches an earlier rollback skipped: never served
    # filled in by analyse()
    detected: bool = False
    detected_by: str = ""            # the evidence, in full
    how: str = ""                    # the evidence, in short
    cause: str = ""
    detect_s: float | None = None
    recover_s: float | None = None
    recovered: bool = False
    steps_lost: int | None = None


# -- planning -------------------------------------------------------------------------------------------
def plan(kinds: list[str], n: int, steps: int, interval: int, rng: random.Random) -> list[Fault]:
    """Kinds for n faults (each selected kind once before any repeats) on n slots spread over the run."""
    order = list(kinds)
    rng.shuffle(order)
    # Repeats are drawn from the kinds other than garbage where there are others: a rollback skips the
    # next skip_batches batches (200 by default), which would likely swallow a second garbage range.
    again = [k for k in kinds if k != "garbage"] or list(kinds)
    chosen = order[:n] + [rng.choice(again) for _ in range(n - len(order))]
    rng.shuffle(chosen)
    # Two committed checkpoints before the first fault: a restart always has one to resume from, and a
    # corrupted newest one has a previous one to fall back to.
    lo, hi = 2 * interval + 2, steps - 2 * interval
    if hi - lo < 4 * n:
        raise SystemExit(f"chaos: {steps} steps are too few for {n} faults with checkpoint.interval={interval}; "
                         f"raise --steps")
    width = (hi - lo) / n
    slots = [int(lo + width * (i + rng.uniform(0.25, 0.75))) for i in range(n)]
    # The loss-spike detector judges only after `stability.warmup` accepted steps: bad data before then is
    # trained on, by design. So garbage gets a slot past it (a NaN is caught at any step).
    from keel.training.config import StabilityConfig

    late = StabilityConfig().warmup + 5
    assigned: list[tuple[int, str]] = []
    for kind in sorted(chosen, key=lambda k: k != "garbage"):
        free = [s for s in slots if kind != "garbage" or s >= late]
        if not free:
            raise SystemExit(f"chaos: garbage needs a slot after step {late} (the spike detector's warm-up); "
                             f"raise --steps")
        slot = rng.choice(free)
        slots.remove(slot)
        assigned.append((slot, kind))
    faults = []
    for slot, kind in sorted(assigned):
        f = Fault(kind, slot, rank=rng.randrange(RANKS))
        if kind in ("kill_in_save", "enospc"):  # a checkpoint step inside the slot
            f.slot = max(lo // interval + 1, round(slot / interval)) * interval
            f.rank = None
        if kind == "hang_collective":
            f.spec = f"hang:r{f.rank}@{f.slot}"
        elif kind == "exception":
            f.spec = f"raise:r{f.rank}@{f.slot}"
        elif kind == "kill_in_save":
            f.spec = f"kill_in_save@{f.slot}"
        elif kind == "enospc":
            f.spec = f"enospc_in_save@{f.slot}"
        elif kind == "nan":
            f.rank, f.spec = None, f"nan@{f.slot}"
        elif kind == "garbage":
            f.rank, f.last = None, f.slot + rng.randint(0, 2)
            f.spec = f"garbage@{f.slot}-{f.last}"
        faults.append(f)
    return sorted(faults, key=lambda f: f.slot)


# -- the processes of the run ---------------------------------------------------------------------------
def _parent(pid: int) -> int:
    try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


def rank_process(rank: int, driver: int) -> int | None:
    """The live training process of `rank` of this script's run (other runs on the machine are left alone:
    it must descend from our `keel train`, whose embedded Ray started the actors)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        pid = int(entry.name)
        if comm == f"keel-rank{rank}" and _state(pid) not in (None, "Z", "X") and _descends(pid, driver):
            found.append(pid)
    return max(found) if found else None


def actor_of(pid: int) -> int | None:
    """The rank's Ray actor: the training process's first ancestor that is a Ray worker (the forkserver,
    its parent, is a plain Python)."""
    while pid > 1:
        pid = _parent(pid)
        if _cmdline(pid).startswith("ray::"):
            return pid
    return None


def newest_committed(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".replaced"))
                  and (p / "manifest.json").is_file())
    return done[-1] if done else None


def corrupt(folder: Path, rng: random.Random) -> Path:
    """Overwrite 64 bytes in the middle of one shard, keeping its size (so only the checksum can tell)."""
    shard = rng.choice(sorted(folder.glob("__*.distcp")))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(size // 2)
        old = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
        f.flush()
        os.fsync(f.fileno())
    return shard


# -- reading the run dir --------------------------------------------------------------------------------
class Tail:
    """Lines of a JSONL file as they are appended; a file that starts over (a fresh restart truncates it)
    is read again from its start, and what was read before is kept."""

    def __init__(self, path: Path):
        self.path, self.offset, self.records = path, 0, []

    def poll(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:
            self.offset = 0
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        new = []
        for line in complete.splitlines():
            try:
                new.append(json.loads(line))
            except ValueError:  # rewritten under us (a fresh start drops the older lines): skip the piece
                continue
        self.records.extend(new)
        return new


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- the injector thread --------------------------------------------------------------------------------
class Chaos(threading.Thread):
    def __init__(self, faults: list[Fault], run_dir: Path, driver: int, step_s: float, rng: random.Random):
        super().__init__(daemon=True)
        self.faults = [f for f in faults if f.kind in EXTERNAL]
        self.spec_steps = sorted(s for f in faults if f.spec for s in range(f.slot, (f.last or f.slot) + 1))
        self.run_dir, self.driver, self.rng = run_dir, driver, rng
        self.metrics, self.events = Tail(run_dir / "metrics.jsonl"), Tail(run_dir / "events.jsonl")
        self.live_s = max(3.0, 4 * step_s)
        self.stop = threading.Event()
        self.log: list[str] = []

    def say(self, message: str) -> None:
        line = f"chaos {time.strftime('%H:%M:%S')}: {message}"
        self.log.append(line)
        print(line, flush=True)

    def _refresh(self) -> tuple[dict | None, float]:
        self.metrics.poll()
        self.events.poll()
        steps = [r for r in self.metrics.records if r.get("kind") == "step"]
        failures = [e["time"] for e in self.events.records if e["kind"] in ("failure", "restart")]
        return (steps[-1] if steps else None), (max(failures) if failures else 0.0)

    def training(self, since: float) -> dict | None:
        """The newest step record when the run is training now: a step in the last few step times, after
        the last failure and after `since`."""
        last, failed = self._refresh()
        if last is None or last["time"] < max(failed, since) or time.time() - last["time"] > self.live_s:
            return None
        return last

    def run(self) -> None:
        since = 0.0
        for f in self.faults:
            while not self.stop.is_set():
                last = self.training(since)
                near = last and any(last["step"] - 3 <= s <= last["step"] + 6 for s in self.spec_steps)
                if last and last["step"] >= f.slot and not near:
                    break
                time.sleep(0.1)
            if self.stop.is_set():
                return
            self.stop.wait(self.rng.uniform(0.0, 2.0))
            if f.kind == "corrupt_shard":
                self._await_fresh_checkpoint()
            # The run may have gone quiet meanwhile (an injected spec fired): wait until it trains again.
            while not self.stop.is_set() and (last := self.training(since)) is None:
                time.sleep(0.1)
            if self.stop.is_set():
                return
            try:
                self.inject(f, last["step"])
            except Exception as e:  # noqa: BLE001 - a fault that could not be done is reported, not fatal
                f.note = f"not injected: {type(e).__name__}: {e}"
                self.say(f"{f.kind}: {f.note}")
            if f.injected:
                since = f.t_inject
                if f.kind == "freeze":
                    self._check_frozen_killed(f)
        self.say("all external faults done")

    def _await_fresh_checkpoint(self) -> None:
        """Corrupt right after a commit, so no newer checkpoint can commit before the kill."""
        t = time.time()
        while not self.stop.is_set():
            self._refresh()
            if any(e["kind"] == "checkpoint_saved" and e["time"] > t for e in self.events.records):
                return
            time.sleep(0.05)

    def inject(self, f: Fault, step: int) -> None:
        pid = rank_process(f.rank, self.driver)
        if pid is None:
            raise RuntimeError(f"no keel-rank{f.rank} process of this run found")
        if f.kind == "kill_actor":
            actor = actor_of(pid)
            if actor is None:
                raise RuntimeError(f"no Ray actor found above keel-rank{f.rank} (pid {pid})")
            pid = actor
        if f.kind == "corrupt_shard":
            folder = newest_committed(self.run_dir / "checkpoints")
            if folder is None:
                raise RuntimeError("no committed checkpoint to corrupt")
            f.target = str(corrupt(folder, self.rng))
        f.t_inject, f.step_at_inject, f.pid = time.time(), step, pid
        os.kill(pid, signal.SIGSTOP if f.kind == "freeze" else signal.SIGKILL)
        f.injected = True
        what = {"kill_process": f"SIGKILL keel-rank{f.rank} (pid {pid})",
                "kill_actor": f"SIGKILL rank {f.rank}'s actor (pid {pid})",
                "freeze": f"SIGSTOP keel-rank{f.rank} (pid {pid})",
                "corrupt_shard": f"corrupted {f.target}, then SIGKILL keel-rank{f.rank} (pid {pid})"}[f.kind]
        self.say(f"{f.kind} after step {step}: {what}")

    def _check_frozen_killed(self, f: Fault) -> None:
        """After the restart that follows, the stopped process must be gone (SIGKILLed by its actor)."""
        while not self.stop.is_set() and self.training(f.t_inject) is None:
            time.sleep(0.2)
        state = _state(f.pid)
        try:
            same = Path(f"/proc/{f.pid}/comm").read_text().strip() == f"keel-rank{f.rank}"
        except OSError:
            same = False
        f.frozen_killed = state in (None, "Z", "X") or not same
        self.say(f"freeze: stopped process {f.pid} {'is gone' if f.frozen_killed else f'still there (state {state})'}")


# -- running --------------------------------------------------------------------------------------------
def train(run_dir: Path, sets: list[str], timeout_s: float, faults: list[Fault] | None, step_s: float,
          rng: random.Random) -> tuple[dict | None, str, float, Chaos | None]:
    """One run through keel's Ray launcher, in this process (the Ray instance this script started, so its
    actors and their training processes are this process's descendants). Returns (the launcher's result
    or None, the error if it failed, wall seconds, the injector thread)."""
    from keel.launcher.raylaunch import train_on_ray

    chaos = None
    if faults is not None:
        chaos = Chaos(faults, run_dir, os.getpid(), step_s, rng)
        chaos.start()

    def overdue() -> None:  # a run that never ends must not hang CI: report and leave
        print(f"chaos: the {run_dir.name} run took longer than {timeout_s:.0f}s; giving up", flush=True)
        os._exit(124)

    watchdog = threading.Timer(timeout_s, overdue)
    watchdog.daemon = True
    watchdog.start()
    t0, result, error = time.time(), None, ""
    try:
        result = train_on_ray(str(ROOT / "configs" / "tiny.yaml"), sets)
    except Exception as e:  # noqa: BLE001 - RunFailed and anything else: the run failed
        error = f"{type(e).__name__}: {e}"
        print(f"chaos: the {run_dir.name} run failed: {error}", flush=True)
    finally:
        watchdog.cancel()
    wall = time.time() - t0
    if chaos is not None:
        chaos.stop.set()
        chaos.join(timeout=10)
    return result, error, wall, chaos


def marker_time(run_dir: Path, spec: str) -> float | None:
    name = spec.replace(":", "_").replace("@", "_at_")
    times = [float(p.read_text().split()[0]) for p in (run_dir / "faults").glob(f"{name}.rank*")
             if p.read_text().strip()]
    return min(times) if times else None


def analyse(faults: list[Fault], run_dir: Path, steps_seen: list[dict]) -> list[dict]:
    """Match every injected fault to the event that detected it, and measure detection and recovery.
    Returns the failure events no fault explains."""
    events = sorted(read_jsonl(run_dir / "events.jsonl"), key=lambda e: e["time"])
    steps = sorted(steps_seen, key=lambda r: r["time"])
    failures = [e for e in events if e["kind"] == "failure"]
    used: set[int] = set()

    def next_step_after(t: float) -> dict | None:
        return next((r for r in steps if r["time"] > t), None)

    for f in faults:
        if f.spec and f.kind not in DATA:
            f.t_inject = marker_time(run_dir, f.spec)
            f.injected = f.t_inject is not None or f.injected
        if f.kind == "garbage":
            # Garbage belongs to batches (0-based slot-1 .. last-1), not steps: a rollback's skip may mean
            # they are never served.
            for e in events:
                lo, hi = e.get("skipped_batches", (0, 0)) if e["kind"] == "rollback" else (0, 0)
                if lo <= f.slot - 1 and (f.last or f.slot) - 1 < hi and not any(
                        x["kind"] == "anomaly" and f.slot <= x.get("step", -1) <= (f.last or f.slot) for x in events):
                    f.moot, f.note = True, (f"never served: batches {lo}..{hi - 1} were skipped by the rollback "
                                            f"from step {e.get('from_step')}")
        if f.kind in DATA:
            first = next((r for r in steps if f.slot <= r["step"] <= (f.last or f.slot)), None)
            f.injected = first is not None and not f.moot
            before = [r for r in steps if first and r["time"] < first["time"]]
            f.t_inject = before[-1]["time"] if before else (first["time"] if first else None)
        if f.kind == "enospc" and f.t_inject is None:
            at = next((r for r in steps if r["step"] == f.slot), None)
            f.t_inject, f.injected = (at["time"], True) if at else (None, False)

    for f in sorted([f for f in faults if f.injected and f.t_inject is not None], key=lambda f: f.t_inject):
        if f.kind in FAILURE_CAUSES:
            i, ev = next(((i, e) for i, e in enumerate(failures) if i not in used and e["time"] >= f.t_inject - 0.5),
                         (None, None))
            if ev is None:
                continue
            used.add(i)
            f.cause, f.detect_s = ev["cause"], ev["time"] - f.t_inject
            f.detected = ev["cause"] in FAILURE_CAUSES[f.kind]
            f.detected_by = f"failure {ev['cause']} (rank {ev.get('rank')}: {ev.get('detail', '')[:120]})"
            f.how = f"failure {ev['cause']}" + (f" ({'warm' if restart.get('warm') else 'cold'} restart)"
                                               if (restart := next((e for e in events if e["kind"] == "restart"
                                                                    and e["time"] >= ev["time"]), None)) else "")
            if f.rank is not None and ev.get("rank") is not None and ev["rank"] != f.rank:
                f.note = f"the failure event blames rank {ev['rank']}; the fault hit rank {f.rank}"
            resumed = next((e for e in events if e["kind"] == "resumed" and e["time"] > ev["time"]), None)
            if f.kind == "corrupt_shard":
                folder = str(Path(f.target).parent) if f.target else ""
                skipped = next((e for e in events if e["kind"] == "checkpoint_skipped" and e["time"] > ev["time"]
                                and e.get("path") == folder), None)
                f.detected = f.detected and skipped is not None and (resumed is None or resumed["path"] != folder)
                f.detected_by += (f"; checkpoint_skipped {Path(folder).name}: {skipped['reason'][:100]}; resumed "
                                  f"from {Path(resumed['path']).name if resumed else 'scratch'}" if skipped
                                  else f"; NO checkpoint_skipped for {Path(folder).name}")
                f.how += " + checkpoint_skipped" if skipped else " (corruption NOT detected)"
            nxt = next_step_after(ev["time"])
            f.recovered = nxt is not None and (f.kind != "freeze" or f.frozen_killed is not False)
            f.recover_s = nxt["time"] - ev["time"] if nxt else None
            # Steps computed again: from the checkpoint resumed to the newest step reached before.
            start = resumed["step"] if resumed else 0
            f.steps_lost = max(0, ev.get("last_step", 0) - start)
        elif f.kind == "enospc":
            ev = next((e for e in events if e["kind"] == "checkpoint_failed" and e["time"] >= f.t_inject - 0.5), None)
            if ev is None:
                continue
            f.detected, f.cause, f.detect_s = True, "checkpoint_failed", ev["time"] - f.t_inject
            f.detected_by = f"checkpoint_failed ({ev.get('error', '')[:120]})"
            f.how = "checkpoint_failed"
            saved = next((e for e in events if e["kind"] == "checkpoint_saved" and e["time"] > ev["time"]), None)
            f.recovered, f.recover_s, f.steps_lost = saved is not None, (saved["time"] - ev["time"]) if saved else None, 0
        else:  # nan, garbage: the loss-spike policy's anomaly event at a step of the fault
            last = f.last or f.slot
            ev = next((e for e in events if e["kind"] == "anomaly" and f.slot <= e.get("step", -1) <= last
                       and e["time"] >= f.t_inject - 0.5), None)
            if ev is None:
                continue
            f.detected, f.cause, f.detect_s = True, ev.get("verdict", ""), ev["time"] - f.t_inject
            acts = [e for e in events if e["kind"] == "anomaly" and f.slot <= e.get("step", -1) <= last + 10
                    and e["time"] >= ev["time"]]
            actions = ", ".join(dict.fromkeys(str(e.get("action")) for e in acts))
            f.detected_by = f"anomaly at step {ev['step']} ({ev.get('verdict')}: {ev.get('reason', '')[:80]}; {actions})"
            f.how = f"anomaly {ev.get('verdict')} -> {actions}"
            rollback = next((e for e in events if e["kind"] == "rollback" and f.slot <= e.get("from_step", -1) <= last + 10
                             and e["time"] >= ev["time"]), None)
            if rollback:
                nxt = next_step_after(rollback["time"])
                f.recovered, f.recover_s = nxt is not None, (nxt["time"] - ev["time"]) if nxt else None
                f.steps_lost = rollback["from_step"] - rollback["to_step"]
                f.detected_by += f"; rollback {rollback['from_step']} -> {rollback['to_step']}"
                f.how += f" (rolled back {rollback['from_step']} -> {rollback['to_step']})"
            else:
                nxt = next_step_after(ev["time"])
                f.recovered, f.recover_s, f.steps_lost = nxt is not None, 0.0, 0
    return [e for i, e in enumerate(failures) if i not in used]


def last_of_each_step(steps: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in sorted(steps, key=lambda r: r["time"]):
        out[r["step"]] = r
    return out


def check_checkpoints(run_dir: Path, keep_last: int, corrupted: set[str]) -> dict:
    from keel.checkpoints.manifest import problems

    folder = run_dir / "checkpoints"
    saved = sorted({e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "checkpoint_saved"})
    left = sorted(p for p in folder.glob("step_*") if p.is_dir() and (p / "manifest.json").is_file()
                  and not p.name.endswith((".tmp", ".replaced")))
    bad = {p.name: problems(p) for p in left}
    bad = {k: v for k, v in bad.items() if v}
    present = {int(p.name.split("_")[1]) for p in left}
    missing = [s for s in saved[-keep_last:] if s not in present]
    ours = {k for k in bad if str(folder / k) in corrupted}
    return {"committed_left": [p.name for p in left], "problems": bad, "expected_missing": missing,
            "deliberately_corrupted_left": sorted(ours),
            "ok": not missing and not (set(bad) - ours)}


# -- output ---------------------------------------------------------------------------------------------
def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def plot(path: Path, clean: list[dict], chaos: list[dict], clean_eval: list[dict], chaos_eval: list[dict],
         faults: list[Fault], t0: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {k: plt.cm.tab10(i) for i, k in enumerate(KINDS)}
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 8))
    c = last_of_each_step(clean)
    x = last_of_each_step(chaos)
    a.plot(sorted(c), [c[s]["loss"] for s in sorted(c)], color="0.6", lw=2.5, label="clean run (train loss)")
    a.plot(sorted(x), [x[s]["loss"] for s in sorted(x)], color="C3", lw=0.9, label="chaos run (last execution of each step)")
    if clean_eval:
        a.plot([e["step"] for e in clean_eval], [e["val_loss"] for e in clean_eval], "o-", color="0.4", ms=4,
               label="clean val loss")
    if chaos_eval:
        a.plot([e["step"] for e in chaos_eval], [e["val_loss"] for e in chaos_eval], "x", color="C3", ms=7,
               label="chaos val loss")
    seen = set()
    for f in faults:
        if not f.injected:
            continue
        step = f.step_at_inject if f.step_at_inject is not None else f.slot
        a.axvline(step, color=colors[f.kind], ls="--", lw=1, label=None if f.kind in seen else f.kind)
        if f.t_inject:
            b.axvline(f.t_inject - t0, color=colors[f.kind], ls="--", lw=1)
        seen.add(f.kind)
    a.set_xlabel("step")
    a.set_ylabel("loss (nats/token)")
    a.set_title("configs/tiny.yaml, 2 ranks: clean vs chaos run (faults marked)")
    a.legend(fontsize=7, ncol=3)
    runs = sorted(chaos, key=lambda r: r["time"])
    b.plot([r["time"] - t0 for r in runs], [r["step"] for r in runs], ".", ms=2, color="C3", label="chaos run")
    cl = sorted(clean, key=lambda r: r["time"])
    if cl:
        b.plot([r["time"] - cl[0]["time"] + (runs[0]["time"] - t0 if runs else 0) for r in cl],
               [r["step"] for r in cl], "-", color="0.6", label="clean run (aligned at its first step)")
    b.set_xlabel("wall time since the chaos run's launch (s); dashed: fault injections")
    b.set_ylabel("step")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=None, help="how many faults (default 12; --short: 4)")
    p.add_argument("--kinds", default=None, help=f"comma-separated, of {','.join(KINDS)} (default all; --short: "
                   f"{','.join(SHORT_KINDS)})")
    p.add_argument("--seed", type=int, default=0, help="fault plan and times (train.seed stays the config's)")
    p.add_argument("--steps", type=int, default=None,
                   help="train.steps (default 40 per fault slot: a fault every ~30-60 s at 0.5-1 s a step; --short: 60)")
    p.add_argument("--interval", type=int, default=None, help="checkpoint.interval (default 10; --short: 5)")
    p.add_argument("--hang-timeout", type=float, default=None,
                   help="fault.hang_timeout_s for the chaos run (default: keel's own, adaptive)")
    p.add_argument("--short", action="store_true", help="4 faults of different kinds on a short run (CI)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--workdir", default=None, help="where the two runs go (default: a temporary folder, removed "
                   "when everything passed)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default 3600; --short: 300)")
    p.add_argument("--reuse-clean", action="store_true", help="take the clean run already finished in --workdir "
                   "(same steps and seed) instead of training it again; its wall time is read from its events")
    p.add_argument("--reanalyse", action="store_true", help="judge the runs of --workdir again, with the faults "
                   "recorded in OUT/chaos.json (no training)")
    a = p.parse_args(argv)
    # Before Ray is imported (it reads this once): every Ray process binds to 127.0.0.1; no wandb.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["WANDB_MODE"] = "disabled"

    kinds = [k.strip() for k in (a.kinds or ",".join(SHORT_KINDS if a.short else KINDS)).split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        p.error(f"unknown fault kind(s) {unknown}; choose from {','.join(KINDS)}")
    from keel.training.config import FAULT_ACTIONS

    if "enospc" in kinds and "enospc_in_save" not in FAULT_ACTIONS:
        print("chaos: note: enospc skipped: this keel has no `enospc_in_save` fault "
              "(keel.training.config.FAULT_ACTIONS)", flush=True)
        kinds.remove("enospc")
    n = a.faults if a.faults is not None else (4 if a.short else 12)
    interval = a.interval or (5 if a.short else 10)
    steps = a.steps or (60 if a.short else 40 * (n + 1))
    timeout = a.timeout or (300 if a.short else 3600)
    rng = random.Random(a.seed)
    faults = plan(kinds, n, steps, interval, rng)

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="keel-chaos-"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.reanalyse:
        if not a.workdir:
            p.error("--reanalyse needs the --workdir of the runs")
        old = json.loads((out / "chaos.json").read_text())
        a.command = old.get("command")
        events = read_jsonl(work / "chaos" / "events.jsonl")
        t0 = next(e["time"] for e in events if e["kind"] == "launch")
        # What was planned and done; what it led to is judged again.
        names = {"kind", "slot", "rank", "spec", "last", "injected", "step_at_inject", "pid", "target", "frozen_killed"}
        faults = []
        for row in old["faults"]:
            f = Fault(**{k: v for k, v in row.items() if k in names})
            if f.kind in EXTERNAL and row.get("t_inject_s") is not None:
                f.t_inject = t0 + row["t_inject_s"]
            faults.append(f)
        return report(a, old["kinds"], faults, old["steps"], old["checkpoint_interval"], work, out, old["clean_wall_s"],
                      old["wall_s"], old.get("error") or ("" if old["exit_code"] == 0 else "the run failed"),
                      read_jsonl(work / "chaos" / "metrics.jsonl"), old["chaos_log"], old["overrides"])

    if a.reuse_clean and not a.workdir:
        p.error("--reuse-clean needs the --workdir of the finished clean run")
    for name in ("chaos",) if a.reuse_clean else ("clean", "chaos"):
        shutil.rmtree(work / name, ignore_errors=True)
    sets = [*BASE, f"train.steps={steps}", f"checkpoint.interval={interval}", f"train.eval_every={max(1, steps // 6)}",
            f"logging.log_every={max(1, steps // 10)}", f"train.output_dir={work}"]
    if a.short:  # the CI version: shorter sequences, so two runs and four recoveries fit in ~3 minutes
        sets.append("data.seq_len=64")
    specs = [f.spec for f in faults if f.spec]
    chaos_sets = [*sets, "train.name=chaos", f"fault.inject=[{','.join(specs)}]",
                  f"fault.max_restarts={n + 5}"]
    if a.hang_timeout is not None:
        chaos_sets.append(f"fault.hang_timeout_s={a.hang_timeout:g}")
    print(f"chaos: {n} faults over {steps} steps (checkpoint every {interval}), seed {a.seed}; runs in {work}", flush=True)
    for f in faults:
        how = f.spec or f"external, once past step {f.slot}, rank {f.rank}"
        print(f"  slot {f.slot:5d}  {f.kind:16s} {how}", flush=True)

    # One embedded Ray for both runs (loopback only, a private token: keel's own defaults), started here,
    # so every actor and training process of the runs descends from this process.
    from keel.launcher.cluster import connect

    conn = connect(None)
    try:
        return soak(a, kinds, faults, n, steps, interval, timeout, sets, chaos_sets, work, out, rng)
    finally:
        conn.close()


def soak(a, kinds, faults, n, steps, interval, timeout, sets, chaos_sets, work, out, rng) -> int:
    # 1. The uninterrupted reference.
    if a.reuse_clean:
        print("chaos: the clean reference run of an earlier invocation ...", flush=True)
        ev = read_jsonl(work / "clean" / "events.jsonl")
        error, clean_wall = "", ev[-1]["time"] - next(e["time"] for e in ev if e["kind"] == "launch")
    else:
        print("chaos: clean reference run ...", flush=True)
        result, error, clean_wall, _ = train(work / "clean", [*sets, "train.name=clean"], timeout, None, 1.0, rng)
    clean_steps = [r for r in read_jsonl(work / "clean" / "metrics.jsonl") if r["kind"] == "step"]
    if error or not clean_steps or clean_steps[-1]["step"] != steps:
        print(f"chaos: the clean run failed: {error}", flush=True)
        return 1
    step_s = statistics.median(r["step_s"] for r in clean_steps)
    print(f"chaos: clean run {clean_wall:.0f}s, median step {step_s:.2f}s", flush=True)

    # 2. The chaos run.
    print("chaos: chaos run ...", flush=True)
    result, error, chaos_wall, chaos = train(work / "chaos", chaos_sets, timeout, faults, step_s, rng)
    chaos.metrics.poll()
    return report(a, kinds, faults, steps, interval, work, out, clean_wall, chaos_wall, error, chaos.metrics.records,
                  chaos.log, chaos_sets)


def report(a, kinds, faults, steps, interval, work, out, clean_wall, chaos_wall, error, chaos_metrics, chaos_log,
           chaos_sets) -> int:
    """Judge the chaos run in `work` against the clean one; print, write OUT/chaos.{csv,json,png}."""
    rc = 1 if error else 0
    run_dir = work / "chaos"
    clean_steps = [r for r in read_jsonl(work / "clean" / "metrics.jsonl") if r["kind"] == "step"]
    step_s = statistics.median(r["step_s"] for r in clean_steps)
    chaos_steps = [r for r in chaos_metrics if r.get("kind") == "step"]
    unexplained = analyse(faults, run_dir, chaos_steps)
    events = read_jsonl(run_dir / "events.jsonl")
    launch = next((e for e in events if e["kind"] == "launch"), None)
    goodput = next((e for e in reversed(events) if e["kind"] == "goodput"), None)
    t0 = launch["time"] if launch else (chaos_steps[0]["time"] if chaos_steps else time.time())

    # Effective training time: step time of each step's last execution over the run's wall time.
    last = last_of_each_step(chaos_steps)
    productive = sum(r["step_s"] for r in last.values())
    wall = (goodput["time"] - t0) if goodput else chaos_wall
    ratio_self = productive / wall if wall > 0 else float("nan")
    clean_metrics = read_jsonl(work / "clean" / "metrics.jsonl")
    clean_eval = [r for r in clean_metrics if r["kind"] == "eval"]
    chaos_eval = [r for r in chaos_metrics if r.get("kind") == "eval"]
    clean_final, clean_val = clean_steps[-1]["loss"], clean_eval[-1]["val_loss"] if clean_eval else None
    finished = bool(last) and max(last) == steps and rc == 0
    chaos_final = last[steps]["loss"] if steps in last else None
    chaos_val = chaos_eval[-1]["val_loss"] if chaos_eval and chaos_eval[-1]["step"] == steps else None

    injected = [f for f in faults if f.injected]
    data_faults = any(f.kind in DATA for f in injected)
    if chaos_final is None:
        loss_ok, loss_rule = False, "the chaos run did not finish"
    elif data_faults:
        rel = abs(chaos_val - clean_val) / clean_val if chaos_val is not None and clean_val else float("inf")
        loss_ok, loss_rule = rel <= 0.01, f"final val loss within 1% (data faults): rel diff {rel:.2e}"
    else:
        rel = abs(chaos_final - clean_final) / abs(clean_final)
        loss_ok, loss_rule = rel <= 1e-6, f"final train loss identical to rel 1e-6 (infrastructure faults only): rel diff {rel:.2e}"
    corrupted = {str(Path(f.target).parent) for f in faults if f.target}
    ckpts = check_checkpoints(run_dir, 3, corrupted)

    # Report.
    problems = []
    if rc != 0:
        problems.append(f"the chaos run failed: {error}")
    not_done = [f for f in faults if not f.injected and not f.moot]
    for f in not_done:
        problems.append(f"{f.kind} at slot {f.slot} was never injected ({f.note or 'the run ended first'})")
    for f in injected:
        if not f.detected:
            problems.append(f"{f.kind} ({f.spec or f'rank {f.rank} after step {f.step_at_inject}'}) not detected"
                            f"{' (seen as ' + f.detected_by + ')' if f.detected_by else ''}")
        elif not f.recovered:
            problems.append(f"{f.kind} ({f.spec or f'rank {f.rank}'}) not recovered"
                            f"{' (the SIGSTOPped process was not killed)' if f.frozen_killed is False else ''}")
    if not loss_ok:
        problems.append(f"loss check failed: {loss_rule}")
    if not ckpts["ok"]:
        problems.append(f"checkpoint check failed: {ckpts}")

    print("\nper fault:")
    print(f"{'#':>2} {'kind':15s} {'what':24s} {'detect_s':>8s} {'recover_s':>9s} {'lost':>4s}  detected by")
    for i, f in enumerate(faults):
        what = f.spec or (f"rank {f.rank} after step {f.step_at_inject}" if f.injected else "not injected")
        verdict = f.how if f.detected else (f"NOT DETECTED ({f.detected_by or 'no event'})" if f.injected
                                            else f"not injected: {f.note or 'the run ended first'}")
        if f.detected and not f.recovered:
            verdict += " (NOT RECOVERED)"
        if f.injected and f.note:
            verdict += f" [{f.note}]"
        print(f"{i:2d} {f.kind:15s} {what:24s} {fmt(f.detect_s):>8s} {fmt(f.recover_s):>9s} "
              f"{fmt(f.steps_lost, 'd'):>4s}  {verdict}")
    print("\nper kind (times in s: mean, max):")
    print(f"{'kind':15s} {'injected':>8s} {'detected':>8s} {'recovered':>9s} {'detect_s':>11s} {'recover_s':>11s} "
          f"{'lost':>4s}  how")
    per_kind = {}
    for k in KINDS:
        fs = [f for f in injected if f.kind == k]
        if not fs and k not in kinds:
            continue
        det = [f.detect_s for f in fs if f.detect_s is not None]
        rec = [f.recover_s for f in fs if f.recover_s is not None]
        how = list(dict.fromkeys(f.how for f in fs if f.detected))
        per_kind[k] = {"injected": len(fs), "detected": sum(f.detected for f in fs),
                       "recovered": sum(f.recovered for f in fs), "detect_s": det, "recover_s": rec,
                       "steps_lost": sum(f.steps_lost or 0 for f in fs), "how": how}
        span = lambda xs: f"{statistics.mean(xs):.1f}, {max(xs):.1f}" if xs else "-"  # noqa: E731
        print(f"{k:15s} {len(fs):8d} {sum(f.detected for f in fs):8d} {sum(f.recovered for f in fs):9d} "
              f"{span(det):>11s} {span(rec):>11s} {per_kind[k]['steps_lost']:4d}  {'; '.join(how)}")
    print(f"\nrun: {'finished' if finished else 'DID NOT FINISH'} {max(last) if last else 0}/{steps} steps, exit {rc}, "
          f"wall {chaos_wall:.0f}s (clean run {clean_wall:.0f}s)")
    if goodput:
        print(f"effective training time ratio: {goodput['goodput']:.3f} (supervisor's goodput event: productive "
              f"{goodput['productive_s']:.1f}s / wall {goodput['wall_s']:.1f}s; restarts {goodput.get('restarts')} "
              f"{goodput.get('restarts_by_cause')})")
    print(f"effective training time ratio: {ratio_self:.3f} (from metrics.jsonl: last execution of each step "
          f"{productive:.1f}s / launch -> goodput event {wall:.1f}s)")
    print(f"final loss: clean {clean_final:.6f}, chaos {fmt(chaos_final, '.6f')}; val loss clean {fmt(clean_val, '.4f')}, "
          f"chaos {fmt(chaos_val, '.4f')}; {loss_rule}: {'ok' if loss_ok else 'FAILED'}")
    print(f"checkpoints: {len(ckpts['committed_left'])} committed left, "
          f"{'all verified' if not ckpts['problems'] else ckpts['problems']}; newest saved all present: "
          f"{not ckpts['expected_missing']}")
    if unexplained:
        print(f"failures no injected fault explains: {len(unexplained)}")
        for e in unexplained:
            print(f"  {e['cause']} rank {e.get('rank')} at step {e.get('last_step')}: {e.get('detail', '')[:150]}")

    rows = []
    for i, f in enumerate(faults):
        d = asdict(f)
        d["index"] = i
        d["t_inject_s"] = round(f.t_inject - t0, 3) if f.t_inject else None
        rows.append(d)
    cols = ["index", "kind", "slot", "rank", "spec", "injected", "t_inject_s", "step_at_inject", "pid", "target",
            "detected", "how", "detected_by", "cause", "detect_s", "recover_s", "recovered", "steps_lost", "frozen_killed", "note"]
    with open(out / "chaos.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    summary = {
        "ok": not problems, "problems": problems, "seed": a.seed, "short": a.short, "steps": steps,
        "checkpoint_interval": interval, "kinds": kinds, "faults": rows, "per_kind": per_kind,
        "all_detected": all(f.detected for f in injected) and not not_done,
        "all_recovered": all(f.recovered for f in injected) and not not_done,
        "run_finished": finished, "exit_code": rc, "wall_s": chaos_wall, "clean_wall_s": clean_wall,
        "clean_median_step_s": step_s, "goodput_event": goodput, "effective_ratio_supervisor": goodput and goodput["goodput"],
        "effective_ratio_metrics": ratio_self, "productive_s": productive,
        "loss": {"clean_final": clean_final, "chaos_final": chaos_final, "clean_val": clean_val,
                 "chaos_val": chaos_val, "rule": loss_rule, "ok": loss_ok},
        "checkpoints": ckpts, "unexplained_failures": unexplained, "chaos_log": chaos_log, "overrides": chaos_sets,
        "workdir": str(work), "error": error,
        "command": getattr(a, "command", None) or "python benchmarks/chaos.py " + " ".join(sys.argv[1:]),
    }
    (out / "chaos.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    try:
        plot(out / "chaos.png", clean_steps, chaos_steps, clean_eval, chaos_eval, faults, t0)
    except Exception as e:  # noqa: BLE001 - a missing plot must not hide the verdict
        print(f"chaos: no plot ({type(e).__name__}: {e})")
    print(f"\nwrote {out / 'chaos.csv'}, {out / 'chaos.json'}, {out / 'chaos.png'}")
    if problems:
        print("\nCHAOS FAILED:\n  " + "\n  ".join(problems))
        print(f"runs kept in {work}")
        return 1
    print("\nchaos: every fault detected and recovered; loss and checkpoints check out")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
