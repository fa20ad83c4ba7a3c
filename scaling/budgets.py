"""Runs grouped into compute budgets (the IsoFLOP profiles of Hoffmann et al. 2022, Approach 2).

Runs of one budget rarely have identical FLOPs (exact counts include attention and rounding of steps to
whole batches), so a budget is a cluster in log-compute, not an exact value.
"""
from __future__ import annotations

import numpy as np


def group_by_budget(compute: np.ndarray, rtol: float = 0.1) -> list[np.ndarray]:
    """Indices of the runs of each budget, smallest budget first.

    A run joins the current budget while its compute is within a factor (1 + rtol) of that budget's
    smallest run; budgets of an IsoFLOP ladder are usually spaced by 2x or more.
    """
    order = np.argsort(compute, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or compute[order[i]] > compute[order[start]] * (1 + rtol):
            groups.append(order[start:i])
            start = i
    return groups


def budget_of(compute: np.ndarray, members: np.ndarray) -> float:
    """A budget's compute: the geometric mean of its runs'."""
    return float(np.exp(np.mean(np.log(compute[members]))))
