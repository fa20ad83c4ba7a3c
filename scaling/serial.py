"""Fit results to and from plain JSON values (they are saved as fit.json)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


def to_plain(value):
    """Dataclasses, numpy scalars and arrays as dicts, floats, ints, bools and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def field_values(cls, data: Mapping) -> dict:
    """The entries of `data` that `cls` takes, refused when one it needs is missing or one is unknown."""
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    unknown = sorted(set(data) - names)
    if missing or unknown:
        raise ValueError(f"{cls.__name__} record has missing keys {missing} and unknown keys {unknown}: "
                         "it was written by another version of keel; refit to rewrite it")
    return {k: data[k] for k in names if k in data}
