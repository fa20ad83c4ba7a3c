"""The small languages some config values are written in: fault-injection specs (`fault.inject`, carried
out by faults.py) and loss-spike actions (`stability.actions`, carried out by stability.py). Parsed when
the config loads, so a typo fails before anything starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

FAULT_ACTIONS = ("kill", "hang", "raise", "kill_in_save", "enospc_in_save", "slow", "nan", "garbage", "lr_spike")
FAULT_FORM = ("ACTION[:rRANK]@STEP or ACTION@FIRST-LAST, ACTION one of kill|hang|raise|kill_in_save|"
              "enospc_in_save|slow|nan|garbage|lr_spike (e.g. kill@23, hang:r1@15, garbage@150-160)")
STABILITY_ACTIONS = "skip_step | rollback(skip_batches=N) | lower_lr(factor=F, steps=N)"

SPEC = re.compile(r"^(?P<action>[a-z_]+)(?::r(?P<rank>\d+))?@(?P<step>\d+)(?:-(?P<last>\d+))?$")


@dataclass(frozen=True)
class Fault:
    spec: str
    action: str
    rank: int | None
    step: int
    last: int

    def hits(self, rank: int, step: int) -> bool:
        return self.step <= step <= self.last and self.rank in (None, rank)


def parse_fault(spec: str) -> Fault:
    m = SPEC.match(spec.strip())
    if not m or m["action"] not in FAULT_ACTIONS:
        raise ConfigError(f"fault.inject: cannot read {spec!r}; expected {FAULT_FORM}")
    step = int(m["step"])
    last = int(m["last"]) if m["last"] else step
    if last < step:
        raise ConfigError(f"fault.inject: {spec!r} ends before it starts")
    return Fault(spec.strip(), m["action"], None if m["rank"] is None else int(m["rank"]), step, last)


ACTION = re.compile(r"^(?P<name>skip_step|rollback|lower_lr)(?:\((?P<args>[^)]*)\))?$")
ARGS = {"skip_step": {}, "rollback": {"skip_batches": 200}, "lower_lr": {"factor": 0.5, "steps": 100}}


@dataclass(frozen=True)
class Action:
    name: str
    skip_batches: int = 0
    factor: float = 1.0
    steps: int = 0

    def __str__(self) -> str:
        args = {"rollback": f"(skip_batches={self.skip_batches})",
                "lower_lr": f"(factor={self.factor}, steps={self.steps})"}.get(self.name, "")
        return self.name + args


def parse_action(text: str) -> Action:
    m = ACTION.match(text.replace(" ", ""))
    error = f"stability.actions: cannot read {text!r}; expected one of {STABILITY_ACTIONS}"
    if not m:
        raise ConfigError(error)
    values = dict(ARGS[m["name"]])
    for item in filter(None, (m["args"] or "").split(",")):
        key, _, raw = item.partition("=")
        if key not in values:
            raise ConfigError(f"{error} ({m['name']} takes {', '.join(values) or 'no arguments'}, not {key!r})")
        try:
            values[key] = type(values[key])(raw)
        except ValueError:
            raise ConfigError(f"{error} ({key}={raw!r} is not a number)") from None
    if not 0 < values.get("factor", 0.5) < 1:
        raise ConfigError(f"{error} (lower_lr factor must be between 0 and 1, got {values['factor']})")
    if values.get("skip_batches", 0) < 0 or values.get("steps", 0) < 0:
        raise ConfigError(f"{error} (counts must be >= 0)")
    return Action(m["name"], **values)
