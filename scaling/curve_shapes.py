"""A run's loss curve read off the ladder's runs with a similar tokens-per-parameter ratio.

The curve law (scaling/shared_curve.py) carried from a ladder of short runs to a run ten times longer got
the early curve wrong on every ladder of this machine: 4-8% at the first eval, the end of the warmup, and
3-4% mid-run, while each ladder run's own shape was plain to see (benchmarks/RESULTS.md). What those runs
show instead: a run's curve relative to its own final loss, L(f)/L(1) at the fraction f of its steps,
follows its tokens per parameter D/N, nearly whatever its size. A 14k-parameter and a 33k-parameter run at
~90 tokens per parameter both stood 1.36-1.39x above their final loss at the end of the warmup; the 135k
check run at 70 stood at 1.36. The 135k runs of the same ladder at 3 and 7 tokens per parameter stood at
1.50 and 1.57.

That reading suits a forecast: along the compute frontier D/N changes slowly, so the run at 10x the largest
budget sits at a D/N that the ladder's own runs cover, and its shape is interpolated, not extrapolated. At
each eval fraction, ln L(f)/L(1) is regressed on ln(D/N) over the ladder's runs, locally (a Gaussian kernel
of BANDWIDTH in ln D/N, a line), and the curve ends at the scaling law's final forecast.

It applies only to a run whose schedule has the ladder's shape (the same warmup fraction, decay and floor,
at any peak learning rate and length) and whose D/N and eval fractions the ladder covers; predict() says
None otherwise, and the curve law takes over.

No shape says where one run will be: the same check run under three seeds stood 1-3% apart at its early
evals. scatter() reads that spread off the ladder's own runs (each predicted from the others), and the
forecast's interval along the curve carries it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..training.record import RunRecord
from .serial import field_values, to_plain

BANDWIDTH = 0.7   # in ln(D/N): runs within ~2x of the target's ratio weigh most
SIGNATURE = 32    # points at which schedules are compared, as fractions of the run
# Two schedules have one shape when their signatures differ by at most this: a warmup of 5% instead of 10% moves
# a signature by 0.025, a floor of 0 instead of 0.1 by 0.045, a 100-step run's rounding of the warmup by 0.011.
SCHEDULE_TOLERANCE = 0.015


def signature(lrs) -> np.ndarray:
    """The schedule's shape, whatever its peak and length: the area under its learning rate over the peak,
    per step of the whole run, after each of SIGNATURE even fractions of the run. An area and not the rate
    itself, so that a 100-step run, whose warmup rises in steps of a tenth of the peak, matches a long one."""
    lr = np.asarray(lrs, float)
    area = np.cumsum(lr) / lr.max() / len(lr)
    return area[np.ceil(np.arange(1, SIGNATURE + 1) / SIGNATURE * len(lr)).astype(int) - 1]


def local_line(xs, y, x: float, bandwidth: float = BANDWIDTH):
    """The value at `x` of a line through the points (xs, y), each weighted by a Gaussian kernel of `bandwidth`
    about `x`; y may hold several columns, fitted at once. None when fewer than ~3 points are near enough."""
    xs = np.asarray(xs, float)
    w = np.exp(-0.5 * ((xs - x) / bandwidth) ** 2)
    if w.sum() ** 2 / (w ** 2).sum() < 3:
        return None
    design = np.stack([np.ones_like(xs), xs - x], axis=1)
    weighted = w.reshape(-1, *[1] * (np.ndim(y) - 1)) * np.asarray(y, float)
    return np.linalg.solve(design.T @ (w[:, None] * design), design.T @ weighted)[0]


@dataclass
class CurveShapes:
    ratios: list[float]             # ln(D/N) of each ladder run
    fractions: list[list[float]]    # its evals, as fractions of its steps (the last is 1)
    log_losses: list[list[float]]   # ln(L / final L) at those evals
    schedule: list[float]           # the ladder's schedule shape (signature())
    bandwidth: float = BANDWIDTH

    def _covered(self, lrs, tokens: float, n_params: float, steps):
        """(ln D/N of the run, ln D/N of each ladder run, each ladder run's ln L/L(1) at the run's eval
        fractions), or None where the ladder's runs do not cover the run."""
        if np.max(np.abs(signature(lrs) - np.asarray(self.schedule))) > SCHEDULE_TOLERANCE:
            return None
        x, xs = np.log(tokens / n_params), np.asarray(self.ratios)
        if not xs.min() <= x <= xs.max():
            return None
        at = np.asarray(steps, float) / len(lrs)
        if at.min() < max(f[0] for f in self.fractions) - 0.01:  # before the ladder's first evals
            return None
        return x, xs, np.array([np.interp(at, f, v) for f, v in zip(self.fractions, self.log_losses)])

    def predict(self, lrs, tokens: float, n_params: float, steps, final: float) -> list[float] | None:
        """The loss after each of `steps` (steps completed) of a run of `n_params` over `tokens` with the
        schedule `lrs`, ending at `final`; None where the ladder's runs do not cover it."""
        covered = self._covered(lrs, tokens, n_params, steps)
        level = None if covered is None else local_line(covered[1], covered[2], covered[0], self.bandwidth)
        return None if level is None else [float(v) for v in final * np.exp(level)]

    def scatter(self, lrs, tokens: float, n_params: float, steps) -> list[float] | None:
        """How far one run stands from the shape predict() gives, in ln L, at each of `steps`: the rms by
        which the ladder's runs miss their own shape when each is read off the others (leave one out), each
        weighted as predict() weighs it. A run's seed alone moves a check run's early evals by 1-3%
        (benchmarks/RESULTS.md), so the forecast's interval along the curve carries this beside the final
        loss's. Zero at the last step, where every shape is 0. None where predict() is."""
        covered = self._covered(lrs, tokens, n_params, steps)
        if covered is None:
            return None
        x, xs, y = covered
        weights, misses = [], []
        for i in range(len(xs)):
            others = np.arange(len(xs)) != i
            level = local_line(xs[others], y[others], xs[i], self.bandwidth)
            if level is not None:
                weights.append(np.exp(-0.5 * ((xs[i] - x) / self.bandwidth) ** 2))
                misses.append(y[i] - level)
        if len(misses) < 3:
            return None
        w = np.asarray(weights)[:, None]
        return [float(v) for v in np.sqrt((w * np.asarray(misses) ** 2).sum(axis=0) / w.sum())]

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "CurveShapes":
        return cls(**field_values(cls, data))


def fit_curve_shapes(records: list[RunRecord]) -> CurveShapes | None:
    """The shapes of the runs that share the ladder's schedule shape and evaluated at their last step; None
    when fewer than 4 do."""
    usable = []
    for r in records:
        evals = [e for e in r.eval_curve if e["step"] > 0 and np.isfinite(e["loss"]) and e["loss"] > 0]
        if len(evals) >= 4 and evals[-1]["step"] == len(r.lrs) and r.tokens > 0 and r.non_embedding_params > 0:
            usable.append((r, evals))
    if len(usable) < 4:
        return None
    signatures = np.array([signature(r.lrs) for r, _ in usable])
    reference = np.median(signatures, axis=0)
    kept = [(r, evals) for (r, evals), s in zip(usable, signatures)
            if np.max(np.abs(s - reference)) <= SCHEDULE_TOLERANCE]
    if len(kept) < 4:
        return None
    return CurveShapes(
        ratios=[float(np.log(r.tokens / r.non_embedding_params)) for r, _ in kept],
        fractions=[[e["step"] / len(r.lrs) for e in evals] for r, evals in kept],
        log_losses=[[float(np.log(e["loss"] / evals[-1]["loss"])) for e in evals] for _, evals in kept],
        schedule=[float(v) for v in reference])
