"""GPT-4's frontier law: the best loss reachable with C FLOPs, L(C) = a C^b + c.

OpenAI 2023, "GPT-4 Technical Report" (arXiv 2303.08774), §3.1, fitted it to models trained with up to
10,000x less compute and predicted GPT-4's final loss; c is the irreducible loss. It is fitted here to
the compute frontier of a ladder: the lowest final loss at each budget.

A ladder that spans a decade or two of compute may not determine the exponent: with ~1% noise per run, a
steep law with a high floor and a shallow one with a low floor pass through the same few budgets, and they
part within the next decade. The exponent can then be taken from published fits instead
(PUBLISHED_EXPONENTS), and only the scale and the floor fitted.
"""
from __future__ import annotations

import numpy as np

from .budgets import budget_of, group_by_budget
from .inputs import positive, same_length
from .power_law import OffsetPowerLaw, fit_offset_power_law


def compute_frontier(compute, loss, *, rtol: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(budgets, lowest loss per budget) for runs grouped into budgets within a factor (1 + rtol)."""
    fix = "drop runs that failed or diverged, and give FLOPs and losses as positive numbers"
    c = positive("compute", compute, fix=fix)
    l = positive("loss", loss, fix=fix)
    same_length(compute=c, loss=l)
    groups = group_by_budget(c, rtol)
    return (np.array([budget_of(c, g) for g in groups]), np.array([l[g].min() for g in groups]))


# b along Chinchilla's compute-optimal path, where L = E + A/N^alpha + B/D^beta falls as E + K C^b with
# b = -alpha beta / (alpha + beta): -0.178 from Besiroglu et al. 2024 (alpha 0.3478, beta 0.3658), -0.154
# from Hoffmann et al. 2022 (alpha 0.34, beta 0.28).
PUBLISHED_EXPONENTS = (-0.178, -0.154)


def fit_frontier(compute, loss, *, rtol: float = 0.1, exponent: float | None = None) -> OffsetPowerLaw:
    """Fit L(C) = a C^b + c (b < 0, 0 <= c < min L) to the lowest loss of each budget; at least 4 budgets,
    or 3 with the exponent b given.

    The result's predict(C) is the loss; .coefficient, .exponent and .offset are a, b and c.
    """
    budgets, best = compute_frontier(compute, loss, rtol=rtol)
    return fit_offset_power_law(budgets, best, what="compute budgets", decreasing=True, exponent=exponent)
