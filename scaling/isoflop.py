"""Chinchilla Approach 2: IsoFLOP profiles (Hoffmann et al. 2022, arXiv 2203.15556, §3.2).

For each compute budget, the final loss of the runs of that budget is fitted by a parabola in log N (and
another in log D); its vertex is that budget's loss-optimal N* (and D*). Power laws N* = k_N C^a and
D* = k_D C^b are then fitted to the vertices by least squares in log space.

The parabola is only an approximation of the profile: sampled far from the optimum or off-centre it
biases N*, so each budget records whether its vertex lies inside the sizes that were run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .budgets import budget_of, group_by_budget
from .inputs import at_least, positive, same_length
from .serial import field_values, to_plain


@dataclass
class BudgetOptimum:
    compute: float
    n_opt: float
    d_opt: float
    loss_opt: float  # the parabola's minimum in log N
    runs: int
    inside: bool  # the vertex lies within the sizes (and token counts) run at this budget

    @classmethod
    def from_dict(cls, data) -> "BudgetOptimum":
        return cls(**field_values(cls, data))


@dataclass
class IsoFLOPFit:
    """N*(C) = n_coefficient C^n_exponent and D*(C) = d_coefficient C^d_exponent."""

    n_exponent: float
    n_coefficient: float
    d_exponent: float
    d_coefficient: float
    budgets: list[BudgetOptimum]
    converged: bool = True  # closed-form fits; present so the bootstrap treats every method alike

    def compute_optimal(self, compute):
        """(N*, D*) at `compute` FLOPs."""
        c = np.asarray(compute, float)
        return self.n_coefficient * c ** self.n_exponent, self.d_coefficient * c ** self.d_exponent

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "IsoFLOPFit":
        values = field_values(cls, data)
        values["budgets"] = [BudgetOptimum.from_dict(b) for b in values["budgets"]]
        return cls(**values)


def fit_isoflop(n_params, n_tokens, loss, compute=None, *, rtol: float = 0.1) -> IsoFLOPFit:
    """Fit Approach 2 to runs; `compute` defaults to 6 N D per run. Budgets are clusters of runs whose
    compute lies within a factor (1 + rtol) of each other."""
    fix = "drop runs that failed or diverged, and give sizes, tokens, losses and FLOPs as positive numbers"
    n = positive("n_params", n_params, fix=fix)
    d = positive("n_tokens", n_tokens, fix=fix)
    l = positive("loss", loss, fix=fix)
    c = 6 * n * d if compute is None else positive("compute", compute, fix=fix)
    same_length(n_params=n, n_tokens=d, loss=l, compute=c)
    groups = group_by_budget(c, rtol)
    at_least("compute budgets for Approach 2", len(groups), 3,
             fix="run an IsoFLOP profile at 3 or more budgets, spaced by 2x or more")
    budgets = []
    for members in groups:
        budget = budget_of(c, members)
        at_least(f"distinct model sizes at the {budget:.3g}-FLOP budget", len(np.unique(n[members])), 3,
                 fix="run at least 3 (better 5-7) sizes per budget, spread around the expected optimum")
        log_n_opt, loss_opt, inside_n = _vertex(np.log(n[members]), l[members], budget)
        log_d_opt, _, inside_d = _vertex(np.log(d[members]), l[members], budget)
        budgets.append(BudgetOptimum(compute=budget, n_opt=float(np.exp(log_n_opt)),
                                     d_opt=float(np.exp(log_d_opt)), loss_opt=loss_opt,
                                     runs=len(members), inside=inside_n and inside_d))
    log_c = np.log([b.compute for b in budgets])
    n_exp, n_log_coef = np.polyfit(log_c, np.log([b.n_opt for b in budgets]), 1)
    d_exp, d_log_coef = np.polyfit(log_c, np.log([b.d_opt for b in budgets]), 1)
    return IsoFLOPFit(n_exponent=float(n_exp), n_coefficient=float(np.exp(n_log_coef)),
                      d_exponent=float(d_exp), d_coefficient=float(np.exp(d_log_coef)), budgets=budgets)


def _vertex(x: np.ndarray, loss: np.ndarray, budget: float) -> tuple[float, float, bool]:
    """Vertex (x*, loss*) of the least-squares parabola of loss in x, and whether x* is inside the data."""
    centre = x.mean()  # centred, so the normal equations stay well conditioned at x ~ 20
    curvature, slope, level = np.polyfit(x - centre, loss, 2)
    if curvature <= 0:
        raise ValueError(f"the loss profile at the {budget:.3g}-FLOP budget is not convex in log size "
                         "(no minimum): run sizes on both sides of the optimum at this budget")
    vertex = centre - slope / (2 * curvature)
    return float(vertex), float(level - slope**2 / (4 * curvature)), bool(x.min() <= vertex <= x.max())
