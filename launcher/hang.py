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

    def silent(self, now: float, done: set[int]) -> list[int]:
        """The ranks silent for more than half their limit: all of them when one hangs a collective."""
        return [r for r, c in enumerate(self.clocks) if r not in done and now - c.last > self.limit(r)[0] / 2]

    @property
    def newest_step(self) -> int:
        return max((c.step for c in self.clocks), default=0)
