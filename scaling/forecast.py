"""A run's forecast before it starts, and its outcome set beside it afterwards.

The final loss comes from Approach 3 at the run's N and D, with its bootstrap interval, or from the frontier
law at its FLOPs where Approach 3 did not identify the law (ScalingFit.final says which). The loss at every
eval ends at that final loss. Its shape comes from the ladder's runs with similar tokens per parameter when
the run's schedule has the ladder's shape (scaling/curve_shapes.py), else from the loss-curve law's dynamics
fitted over the whole ladder for the run's own schedule (scaling/shared_curve.py). Its interval is the final
one's relative width (the curve's own uncertainty is not bootstrapped). training/forecast.py reads the file
this writes and watches the run against it.
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
    curve, curve_from = fit.predict_curve(n, lrs, batch_tokens, at, final=loss)
    below, above = final["lo"] / loss, final["hi"] / loss
    points = ([{"step": s, "loss": v, "lo": v * below, "hi": v * above} for s, v in zip(at, curve)]
              if curve is not None else [{"step": steps, **final}])
    return {"source": source, "params": n, "tokens": d, "flops": flops, "final": final,
            "curve_law": curve is not None, "curve_from": curve_from, "curve": points,
            "tasks": fit.tasks_at(n, d, flops)}


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
    out = {"final": {"predicted": f["loss"], "lo": f["lo"], "hi": f["hi"], "observed": record.final_loss,
                     "error": record.final_loss / f["loss"] - 1, "inside": f["lo"] <= record.final_loss <= f["hi"]},
           "curve": rows, "worst_curve_error": max((abs(r["error"]) for r in rows), default=float("nan"))}
    t = forecast.get("tasks")
    if t and record.tasks:
        observed = {"answer_nll": record.tasks["answer_nll"], "pass_rate": record.tasks[t["pass_rate_key"]]}
        out["tasks"] = {name: {"predicted": t[name]["value"], "lo": t[name]["lo"], "hi": t[name]["hi"],
                               "observed": observed[name], "error": observed[name] / t[name]["value"] - 1,
                               "inside": t[name]["lo"] <= observed[name] <= t[name]["hi"],
                               "law": t["law"][name]} for name in ("answer_nll", "pass_rate") if name in t}
    return out


def task_lines(result: dict) -> list[str]:
    """compare()'s task rows as text: the bridged forecast with its interval, the observed value, and Llama
    3's two-step law straight from compute beside them."""
    names = {"answer_nll": "answer NLL", "pass_rate": "pass rate"}
    return [f"{names[k]}: predicted {t['predicted']:.4g} [{t['lo']:.4g}, {t['hi']:.4g}], observed {t['observed']:.4g} "
            f"({100 * t['error']:+.2f}%, {'inside' if t['inside'] else 'OUTSIDE'} the 80% interval)"
            + (f"; two-step law from compute {t['law']:.4g}" if t["law"] is not None else "")
            for k, t in result.get("tasks", {}).items()]
