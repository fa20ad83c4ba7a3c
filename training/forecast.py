"""A run watched against its forecast: the eval loss scaling/ predicted for it, step by step.

The forecast (forecast.json, written before launch by `keel train --forecast fit.json`) holds the predicted
eval loss and its interval at the run's eval steps. A run that leaves the interval at OFF_EVALS evals in a
row gets an `off_forecast` event: a silent bug in the data or the code shows up as a run that misses its
forecast, long before anyone reads the final number.
"""
from __future__ import annotations

import json
from pathlib import Path

OFF_EVALS = 3


class Forecast:
    def __init__(self, path: str | Path):
        d = json.loads(Path(path).read_text())
        self.final = d["final"]                                   # {"loss", "lo", "hi"}
        self.curve = {int(p["step"]): p for p in d.get("curve", [])}
        self.source = d.get("source", str(path))
        self.off_streak = 0
        self.reported = False

    def opening_line(self, steps: int) -> str:
        f = self.final
        method = {"approach3": "Chinchilla approach 3", "frontier": "frontier law"}.get(f.get("method"), "")
        return (f"forecast ({self.source}{', ' + method if method else ''}): val loss {f['loss']:.4f} at step {steps}, "
                f"80% interval [{f['lo']:.4f}, {f['hi']:.4f}]")

    def judge(self, step: int, loss: float) -> dict | None:
        """The prediction at `step` (None where there is none); sets `off` when this eval completes a run of
        OFF_EVALS evals outside the interval (reported once per streak)."""
        p = self.curve.get(step)
        if p is None:
            return None
        outside = not p["lo"] <= loss <= p["hi"]
        self.off_streak = self.off_streak + 1 if outside else 0
        if not outside:
            self.reported = False
        off = self.off_streak >= OFF_EVALS and not self.reported
        self.reported |= off
        return {**p, "observed": loss, "outside": outside, "off": off}

    def closing_line(self, loss: float) -> str:
        f = self.final
        inside = f["lo"] <= loss <= f["hi"]
        return (f"forecast vs outcome: predicted {f['loss']:.4f} [{f['lo']:.4f}, {f['hi']:.4f}], observed {loss:.4f} "
                f"({100 * (loss - f['loss']) / f['loss']:+.2f}%, {'inside' if inside else 'OUTSIDE'} the interval)")
