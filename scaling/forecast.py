"""A run's forecast before it starts, and its outcome set beside it afterwards.

The final loss comes from Approach 3 at the run's N and D, with its bootstrap interval, or from the frontier
law at its FLOPs where Approach 3 did not identify the law (ScalingFit.final says which). The loss at every
eval comes from the loss-curve law's dynamics fitted over the whole ladder, for the run's own schedule,
ending at that final loss (scaling/shared_curve.py); its interval is the final one's relative width (the
curve law's own uncertainty is not bootstrapped). training/forecast.py reads the file this writes and
watches the run against it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..training.config import Config
from ..training.flops import count_params, training_flops_per_token
from ..training.record import RunRecord
from ..training.schedule import lr_at
from .fit import ScalingFit


def eval_steps(cfg: Config) -> list[int]:
    every, steps = cfg.train.eval_every, cfg.train.steps
    return sorted({*(range(every, steps + 1, every) if every else ()), steps})


def forecast_for(fit: ScalingFit, cfg: Config, source: str = "fit.json") -> dict:
    T, steps = cfg.data.seq_len, cfg.train.steps
    batch_tokens = cfg.train.global_batch_size * T
    n, d = count_params(cfg.model).non_embedding, steps * batch_tokens
    flops = training_flops_per_token(cfg.model, T) * d
    final = fit.final(n, d, flops)
    loss = final["loss"]
    lrs = [lr_at(s, cfg.optim.lr, steps, cfg.schedule) for s in range(steps)]
    at = eval_steps(cfg)
    curve = fit.predict_curve(n, lrs, batch_tokens, at, final=loss)
    below, above = final["lo"] / loss, final["hi"] / loss
    points = ([{"step": s, "loss": v, "lo": v * below, "hi": v * above} for s, v in zip(at, curve)]
              if curve is not None else [{"step": steps, **final}])
    return {"source": source, "params": n, "tokens": d, "flops": flops, "final": final,
            "curve_law": curve is not None, "curve": points}


def write_forecast(forecast: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(forecast, indent=1))
    return path


def compare(forecast: dict, record: RunRecord) -> dict:
    """Prediction and outcome side by side: the final loss and every eval both have."""
    observed = {e["step"]: e["loss"] for e in record.eval_curve}
    rows = [{"step": p["step"], "predicted": p["loss"], "lo": p["lo"], "hi": p["hi"], "observed": observed[p["step"]],
             "error": observed[p["step"]] / p["loss"] - 1} for p in forecast["curve"] if p["step"] in observed]
    f = forecast["final"]
    return {"final": {"predicted": f["loss"], "lo": f["lo"], "hi": f["hi"], "observed": record.final_loss,
                      "error": record.final_loss / f["loss"] - 1, "inside": f["lo"] <= record.final_loss <= f["hi"]},
            "curve": rows, "worst_curve_error": max((abs(r["error"]) for r in rows), default=float("nan"))}
