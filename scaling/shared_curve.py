"""The loss-curve law fitted across a whole ladder, for forecasting a longer run's curve.

Tissue et al. 2024's law, L(s) = L0 + A S1^(-alpha) - C S2 (scaling/curve.py), fitted per model size on
a ladder's short runs, extrapolates badly to a run several times longer: two or three curves of a few
hundred steps do not pin alpha down. Here A, alpha and C (the dynamics: how the loss falls with the
learning-rate area and with annealing) are shared by every size of the ladder, and only L0 is per size,
so every curve of the ladder informs the dynamics. A forecast then takes the dynamics for the run's own
schedule and anchors the curve's end at the predicted final loss (Approach 3 or the frontier law,
scaling/fit.py): the shape from the curve law, the level from the scaling law, for sizes the ladder never
ran as well. A run whose schedule has the ladder's shape takes its shape from the ladder's runs instead
(scaling/curve_shapes.py), which did better on this machine's check runs; this law serves every other
schedule.

Learning rates are token-weighted to a reference batch (scaling/fit.py), and the law is fitted to evals
after the warmup and the first tenth of each run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from ..training.record import RunRecord
from .blas import single_threaded
from .curve import DECAY, LossCurve, schedule_areas
from .serial import field_values, to_plain


def fitted_evals(record: RunRecord) -> list[dict]:
    """The evals the curve law is fitted to: after the warmup and the first tenth of the run, when
    training is under way (the law does not describe the first steps)."""
    start = max(record.schedule["warmup_steps"], math.ceil(0.1 * record.schedule["steps"]), 1)
    return [e for e in record.eval_curve if e["step"] >= start]


def weighted_lrs(record: RunRecord, batch_tokens: float) -> np.ndarray:
    """The run's learning rates, token-weighted to a reference batch (see scaling/fit.py)."""
    return np.asarray(record.lrs, float) * record.batch_tokens / batch_tokens


def fitted_curve(record: RunRecord, batch_tokens: float) -> LossCurve:
    """The run's fitted evals (fitted_evals) under its learning rates weighted to `batch_tokens`."""
    evals = fitted_evals(record)
    return LossCurve(weighted_lrs(record, batch_tokens), np.array([e["step"] for e in evals]),
                     np.array([e["loss"] for e in evals]))


@dataclass
class SharedCurveFit:
    a: float
    alpha: float
    c: float
    unit: float                # the mean learning rate the areas are measured in (keeps constants O(1))
    batch_tokens: float        # the reference batch the learning rates are weighted to
    l0: dict[str, float] = field(default_factory=dict)  # str(non-embedding params) -> L0
    decay: float = DECAY
    points: int = 0
    converged: bool = True

    def dynamics(self, lrs, batch_tokens: float, steps) -> np.ndarray:
        """A S1^(-alpha) - C S2 after each of `steps` (steps completed) of the schedule `lrs`."""
        s1, s2 = schedule_areas(np.asarray(lrs, float) * batch_tokens / self.batch_tokens, decay=self.decay)
        idx = np.asarray(steps, int) - 1
        return self.a * (s1[idx] / self.unit) ** -self.alpha - self.c * s2[idx] / self.unit

    def predict(self, lrs, batch_tokens: float, steps, final: float | None = None, n_params: float | None = None):
        """The loss after each of `steps`: anchored so that the last step's loss is `final` when given,
        else on the fitted L0 of size `n_params` (None when that size was not in the ladder)."""
        d = self.dynamics(lrs, batch_tokens, steps)
        if final is not None:
            return final - d[-1] + d
        l0 = self.l0.get(str(int(n_params))) if n_params is not None else None
        return None if l0 is None else l0 + d

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "SharedCurveFit":
        return cls(**field_values(cls, data))


@single_threaded
def fit_shared_curves(records: list[RunRecord], delta: float = 1e-3) -> SharedCurveFit | None:
    """None when the records hold too few evals (fewer than 8 after the warmups) to fit the dynamics."""
    batch = float(np.median([r.batch_tokens for r in records])) if records else 0.0
    sizes = sorted({r.non_embedding_params for r in records})
    k, s1, s2, y = [], [], [], []
    for r in records:
        a1, a2 = schedule_areas(weighted_lrs(r, batch))
        evals = fitted_evals(r)
        idx = np.array([e["step"] for e in evals], int) - 1
        k.append(np.full(len(evals), sizes.index(r.non_embedding_params)))
        s1.append(a1[idx])
        s2.append(a2[idx])
        y.append([e["loss"] for e in evals])
    if not records or sum(map(len, y)) < 8 + len(sizes):
        return None
    k, s1, s2, y = np.concatenate(k), np.concatenate(s1), np.concatenate(s2), np.concatenate(y).astype(float)
    unit = float(np.mean([np.mean(r.lrs) for r in records]))

    def residual(p):
        log_a, alpha, c = p[:3]
        fitted = p[3:][k] + np.exp(log_a) * (s1 / unit) ** -alpha - c * s2 / unit
        return np.log(np.maximum(fitted, 1e-12)) - np.log(y)

    lower = [-30.0, 0.0, 0.0] + [0.0] * len(sizes)
    upper = [30.0, 5.0, 10.0] + [float(y.max())] * len(sizes)
    best = None
    for alpha0 in (0.2, 0.5, 1.0):  # a few starts: the loss is not convex in alpha
        start = [0.0, alpha0, 1e-3] + [0.5 * float(y.min())] * len(sizes)
        res = least_squares(residual, start, bounds=(lower, upper), loss="huber", f_scale=delta, x_scale="jac",
                            max_nfev=5000)
        if best is None or res.cost < best.cost:
            best = res
    log_a, alpha, c = best.x[:3]
    return SharedCurveFit(a=float(np.exp(log_a)), alpha=float(alpha), c=float(c), unit=unit, batch_tokens=batch,
                          l0={str(n): float(v) for n, v in zip(sizes, best.x[3:])}, points=len(y),
                          converged=bool(best.status > 0))
