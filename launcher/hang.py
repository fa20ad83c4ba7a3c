"""When a rank that says nothing is hung: a hang timeout that adapts to the run.

A fixed timeout is wrong for nearly every run: 300 s lets a 50 ms-per-step run sit hung for thousands of
steps, and is too short for a model whose evaluation or checkpoint save takes ten minutes. So by default
the limit follows what the run has shown (fault.hang_timeout_s unset):

  steps      max(fault.hang_min_s, fault.hang_step_factor x the slowest of the last RECENT steps, any rank)
  eval, save, restore (a rollback's)
             the step limit, or the factor x the longest such phase seen so far if that is longer;
             fault.startup_timeout_s until the first one has been seen
  start-up   fault.startup_timeout_s until the rank's first step of the attempt (imports, process group,
             data, checkpoint restore, the first evaluation)

A slowdown of several-fold stays under a 20x limit, while a rank stuck in a collective is caught within
tens of seconds (torchft drops a silent replica group after 5 s, NVIDIA's in-process restart waits 60-90 s,
torchrun the 10-minute NCCL timeout). A set fault.hang_timeout_s is the step limit as it is, and a floor
for the phases. Progress is counted by beats, not step numbers, so the replay after a rollback counts.

Two kinds of silence are hangs before the limit, because a slow step cannot look like them:
  stopped    a rank's training process is stopped (SIGSTOP, a suspended job)
  idle       on a CPU run with the adaptive limit, every rank has been silent mid-step for
             fault.idle_hang_s and each one's training process sleeps, using almost no CPU (IdleWatch)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RECENT = 50
PHASES = ("eval", "save", "restore")
# A rank silent this long (or twice its slowest recent step) has its process state looked at: a stopped
# process (SIGSTOP, a suspended job) is a hang now, not after the limit. In the chaos soak a frozen rank
# otherwise cost the whole 30 s floor of the limit.
FROZEN_CHECK_MIN_S = 5.0
# A CPU rank stuck in a gloo collective, or asleep, uses no CPU, where a slow but healthy step on a CPU uses
# at least a core. Measured here: a gloo rank waiting 8 s in an all_reduce used 0.04 CPU-s. So a whole group
# silent mid-step whose every process sleeps and used under IDLE_CPU of a core over at least IDLE_WINDOW_S is
# hung. In the chaos soak, both hangs in collectives had each waited out the 30 s floor of the limit.
IDLE_CPU = 0.05
IDLE_WINDOW_S = 3.0


@dataclass
class RankClock:
    last: float                    # driver clock of the rank's last beat
    stepped: bool = False          # a step of this attempt has been seen
    phase: str | None = None       # a phase it announced and has not ended
    step: int = 0                  # the newest step it reported (it goes back after a rollback)


@dataclass
class HangClock:
    hang_timeout_s: float | None
    hang_min_s: float
    factor: float
    startup_s: float
    started: float
    ranks: int
    clocks: list[RankClock] = field(init=False)
    step_s: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    longest: dict = field(default_factory=dict)  # phase -> its longest duration so far

    def __post_init__(self):
        self.clocks = [RankClock(self.started) for _ in range(self.ranks)]

    @classmethod
    def for_run(cls, fault, started: float, ranks: int, history: "HangClock | None" = None) -> "HangClock":
        """A clock for a new attempt; step and phase durations carry over from the previous attempt's."""
        clock = cls(fault.hang_timeout_s, fault.hang_min_s, fault.hang_step_factor, fault.startup_timeout_s,
                    started, ranks)
        if history is not None:
            clock.step_s.extend(history.step_s)
            clock.longest.update(history.longest)
        return clock

    def observe(self, rank: int, beat: dict, now: float) -> None:
        c = self.clocks[rank]
        c.last = now
        phase = beat.get("phase", "step")
        if phase == "step":
            c.stepped, c.phase, c.step = True, None, beat["step"]
            if beat.get("step_s") is not None:
                self.step_s.append(beat["step_s"])
        elif phase in PHASES:
            c.phase = phase
        elif phase.endswith("_end"):
            c.phase = None
            name = phase.removesuffix("_end")
            self.longest[name] = max(self.longest.get(name, 0.0), beat.get("seconds", 0.0))

    def step_limit(self) -> float:
        if self.hang_timeout_s is not None:
            return self.hang_timeout_s
        slowest = max(self.step_s, default=0.0)
        return max(self.hang_min_s, self.factor * slowest)

    def limit(self, rank: int) -> tuple[float, str]:
        """How long rank `rank` may now stay silent, and what that limit is, for the failure message."""
        c = self.clocks[rank]
        if not c.stepped:
            return self.startup_s, f"start-up allowance fault.startup_timeout_s={self.startup_s:g}"
        steps = self.step_limit()
        how = (f"fault.hang_timeout_s={steps:g}" if self.hang_timeout_s is not None else
               f"adaptive: max(fault.hang_min_s={self.hang_min_s:g}, {self.factor:g} x slowest recent step "
               f"{max(self.step_s, default=0.0):.2f}s)")
        if c.phase is None:
            return steps, how
        if c.phase not in self.longest:
            return max(steps, self.startup_s), f"first {c.phase}: fault.startup_timeout_s={self.startup_s:g}"
        allowance = self.factor * self.longest[c.phase]
        if allowance > steps:
            return allowance, f"{c.phase}: {self.factor:g} x longest {c.phase} {self.longest[c.phase]:.2f}s"
        return steps, f"{c.phase}: {how}"

    def stalled(self, now: float, done: set[int]) -> tuple[int, float, str] | None:
        """The first rank silent past its limit, with how long and the limit's description; else None."""
        for rank, c in enumerate(self.clocks):
            if rank in done:
                continue
            limit, how = self.limit(rank)
            if now - c.last > limit:
                return rank, now - c.last, how
        return None

    def suspects(self, now: float, done: set[int]) -> list[int]:
        """The ranks silent for longer than a step should ever take (FROZEN_CHECK_MIN_S, or twice the slowest
        recent step): worth asking whether their process is stopped, long before the hang limit."""
        after = max(FROZEN_CHECK_MIN_S, 2 * max(self.step_s, default=0.0))
        return [r for r, c in enumerate(self.clocks) if r not in done and now - c.last > after]

    def silent_mid_step(self, now: float, done: set[int]) -> float | None:
        """How long every unfinished rank has been silent, when all of them are suspects (past their first
        step, in no eval, save or restore): the precondition for IdleWatch. Else None."""
        active = [c for r, c in enumerate(self.clocks) if r not in done]
        if not active or any(not c.stepped or c.phase is not None for c in active):
            return None
        suspects = self.suspects(now, done)
        if len(suspects) < len(active):
            return None
        return now - max(c.last for c in active)

    def silent(self, now: float, done: set[int]) -> list[int]:
        """The ranks silent for more than half their limit: all of them when one hangs a collective."""
        return [r for r, c in enumerate(self.clocks) if r not in done and now - c.last > self.limit(r)[0] / 2]

    @property
    def newest_step(self) -> int:
        return max((c.step for c in self.clocks), default=0)


@dataclass
class IdleWatch:
    """Whether a group that is silent mid-step is idle: fed the training processes' probes (their state
    letter and CPU seconds, process and children) once a second while the silence lasts."""
    after_s: float                             # fault.idle_hang_s; 0: never
    since: float | None = None                 # when this silence's first probes were taken
    cpu0: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.since, self.cpu0 = None, []

    def observe(self, now: float, silent_s: float, probes: list[dict | None]) -> str | None:
        """A description of the idleness once it shows a hang (the group silent for after_s, every process
        sleeping and under IDLE_CPU of a core for at least IDLE_WINDOW_S); else None. A probe that could not
        be taken (None), a process that runs (state R, maybe starved by a loaded machine) or waits on a disk
        (D) starts the window again."""
        if not self.after_s or any(p is None or p.get("cpu_s") is None or p.get("state") != "S" for p in probes):
            self.reset()
            return None
        cpu = [p["cpu_s"] for p in probes]
        if self.since is None or len(cpu) != len(self.cpu0):
            self.since, self.cpu0 = now, cpu
            return None
        window = now - self.since
        used = [c - c0 for c, c0 in zip(cpu, self.cpu0)]
        if max(used) >= IDLE_CPU * max(window, IDLE_WINDOW_S):
            self.since, self.cpu0 = now, cpu  # busy: a slow step, not a hang; watch afresh
            return None
        if window < IDLE_WINDOW_S or silent_s < self.after_s:
            return None
        return (f"every rank silent {silent_s:.1f}s mid-step and idle: their training processes sleep and used "
                f"{max(used):.2f} CPU-s at most in the last {window:.1f}s (a collective or a sleep that does not "
                f"return; fault.idle_hang_s={self.after_s:g})")
