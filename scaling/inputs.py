"""Checks on what the fitters are handed.

Every problem is one ValueError line that names what is wrong and what to do about it, because these
messages end up on the console of `keel scale fit`, far from the records that caused them.
"""
from __future__ import annotations

import numpy as np


def positive(name: str, values, *, fix: str) -> np.ndarray:
    """`values` as a flat float array, refused unless every entry is finite and > 0."""
    array = np.asarray(values, dtype=float).ravel()
    bad = np.flatnonzero(~np.isfinite(array) | (array <= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name} must be positive and finite, but entry {i} is {array[i]:g}: {fix}")
    return array


def same_length(**arrays: np.ndarray) -> int:
    """The common length of `arrays`, refused when they differ."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"inputs differ in length ({listed}): pass one value per run in each")
    return next(iter(lengths.values()))


def at_least(what: str, count: int, minimum: int, *, fix: str) -> None:
    if count < minimum:
        raise ValueError(f"{what}: got {count}, need at least {minimum}: {fix}")
