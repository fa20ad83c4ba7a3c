"""Loss-spike detection: judge each step's loss and gradient norm against a robust running baseline.

The baseline is the median and the median absolute deviation (MAD) of the last `window` accepted steps.
Median/MAD rather than an EMA of mean and variance because a spike must not move the yardstick it is
measured with: one step 50x off shifts a mean and inflates a variance for many steps after it, but moves
a median by at most one rank. Steps judged anomalous are kept out of the window for the same reason, so a
slow divergence cannot become the new normal. Loss keeps falling during training, so the window is short
enough to follow it, and judgments start only after `warmup` accepted steps. Gradient norms are judged
on a log scale with a far higher threshold: in clean runs they jump by several times now and then
(robust z of the log up to 10 in four clean runs measured here, while loss z stayed under 3), and clipping
already bounds what such a step can do; the threshold is there for gradients that explode.

The detector sees values every rank agrees on (the globally reduced loss and the global gradient norm),
so every rank reaches the same verdict without communicating. Its state is plain data, saved with each
checkpoint.

What to do about an anomaly is the policy (`stability.actions`), an escalation ladder: the first anomaly
gets the first action, another within `escalate_within` steps the next, and so on. Whatever the action,
a non-finite update is never applied, and skip_step and rollback drop the step's update; lower_lr applies
it at the lowered rate (dropping every update while the loss sits above an old baseline would stall the
run). The loop carries the actions out (training/loop.py).
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from .config import StabilityConfig
from .specs import Action, parse_action

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class Verdict:
    kind: str          # "ok", "warmup", "non_finite", "spike", "divergence"; "off" when stability is disabled
    step: int
    value: float       # the loss
    z_loss: float      # robust z-score of the loss against the baseline (nan during warm-up)
    z_grad: float      # the same for the log of the gradient norm
    reason: str = ""
    onset: int = 0     # the first step of the trouble (a divergence started steps before it was called)

    @property
    def anomalous(self) -> bool:
        return self.kind in ("non_finite", "spike", "divergence")


def _log(x: float) -> float:
    return math.log(max(x, 1e-30))


def robust_z(x: float, window) -> float:
    med = statistics.median(window)
    mad = statistics.median(abs(v - med) for v in window)
    # A floor on the spread: a perfectly flat window (MAD 0) must not turn noise into infinite z.
    scale = max(MAD_TO_SIGMA * mad, 1e-3 * abs(med), 1e-12)
    return (x - med) / scale


class SpikeDetector:
    def __init__(self, window: int = 100, warmup: int = 50, loss_z: float = 6.0, grad_z: float = 20.0,
                 divergence_z: float = 3.0, divergence_steps: int = 20):
        if not 1 <= warmup <= window:
            raise ValueError(f"need 1 <= warmup <= window, got warmup={warmup}, window={window}")
        self.window, self.warmup = window, warmup
        self.loss_z, self.grad_z = loss_z, grad_z
        self.divergence_z, self.divergence_steps = divergence_z, divergence_steps
        self.losses: deque[float] = deque(maxlen=window)
        self.grads: deque[float] = deque(maxlen=window)
        self.above = 0  # consecutive steps with the loss above baseline + divergence_z

    def judge(self, step: int, loss: float, grad_norm: float) -> Verdict:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict("non_finite", step, loss, math.nan, math.nan,
                           f"loss {loss} / grad-norm {grad_norm} is not finite", onset=step)
        if len(self.losses) < self.warmup:
            self._accept(loss, grad_norm)
            return Verdict("warmup", step, loss, math.nan, math.nan)
        z_loss, z_grad = robust_z(loss, self.losses), robust_z(_log(grad_norm), self.grads)
        if z_loss > self.loss_z or z_grad > self.grad_z:
            which = f"loss z={z_loss:.1f} > {self.loss_z}" if z_loss > self.loss_z else \
                f"grad-norm z={z_grad:.1f} > {self.grad_z}"
            return Verdict("spike", step, loss, z_loss, z_grad, which, onset=step)
        self.above = self.above + 1 if z_loss > self.divergence_z else 0
        if self.above >= self.divergence_steps:
            self.above = 0
            return Verdict("divergence", step, loss, z_loss, z_grad,
                           f"loss above baseline (z > {self.divergence_z}) for {self.divergence_steps} steps",
                           onset=step - self.divergence_steps + 1)
        if z_loss <= self.divergence_z:
            self._accept(loss, grad_norm)
        return Verdict("ok", step, loss, z_loss, z_grad)

    def _accept(self, loss: float, grad_norm: float) -> None:
        self.losses.append(loss)
        self.grads.append(_log(grad_norm))

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grads": list(self.grads), "above": self.above}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.grads = deque(state["grads"], maxlen=self.window)
        self.above = state["above"]


# -- the policy ------------------------------------------------------------------------------------------

class StabilityError(RuntimeError):
    """The run kept diverging after stability.max_rollbacks rollbacks; the message is the report."""


@dataclass
class Stabilizer:
    """The detector plus the escalation state; what the loop asks after every step."""
    cfg: StabilityConfig
    detector: SpikeDetector = field(init=False)
    actions: list[Action] = field(init=False)
    rung: int = -1
    last_anomaly: int = -(10 ** 9)
    onset: int = 0                        # first step of the current episode of anomalies
    rollbacks: int = 0
    lr_scale: float = 1.0
    lr_until: int = 0                     # lr_scale applies up to and including this step
    incidents: list[dict] = field(default_factory=list)

    def __post_init__(self):
        c = self.cfg
        self.detector = SpikeDetector(c.window, c.warmup, c.loss_z, c.grad_z, c.divergence_z, c.divergence_steps)
        self.actions = [parse_action(a) for a in c.actions]

    def judge(self, step: int, loss: float, grad_norm: float) -> tuple[Verdict, Action | None]:
        """The verdict on this step and, for an anomaly, the action to take (its update is dropped)."""
        if self.cfg.enabled:
            verdict = self.detector.judge(step, loss, grad_norm)
        elif math.isfinite(loss) and math.isfinite(grad_norm):
            # Off means off: no baseline is kept and nothing is judged, except what must never be applied.
            return Verdict("off", step, loss, math.nan, math.nan), None
        else:
            verdict = self.detector.judge(step, loss, grad_norm)  # non-finite: judged without the baseline
        if not verdict.anomalous:
            return verdict, None
        escalate = step - self.last_anomaly <= self.cfg.escalate_within
        self.rung = min(self.rung + 1, len(self.actions) - 1) if escalate else 0
        self.onset = min(self.onset, verdict.onset) if escalate else verdict.onset
        self.last_anomaly = step
        action = self.actions[self.rung]
        self.incidents.append({"step": step, "kind": verdict.kind, "reason": verdict.reason,
                               "onset": self.onset, "action": str(action)})
        if action.name == "rollback" and self.rollbacks >= self.cfg.max_rollbacks:
            raise StabilityError(self.report(f"still unstable after {self.rollbacks} rollbacks "
                                             f"(stability.max_rollbacks={self.cfg.max_rollbacks})"))
        if action.name == "rollback":
            self.rollbacks += 1
        if action.name == "lower_lr":
            # Not compounding: a lower_lr repeated while the trouble lasts extends the window.
            self.lr_scale, self.lr_until = action.factor, step + action.steps
        return verdict, action

    @staticmethod
    def drops(verdict: Verdict, action: Action | None) -> bool:
        """Whether this step's update must not be applied."""
        return verdict.kind == "non_finite" or (action is not None and action.name in ("skip_step", "rollback"))

    def lr_factor(self, step: int) -> float:
        if step > self.lr_until:
            self.lr_scale = 1.0
        return self.lr_scale

    def report(self, headline: str) -> str:
        lines = [f"{i['kind']} at step {i['step']} (onset {i['onset']}): {i['reason']} -> {i['action']}"
                 + (f", skipped batches {i['skipped']}" if "skipped" in i else "") for i in self.incidents]
        return headline + "; " + "; ".join(lines)

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "rung": self.rung, "last_anomaly": self.last_anomaly,
                "onset": self.onset,
                "rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "lr_until": self.lr_until,
                "incidents": self.incidents}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint from before this detector existed
            return
        self.detector.load_state_dict(state["detector"])
        self.rung, self.last_anomaly, self.onset = state["rung"], state["last_anomaly"], state["onset"]
        self.rollbacks, self.lr_scale, self.lr_until = state["rollbacks"], state["lr_scale"], state["lr_until"]
        self.incidents = list(state["incidents"])
