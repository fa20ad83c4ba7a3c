"""Injected failures (`fault.inject`), for tests and drills: the real thing, not a simulation.

A spec is ACTION[:rRANK]@STEP (or @FIRST-LAST for the data and learning-rate faults). Without a rank
every rank is hit. Process faults (kill, hang, raise, kill_in_save, enospc_in_save) fire once per run
folder: a marker file is written before they fire, so the restarted run passes the same step unharmed, as
it would after a real one-off failure. The numeric faults (nan, garbage, lr_spike) serve the stability
drills: garbage belongs to the data (the batches first served at those steps, wherever they come up
again), nan and lr_spike to steps, once each.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from .specs import Fault, parse_fault

LR_SPIKE = 100.0
SLOW_S = 0.25


class InjectedFault(RuntimeError):
    """What `raise@STEP` raises: a stand-in for any exception in user code."""


class FaultInjector:
    def __init__(self, specs: list[str], rank: int, run_dir: Path):
        self.faults = [parse_fault(s) for s in specs]
        self.rank, self.markers = rank, run_dir / "faults"
        self._fired: set[tuple[str, int]] = set()  # numeric faults already applied in this process
        self._lr_fired: dict[str, list[int]] = {}
        self._last_lr_step = -1
        self._lr_over: set[str] = set()

    def _arm(self, fault: Fault) -> bool:
        """True the first time this rank reaches `fault` in this run folder."""
        marker = self.markers / f"{fault.spec.replace(':', '_').replace('@', '_at_')}.rank{self.rank}"
        if marker.exists():
            return False
        self.markers.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as f:
            f.write(f"{time.time()}\n")
            f.flush()
            os.fsync(f.fileno())  # the marker must survive the SIGKILL that follows
        return True

    def _fire(self, action: str, step: int) -> None:
        if not any(f.action == action and f.hits(self.rank, step) and self._arm(f) for f in self.faults):
            return
        if action in ("kill", "kill_in_save"):
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "raise":
            raise InjectedFault(f"injected fault: raise in rank {self.rank} after step {step}")
        if action == "hang":
            while True:  # like a rank stuck in a collective: alive, making no progress
                time.sleep(60)
        if action == "enospc_in_save":  # what a write to a full disk raises, from inside the save
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: enospc_in_save at step {step}, "
                          f"rank {self.rank})")

    def slow(self, step: int) -> None:
        """Part of step `step`'s time: a healthy but slower step, every time it runs (a replay too)."""
        if any(f.action == "slow" and f.hits(self.rank, step) for f in self.faults):
            time.sleep(SLOW_S)

    def after_step(self, step: int) -> None:
        for action in ("kill", "raise", "hang"):
            self._fire(action, step)

    # -- numeric faults, for the stability drills -----------------------------------------------------
    def _once(self, action: str, step: int) -> bool:
        if not any(f.action == action and f.hits(self.rank, step) for f in self.faults):
            return False
        if (action, step) in self._fired:
            return False
        self._fired.add((action, step))
        return True

    def lr_factor(self, step: int) -> float:
        """LR_SPIKE over the fault's steps, in one uninterrupted pass: a rollback into the window ends it."""
        previous, self._last_lr_step = self._last_lr_step, step
        for f in self.faults:
            if f.action == "lr_spike" and f.hits(self.rank, step):
                fired = self._lr_fired.setdefault(f.spec, [])
                if f.spec in self._lr_over:
                    continue
                if (not fired and step == f.step) or (fired and previous == fired[-1] == step - 1):
                    fired.append(step)
                    return LR_SPIKE
                if fired:  # the pass was broken (a rollback): the fault is over
                    self._lr_over.add(f.spec)
        return 1.0

    def poison_gradients(self, step: int, model) -> None:
        if self._once("nan", step):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    def garbage(self, batch: int, inputs: torch.Tensor, targets: torch.Tensor, vocab_size: int):
        """Random tokens in place of global batch `batch` (0-based: served first at step batch + 1)."""
        if not any(f.action == "garbage" and f.hits(self.rank, batch + 1) for f in self.faults):
            return inputs, targets
        import torch  # here, not at the top: parsing fault specs (every config load) needs no torch

        g = torch.Generator().manual_seed(batch)
        tokens = torch.randint(0, vocab_size, (inputs.shape[0], inputs.shape[1] + 1), generator=g)
        return tokens[:, :-1], tokens[:, 1:]

    def in_save(self, step: int) -> None:
        """Called once the shards of the step-`step` checkpoint are written and before it commits (in the
        save's background thread for an asynchronous save)."""
        self._fire("kill_in_save", step)
        self._fire("enospc_in_save", step)
