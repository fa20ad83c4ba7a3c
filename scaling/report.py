"""`keel scale report`: the fits as pictures, and every run as a CSV row.

- isoflop.png: loss against N for each budget, with Approach 3's IsoFLOP curve through it.
- frontier.png: the best loss at each budget, the frontier law and Approach 3 extended to the target, with
  the check run (when given) and its predicted interval.
- residuals.png: observed / Approach 3 - 1 for every run, against compute.
- curves.png: observed eval curves beside the loss-curve law's, per fitted size; the check run's beside its
  forecast, the curve the forecast printed before the run (from the ladder's runs or the curve law) and its band.
- runs.csv: name, N, D, FLOPs, loss, Approach 3's prediction and its interval, the residual.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..training.config import load_config
from ..training.record import read_record
from .fit import ScalingFit
from .forecast import compare, forecast_for
from .points import load_points


def write_report(fit: ScalingFit, out: str | Path, runs: list[str] = (), target_flops: float | None = None,
                 check: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pts = fit.points
    n = np.array([p["params"] for p in pts])
    d = np.array([p["tokens"] for p in pts])
    c = np.array([p["flops"] for p in pts])
    y = np.array([p["loss"] for p in pts])
    budgets = np.array([p["budget"] or p["flops"] for p in pts])
    written = []
    forecast = forecast_for(fit, load_config(Path(check) / "config.yaml")) if check else None

    # runs.csv
    path = out / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "params", "tokens", "flops", "budget", "loss", "predicted", "p10", "p90", "residual"])
        for p in pts:
            pred, i = fit.loss(p["params"], p["tokens"])
            w.writerow([p["name"], p["params"], p["tokens"], f"{p['flops']:.6g}", p["budget"] or "", f"{p['loss']:.6f}",
                        f"{pred:.6f}", f"{i.p10:.6f}", f"{i.p90:.6f}", f"{p['loss'] / pred - 1:+.5f}"])
    written.append(path)

    # isoflop.png
    fig, ax = plt.subplots(figsize=(7, 5))
    for k, b in enumerate(sorted(set(budgets))):
        sel = budgets == b
        ax.scatter(n[sel], y[sel], color=f"C{k}", label=f"{b:.2g} FLOPs")
        grid = np.geomspace(n[sel].min() / 1.5, n[sel].max() * 1.5, 50)
        tokens = d[sel].mean() * n[sel].mean() / grid  # along the budget: N D constant
        ax.plot(grid, fit.approach3.predict(grid, tokens), color=f"C{k}", lw=1)
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final eval loss", title="IsoFLOP profiles")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "isoflop.png"))

    # frontier.png
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(c, y, s=12, color="0.6", label="ladder runs")
    top = max(target_flops or 0, c.max() * 20)
    grid = np.geomspace(c.min() / 2, top, 100)
    if fit.frontier is not None:
        ax.plot(grid, fit.frontier.predict(grid), label=f"frontier law L(C) = aC^b + c, b = {fit.frontier.exponent:.3g}"
                + (" (published)" if fit.frontier_exponent_published else ""))
    ax.plot(grid, [fit.approach3.loss_at_compute(g) for g in grid], ls="--", label="approach 3 at the optimum (C = 6ND)")
    if check:
        record = read_record(check)
        f = forecast["final"]
        ax.errorbar([record.flops], [f["loss"]], yerr=[[f["loss"] - f["lo"]], [f["hi"] - f["loss"]]], fmt="s",
                    color="C3", capsize=4, label="check run: predicted (80%)")
        ax.scatter([record.flops], [record.final_loss], marker="*", s=120, color="k", zorder=3,
                   label="check run: observed")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="final eval loss", title="Compute frontier")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "frontier.png"))

    # residuals.png
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(0, color="0.5", lw=1)
    ax.scatter(c, 100 * (y / fit.approach3.predict(n, d) - 1))
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="observed / approach 3 - 1 (%)", title="Residuals")
    written.append(_save(fig, out / "residuals.png"))

    # curves.png
    records = [p.record for p in load_points(runs)] if runs else []
    if records or check:
        fig, ax = plt.subplots(figsize=(8, 5))
        for k, r in enumerate(records):
            steps = [e["step"] for e in r.eval_curve if e["step"] > 0]
            ax.plot(steps, [e["loss"] for e in r.eval_curve if e["step"] > 0], "o", ms=3, color=f"C{k % 10}")
            pred, _ = fit.predict_curve(r.non_embedding_params, r.lrs, r.batch_tokens, steps)
            if pred is not None:
                ax.plot(steps, pred, "-", lw=1, color=f"C{k % 10}")
        if check:
            # The check run against what was forecast for it, not the curve law's in-sample view.
            r, points = read_record(check), forecast["curve"]
            steps = [e["step"] for e in r.eval_curve if e["step"] > 0]
            ax.plot(steps, [e["loss"] for e in r.eval_curve if e["step"] > 0], "*", ms=7, color="k",
                    label="check run: observed")
            ax.fill_between([p["step"] for p in points], [p["lo"] for p in points], [p["hi"] for p in points],
                            color="k", alpha=0.12, lw=0)
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], "-", lw=2, color="k",
                    label=f"check run: forecast, from the {forecast['curve_from'] or 'final loss only'} (80%)")
            ax.legend(fontsize=8)
        ax.set(xscale="log", xlabel="step", ylabel="eval loss",
               title="Eval curves (dots) and the loss-curve law (lines); the check run against its forecast")
        written.append(_save(fig, out / "curves.png"))
    if check:
        result = compare(forecast, read_record(check))
        path = out / "check.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "predicted", "p10", "p90", "observed", "error"])
            for row in result["curve"]:
                w.writerow([row["step"], f"{row['predicted']:.6f}", f"{row['lo']:.6f}", f"{row['hi']:.6f}",
                            f"{row['observed']:.6f}", f"{row['error']:+.5f}"])
        written.append(path)
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
