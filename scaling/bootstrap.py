"""Bootstrap over runs: 10/50/90% intervals of anything a fit predicts.

Runs are resampled with replacement and every replicate is refitted (to convergence: a replicate whose
fit did not converge is dropped and counted, never averaged in). This is the nonparametric bootstrap
Besiroglu et al. 2024 (arXiv 2404.10102) use for the Chinchilla constants; resampling whole runs keeps
what a run's loss shares with its neighbours (same size, same budget) together.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .blas import single_threaded
from .serial import field_values, to_plain


@dataclass
class Interval:
    """The 10th, 50th and 90th percentiles of a quantity over bootstrap replicates."""

    p10: float
    p50: float
    p90: float

    def contains(self, value: float) -> bool:
        return self.p10 <= value <= self.p90

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "Interval":
        return cls(**field_values(cls, data))


@dataclass
class Bootstrap:
    intervals: dict[str, Interval]
    replicates: int  # replicates that converged and were used
    failed: int  # replicates dropped: the refit raised or did not converge
    seed: int
    errors: list[str] = field(default_factory=list)  # the first few reasons replicates were dropped

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "Bootstrap":
        values = field_values(cls, data)
        values["intervals"] = {k: Interval.from_dict(v) for k, v in values["intervals"].items()}
        return cls(**values)


@single_threaded
def bootstrap(refit: Callable[[np.ndarray], object], runs: int,
              quantities: Mapping[str, Callable[[object], float]], *, replicates: int = 200, seed: int = 0,
              strata=None, max_failed: float = 0.1) -> Bootstrap:
    """Refit on `replicates` resamples of the runs and take percentiles of each quantity.

    refit(indices) fits on the runs at `indices` (an index array with repeats) and returns a fit; a fit
    with `converged` False, or a ValueError from refit (a resample with too few budgets, say), drops the
    replicate. quantities maps a name to a function of a fit (e.g. "loss@1e24": fit.loss_at_compute(1e24)).
    strata: optional label per run (its budget, say); runs are then resampled within each label, so every
    replicate keeps the design's shape (needed by per-budget methods such as Approach 2).
    More than `max_failed` of the replicates dropped is a ValueError: the intervals would describe only
    the resamples that happened to fit.
    """
    if runs < 2:
        raise ValueError(f"bootstrap needs at least 2 runs, got {runs}: add runs before asking for intervals")
    if replicates < 10:
        raise ValueError(f"bootstrap needs at least 10 replicates for 10/90% intervals, got {replicates}: "
                         "ask for 100 or more")
    rng = np.random.default_rng(seed)
    groups = [np.arange(runs)]
    if strata is not None:
        labels = np.asarray(strata)
        if len(labels) != runs:
            raise ValueError(f"strata has {len(labels)} labels for {runs} runs: give one label per run")
        groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    values = {name: [] for name in quantities}
    failed, errors = 0, []
    for _ in range(replicates):
        indices = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        try:
            fit = refit(indices)
        except ValueError as exc:
            fit, reason = None, str(exc)
        else:
            reason = "" if getattr(fit, "converged", True) else "the refit did not converge"
        if reason:
            failed += 1
            if len(errors) < 3:
                errors.append(reason)
            continue
        for name, quantity in quantities.items():
            values[name].append(float(quantity(fit)))
    if failed > max_failed * replicates:
        raise ValueError(f"{failed} of {replicates} bootstrap replicates could not be refitted "
                         f"(first: {errors[0]}): add runs, or resample within budgets with strata=")
    intervals = {name: Interval(*(float(q) for q in np.percentile(v, [10, 50, 90]))) for name, v in values.items()}
    return Bootstrap(intervals=intervals, replicates=replicates - failed, failed=failed, seed=seed, errors=errors)
