"""A run's forecast before it starts, and its outcome set beside it afterwards.

The final loss comes from Approach 3 at the run's N and D, with its bootstrap interval, or from the frontier
law at its FLOPs where Approach 3 did not identify the law (ScalingFit.final says which). The loss at every
eval ends at that final loss. Its shape comes from the ladder's runs with similar tokens per parameter when
the run's schedule has the ladder's shape (scaling/curve_shapes.py), else from the loss-curve law's dynamics
fitted over the whole ladder for the run's own schedule (scaling/shared_curve.py). Its interval is the final
one's relative width, widened along a shape read off the ladder's runs by the scatter of one run about it
(a run's seed alone moves its early evals by 1-3% here); the curve law's interval is the final one's only.
training/forecast.py reads the file this writes and watches the run against it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..training.config import Config
from ..training.flops import count_params, training_flops_per_token
from ..training.record import RunRecord
from ..training.schedule import lr_at
from .fit import ScalingFit

Z80 = 1.2816  # a normal deviate's 90th percentile: the 80% interval's half-width in standard deviations


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
    scatter = fit.curve_shapes.scatter(lrs, d, n, at) if curve_from == "ladder runs" else None
    points = ([{"step": s, "loss": v, **_interval(v, final, 0.0 if scatter is None else scatter[i])}
               for i, (s, v) in enumerate(zip(at, curve))] if curve is not None else [{"step": steps, **final}])
    return {"source": source, "params": n, "tokens": d, "flops": flops, "final": final,
            "curve_law": curve is not None, "curve_from": curve_from, "curve": points,
            "tasks": fit.tasks_at(n, d, flops)}


def _interval(loss: float, final: dict, scatter: float) -> dict:
    """The 80% interval at one eval: the final forecast's, relative, widened by a run's own scatter about the
    curve (sd `scatter` in ln L), the two taken as independent."""
    below = np.sqrt(np.log(final["loss"] / final["lo"]) ** 2 + (Z80 * scatter) ** 2)
    above = np.sqrt(np.log(final["hi"] / final["loss"]) ** 2 + (Z80 * scatter) ** 2)
    return {"lo": float(loss * np.exp(-below)), "hi": float(loss * np.exp(above))}


def write_forecast(forecast: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(forecast, indent=1))
    return path


def compare(forecast: dict, record: RunRecord) -> dict:
    """Prediction and outcome side by side: the final loss and every eval both have."""
    observed = {e["step"]: e["loss"] for e in record.eval_curve}
    rows = [{"step": p["step"], "predicted": p["loss"], "lo": p["lo"], "hi": p["hi"], "observed": observed[p["step"]],
             "error": observed[p["step"]] / p["loss"] - 1, "inside": p["lo"] <= observed[p["step"]] <= p["hi"]}
            for p in forecast["curve"] if p["step"] in observed]
    f = forecast["final"]
    out = {"final": {"predicted": f["loss"], "lo": f["lo"], "hi": f["hi"], "observed": record.final_loss,
                     "error": record.final_loss / f["loss"] - 1, "inside": f["lo"] <= record.final_loss <= f["hi"]},
           "curve": rows, "worst_curve_error": max((abs(r["error"]) for r in rows), default=float("nan")),
           "curve_inside": sum(r["inside"] for r in rows)}
    t = forecast.get("tasks")
    if t and record.tasks:
        observed = {"answer_nll": record.tasks["answer_nll"], "pass_rate": record.tasks[t["pass_rate_key"]]}
        out["tasks"] = {name: {"predicted": t[name]["value"], "lo": t[name]["lo"], "hi": t[name]["hi"],
                               "observed": observed[name], "error": observed[name] / t[name]["value"] - 1,
                               "inside": t[name]["lo"] <= observed[name] <= t[name]["hi"],
                               "law": t["law"][name]} for name in ("answer_nll", "pass_rate") if name in t}
    return out


def compare_seeds(forecast: dict, records: list[RunRecord]) -> dict:
    """One forecast beside runs of one config under different seeds, and beside their mean curve (geometric,
    eval by eval). No forecast knows a run's seed, so the mean is what it can be held to; each run's own
    comparison says how far one seed strays."""
    runs = [compare(forecast, r) for r in records]
    band = runs[0]["curve"]
    observed = np.array([[row["observed"] for row in r["curve"]] for r in runs])
    mean = np.exp(np.log(observed).mean(axis=0))
    rows = [{"step": row["step"], "predicted": row["predicted"], "lo": row["lo"], "hi": row["hi"],
             "observed": [float(v) for v in observed[:, k]], "mean": float(mean[k]),
             "error": float(mean[k] / row["predicted"] - 1), "inside": row["lo"] <= mean[k] <= row["hi"]}
            for k, row in enumerate(band)]
    spread = observed.std(axis=0, ddof=1) / mean if len(runs) > 1 else np.zeros(len(rows))
    return {"runs": runs, "mean_curve": rows, "worst_mean_error": max(abs(r["error"]) for r in rows),
            "mean_inside": sum(r["inside"] for r in rows), "median_seed_sd": float(np.median(spread))}


def seed_lines(result: dict, seeds: list[int]) -> list[str]:
    """compare_seeds() as text: each seed's run, then the mean curve."""
    lines = [f"seed {seed}: final {100 * r['final']['error']:+.2f}%, worst eval {100 * r['worst_curve_error']:.2f}% "
             f"off, {r['curve_inside']} of {len(r['curve'])} evals inside their intervals"
             for seed, r in zip(seeds, result["runs"])]
    rows = result["mean_curve"]
    worst = max(rows, key=lambda r: abs(r["error"]))
    return lines + [f"the {len(seeds)} seeds' mean curve: worst eval {100 * abs(worst['error']):.2f}% off the forecast "
                    f"(step {worst['step']}), {result['mean_inside']} of {len(rows)} evals inside their intervals; an "
                    f"eval's sd across the seeds {100 * result['median_seed_sd']:.2f}% (median over evals)"]


def write_seeds_csv(result: dict, seeds: list[int], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "predicted", "p10", "p90", *(f"seed{s}" for s in seeds), "mean", "error"])
        for row in result["mean_curve"]:
            w.writerow([row["step"], f"{row['predicted']:.5f}", f"{row['lo']:.5f}", f"{row['hi']:.5f}",
                        *(f"{v:.5f}" for v in row["observed"]), f"{row['mean']:.5f}", f"{row['error']:+.5f}"])
    return path


def task_lines(result: dict) -> list[str]:
    """compare()'s task rows as text: the bridged forecast with its interval, the observed value, and Llama
    3's two-step law straight from compute beside them."""
    names = {"answer_nll": "answer NLL", "pass_rate": "pass rate"}
    return [f"{names[k]}: predicted {t['predicted']:.4g} [{t['lo']:.4g}, {t['hi']:.4g}], observed {t['observed']:.4g} "
            f"({100 * t['error']:+.2f}%, {'inside' if t['inside'] else 'OUTSIDE'} the 80% interval)"
            + (f"; two-step law from compute {t['law']:.4g}" if t["law"] is not None else "")
            for k, t in result.get("tasks", {}).items()]
