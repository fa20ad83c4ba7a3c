"""Do two fitting methods predict the same thing? (Hoffmann et al. 2022 compare their three approaches.)

Methods disagree on a quantity when their bootstrap 10-90% intervals do not overlap: each says the
other's range is outside what its own data allow. The verdict is returned, never printed, so that the
caller (`keel scale fit`, a report) decides where it goes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations

from .bootstrap import Interval
from .serial import to_plain


@dataclass
class Agreement:
    quantity: str
    agree: bool
    message: str  # one line, for a console or a report
    disagreeing: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return to_plain(self)


def compare_predictions(quantity: str, predictions: Mapping[str, Interval]) -> Agreement:
    """Compare methods' intervals for one quantity, e.g. {"approach 3": ..., "approach 2": ...}."""
    if len(predictions) < 2:
        raise ValueError(f"comparing {quantity!r} needs predictions from at least 2 methods, got "
                         f"{len(predictions)}: fit another method on the same runs")
    pairs = [(m1, m2) for (m1, i1), (m2, i2) in combinations(predictions.items(), 2)
             if i1.p90 < i2.p10 or i2.p90 < i1.p10]
    shown = "; ".join(f"{m} {i.p50:.4g} [{i.p10:.4g}, {i.p90:.4g}]" for m, i in predictions.items())
    if pairs:
        names = ", ".join(f"{a} vs {b}" for a, b in pairs)
        message = f"{quantity}: methods disagree beyond their 10-90% intervals ({names}): {shown}"
    else:
        message = f"{quantity}: methods agree within their 10-90% intervals: {shown}"
    return Agreement(quantity=quantity, agree=not pairs, message=message, disagreeing=pairs)
