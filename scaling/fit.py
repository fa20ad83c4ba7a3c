"""`keel scale fit`: every law fitted to one set of runs, saved as fit.json; predictions read it back.

- Approach 3 (scaling/chinchilla.py), L(N, D), with a bootstrap over runs whose replicate fits are kept,
  so that any later question (a loss at some N and D, at a budget) gets its 10/50/90% interval.
- Approach 2 (scaling/isoflop.py), N* and D* against C, where the runs form >= 3 budgets of >= 3 sizes.
- GPT-4's frontier law (scaling/frontier.py), L(C) over exact FLOPs, where there are >= 4 budgets.
- The loss-curve law (scaling/curve.py) per model size, from the eval curves of that size's runs, and
  across all sizes with shared dynamics (scaling/shared_curve.py): a planned run gets a predicted loss at
  every eval, for its own schedule, ending at the scaling law's final forecast. A run whose schedule has
  the ladder's shape takes its curve from the ladder's runs of similar tokens per parameter instead
  (scaling/curve_shapes.py), which forecast this machine's check runs better.
- The capability laws (scaling/tasks_fit.py), where the runs scored a task suite (train.tasks).

Runs of one size but different batch sizes meet in the curve law through token-weighted learning rates:
a step of twice the batch counts as two steps of S1 (and of the annealing area), which holds while the
batch is below the critical batch size (McCandlish et al. 2018), as a ladder's small batches are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .agreement import compare_predictions
from .bootstrap import Interval, bootstrap
from .chinchilla import ChinchillaFit, fit_chinchilla
from .curve import CurveFit, LossCurve, fit_curve
from .curve_shapes import CurveShapes, fit_curve_shapes
from .frontier import PUBLISHED_EXPONENTS, fit_frontier
from .isoflop import IsoFLOPFit, fit_isoflop
from .plan import LadderError
from .points import Point
from .power_law import OffsetPowerLaw
from .shared_curve import SharedCurveFit, fit_shared_curves, fitted_curve
from .tasks_fit import fit_tasks, predict_tasks

REPLICATES = 200
# The exponents of L = E + A/N^alpha + B/D^beta that published fits report lie inside this band: Kaplan et
# al. 2020 0.076 and 0.095 (the smallest), Hoffmann et al. 2022 0.34 and 0.28, Besiroglu et al. 2024 0.35 and
# 0.37. A fit outside it (this machine's second ladder gave alpha = 2.1,
# with E above the loss its own check run then reached) describes its runs, not a law to extrapolate.
PLAUSIBLE_EXPONENTS = (0.05, 1.0)
# The frontier law's exponent counts as measured when its bootstrap refits' 10th and 90th percentiles lie
# within this factor of each other. On this machine's ladders (1-1.5 decades of compute) they spread 2.3-11x,
# the offset's from 0 to near the check run's loss (benchmarks/RESULTS.md).
EXPONENT_SPREAD = 2.0


@dataclass
class ScalingFit:
    points: list[dict]
    approach3: ChinchillaFit
    replicates: list[list[float]]            # (E, A, B, alpha, beta) of each converged bootstrap refit
    approach2: IsoFLOPFit | None = None
    frontier: OffsetPowerLaw | None = None
    curves: dict[str, CurveFit] = field(default_factory=dict)   # str(non-embedding params) -> fit
    curve_batch_tokens: float | None = None  # the batch the curve fits' learning rates are weighted to
    shared_curve: SharedCurveFit | None = None  # the curve law's dynamics over every size: forecasts use it
    frontier_replicates: list[list[float]] = field(default_factory=list)  # (a, b, c) of a C^b + c, refitted
    frontier_exponent_published: bool = False  # b taken from published fits: the ladder did not determine it
    tasks: dict | None = None                 # capability laws (scaling/tasks_fit.py), when runs scored tasks
    curve_shapes: CurveShapes | None = None   # the ladder's curves by tokens per parameter: forecasts try it first
    notes: list[str] = field(default_factory=list)

    # ---- predictions -------------------------------------------------------------------------------
    def loss(self, n_params: float, n_tokens: float) -> tuple[float, Interval]:
        """Approach 3's loss at (N, D) and its 10/50/90% bootstrap interval."""
        return float(self.approach3.predict(n_params, n_tokens)), _interval(self._approach3_values(n_params, n_tokens))

    def _approach3_values(self, n_params: float, n_tokens: float) -> np.ndarray:
        r = np.array(self.replicates)
        return r[:, 0] + r[:, 1] / n_params ** r[:, 3] + r[:, 2] / n_tokens ** r[:, 4]

    def _frontier_values(self, flops: float) -> np.ndarray:
        r = np.array(self.frontier_replicates)
        return r[:, 2] + r[:, 0] * flops ** r[:, 1]

    def approach3_identified(self) -> bool:
        """False when an exponent sits at its bound or outside the band every published language-model fit
        lies in, or when a tenth of the bootstrap refits or more put it there: the runs did not pin the law
        down (sizes far from the optimum, too short a span of N or D), and its extrapolation means little.
        (Ladder Q's fit gave alpha = 0.99, inside the band, while its refits spread from 0.35 to the bound
        3.0: benchmarks/RESULTS.md.)"""
        return not self.unidentified_exponents()

    def unidentified_exponents(self) -> dict[str, tuple[float, float]]:
        """The exponents that fail approach3_identified(), each with its refits' 10th and 90th percentiles."""
        lo, hi = PLAUSIBLE_EXPONENTS
        reps = np.asarray(self.replicates, float).reshape(-1, 5)
        out = {}
        for column, name in ((3, "alpha"), (4, "beta")):
            value = getattr(self.approach3, name)
            p10, p90 = np.percentile(reps[:, column], [10, 90]) if len(reps) else (value, value)
            if not (lo < value < hi and lo < p10 and p90 < hi):
                out[name] = (float(p10), float(p90))
        return out

    def frontier_loss(self, flops: float) -> tuple[float, Interval] | None:
        if self.frontier is None or not self.frontier_replicates:
            return None
        return float(self.frontier.predict(flops)), _interval(self._frontier_values(flops))

    def final(self, n_params: float, n_tokens: float, flops: float) -> dict:
        """The forecast of a run's final loss: Approach 3 at its N and D when the fit identified the law,
        else GPT-4's frontier law at its FLOPs (the best loss at that compute: right for a run near the
        compute-optimal size, optimistic for one far from it). Both are reported; `method` says which."""
        a3, i3 = self.loss(n_params, n_tokens)
        out = {"approach3": {"loss": a3, "lo": i3.p10, "hi": i3.p90}}
        fr = self.frontier_loss(flops)
        if fr is not None:
            out["frontier"] = {"loss": fr[0], "lo": fr[1].p10, "hi": fr[1].p90}
        method = "approach3" if self.approach3_identified() or fr is None else "frontier"
        out["method"] = method
        out.update(out[method])
        return out

    def tasks_at(self, n_params: float, n_tokens: float, flops: float) -> dict | None:
        """The task suite's mean answer NLL and pass rate for a run: its final-loss forecast (final()) carried
        over the ladder's loss-to-answer-NLL line and step 2's sigmoid (scaling/tasks_fit.py); beside them,
        Llama 3's two steps straight from compute ("law"). None when the runs scored no tasks.

        The 10/50/90% interval carries each of the forecast's bootstrap replicates over the line, with a draw
        of the line's own scatter: the ladder's runs lie about the line by its rms (0.03-0.04 nats on this
        machine's ladders J and L, as much as the loss interval adds), and so will the run; and the pass rate's
        with a draw of the sigmoid's scatter, in logits (models of one answer NLL passed 2-4x apart on ladders
        M-P, and the interval without it missed all four check runs)."""
        if not self.tasks or self.tasks.get("nll_from_loss") is None:
            return None
        final = self.final(n_params, n_tokens, flops)
        values = (self._frontier_values(flops) if final["method"] == "frontier"
                  else self._approach3_values(n_params, n_tokens))
        rng = np.random.default_rng(0)
        scatter = rng.normal(0.0, self.tasks["nll_from_loss"]["rms"], len(values))
        logit_scatter = rng.normal(0.0, self.tasks.get("sigmoid_logit_rms") or 0.0, len(values))
        at = predict_tasks(self.tasks, flops, loss=final["loss"])
        spread = predict_tasks(self.tasks, flops, loss=values, scatter=scatter, logit_scatter=logit_scatter)
        out = {"pass_rate_key": self.tasks["pass_rate_key"], "law": {"answer_nll": at["answer_nll"],
                                                                    "pass_rate": at["pass_rate"]}}
        for name in ("answer_nll", "pass_rate"):
            if at[f"{name}_from_loss"] is not None:
                lo, hi = np.percentile(spread[f"{name}_from_loss"], [10, 90])
                out[name] = {"value": at[f"{name}_from_loss"], "lo": float(lo), "hi": float(hi)}
        return out

    def optimum(self, flops: float) -> dict:
        """The compute-optimal N and D at `flops` (C = 6ND) by each method, and the loss there."""
        n3, d3 = (float(x) for x in self.approach3.compute_optimal(flops))
        out = {"approach3": {"params": n3, "tokens": d3, "loss": self.loss(n3, d3)}}
        if self.approach2 is not None:
            n2, d2 = (float(x) for x in self.approach2.compute_optimal(flops))
            out["approach2"] = {"params": n2, "tokens": d2}
        fr = self.frontier_loss(flops)
        if fr is not None:
            out["frontier"] = {"loss": fr[0], "lo": fr[1].p10, "hi": fr[1].p90}
        return out

    def curve_for(self, n_params: float) -> CurveFit | None:
        return self.curves.get(str(int(n_params)))

    def predict_curve(self, n_params: float, lrs: list[float], batch_tokens: float, steps: list[int],
                      final: float | None = None) -> tuple[list[float] | None, str | None]:
        """The loss after each of `steps`, and what gave it:
        - "ladder runs": ending at `final` (the scaling law's forecast), the shape of the ladder's runs with
          similar tokens per parameter, when the run's schedule has the ladder's shape and the ladder covers
          its tokens per parameter (scaling/curve_shapes.py);
        - "curve law": else the shared curve law's dynamics for this schedule, ending at `final` when given,
          or on the ladder's own L0 for this size;
        - "per-size curve law": the per-size law when there is no shared fit.
        (None, None) when there is nothing to predict it with."""
        if not steps:
            return None, None
        if final is not None and self.curve_shapes is not None:
            curve = self.curve_shapes.predict(lrs, len(lrs) * batch_tokens, n_params, steps, final)
            if curve is not None:
                return curve, "ladder runs"
        if self.shared_curve is not None:
            curve = self.shared_curve.predict(lrs, batch_tokens, steps, final=final, n_params=n_params)
            return (None, None) if curve is None else ([float(x) for x in curve], "curve law")
        fit = self.curve_for(n_params)
        if fit is None:
            return None, None
        weighted = np.asarray(lrs, float) * batch_tokens / self.curve_batch_tokens
        return [float(x) for x in fit.predict(weighted, steps)], "per-size curve law"

    # ---- files ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"points": self.points, "approach3": self.approach3.to_dict(), "replicates": self.replicates,
                "approach2": self.approach2.to_dict() if self.approach2 else None,
                "frontier": self.frontier.to_dict() if self.frontier else None,
                "frontier_replicates": self.frontier_replicates,
                "frontier_exponent_published": self.frontier_exponent_published,
                "curves": {k: v.to_dict() for k, v in self.curves.items()},
                "curve_batch_tokens": self.curve_batch_tokens,
                "shared_curve": self.shared_curve.to_dict() if self.shared_curve else None,
                "curve_shapes": self.curve_shapes.to_dict() if self.curve_shapes else None,
                "tasks": self.tasks, "notes": self.notes}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ScalingFit":
        try:
            d = json.loads(Path(path).read_text())
            return cls(points=d["points"], approach3=ChinchillaFit.from_dict(d["approach3"]),
                       replicates=d["replicates"],
                       approach2=IsoFLOPFit.from_dict(d["approach2"]) if d.get("approach2") else None,
                       frontier=OffsetPowerLaw.from_dict(d["frontier"]) if d.get("frontier") else None,
                       frontier_replicates=d.get("frontier_replicates", []),
                       frontier_exponent_published=d.get("frontier_exponent_published", False),
                       curves={k: CurveFit.from_dict(v) for k, v in d.get("curves", {}).items()},
                       curve_batch_tokens=d.get("curve_batch_tokens"), tasks=d.get("tasks"),
                       shared_curve=SharedCurveFit.from_dict(d["shared_curve"]) if d.get("shared_curve") else None,
                       curve_shapes=CurveShapes.from_dict(d["curve_shapes"]) if d.get("curve_shapes") else None,
                       notes=d.get("notes", []))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LadderError(f"{path} is not a fit written by `keel scale fit` ({e})") from None


def _interval(values: np.ndarray) -> Interval:
    return Interval(*(float(q) for q in np.percentile(values, [10, 50, 90])))


def fit_points(points: list[Point], replicates: int = REPLICATES, seed: int = 0) -> ScalingFit:
    if len(points) < 5:
        raise LadderError(f"{len(points)} runs: Approach 3 has 5 constants and needs more runs than that "
                          f"(a ladder of >= 12); run more of the ladder")
    n = np.array([p.params for p in points], float)
    d = np.array([p.tokens for p in points], float)
    c = np.array([p.flops for p in points], float)
    y = np.array([p.loss for p in points], float)
    main = fit_chinchilla(n, d, y)
    notes = [] if main.converged else ["approach 3 did not converge: its constants are the best point found"]
    notes += [f"approach 3's {name} = {getattr(main, name):g} sits on its bound: these runs do not determine it; "
              f"spread the sizes on both sides of each budget's optimum"
              for name in main.exponents_at_bounds()]
    kept: list[ChinchillaFit] = []

    def refit(idx):
        f = fit_chinchilla(n[idx], d[idx], y[idx], init=main)
        if f.converged:
            kept.append(f)
        return f

    budgets = np.array([p.budget if p.budget else p.flops for p in points], float)
    # A ladder's runs are resampled within their budgets, as it was designed: a resample of the whole could
    # drop every run of one size (9 runs of 3 sizes lose one in ~1 of 10 resamples) and leave nothing to fit.
    boot = bootstrap(refit, len(points), {"E": lambda f: f.E}, replicates=replicates, seed=seed,
                     strata=budgets if all(p.budget for p in points) else None)
    if boot.failed:
        notes.append(f"{boot.failed} of {replicates} bootstrap refits did not converge and were left out")
    if any(p.budget for p in points) and len(set(budgets)) < 5:
        notes.append(f"{len(set(budgets))} budgets: fewer than 5 hold the frontier law's offset loosely (a real "
                     f"ladder has >= 5 over >= 2 decades)")
    approach2 = frontier = None
    try:
        approach2 = fit_isoflop(n, d, y, budgets)
        outside = [b.compute for b in approach2.budgets if not b.inside]
        if outside:
            notes.append(f"approach 2: the optimum of budget(s) {', '.join(f'{b:.2g}' for b in outside)} lies "
                         f"outside the sizes run there; widen those budgets' sizes")
    except ValueError as e:
        notes.append(f"approach 2 not fitted: {e}")
    on = _frontier_runs(budgets, approach2, notes)
    frontier, frontier_kept, published = _frontier_law(c[on], y[on], budgets[on], notes, replicates, seed)
    curves, batch = fit_curves(points)
    shared = fit_shared_curves([p.record for p in points if p.record is not None and len(p.record.eval_curve) >= 4])
    shapes = fit_curve_shapes([p.record for p in points if p.record is not None])
    # Tiny models rarely pass a sampled completion: the exact pass probability keeps every problem in.
    tasks = fit_tasks([p.record for p in points if p.record is not None], rates="exact")
    for law, why in (tasks or {}).get("skipped", {}).items():
        notes.append(f"task law {law} not fitted: {why}")
    fit = ScalingFit(points=[{"name": p.name, "params": p.params, "tokens": p.tokens, "flops": p.flops,
                              "loss": p.loss, "budget": p.budget} for p in points],
                     approach3=main, replicates=[[f.E, f.A, f.B, f.alpha, f.beta] for f in kept],
                     approach2=approach2, frontier=frontier,
                     frontier_replicates=[[f.coefficient, f.exponent, f.offset] for f in frontier_kept],
                     frontier_exponent_published=published,
                     curves=curves, curve_batch_tokens=batch, shared_curve=shared, tasks=tasks,
                     curve_shapes=shapes, notes=notes)
    lo, hi = PLAUSIBLE_EXPONENTS
    for name, (p10, p90) in fit.unidentified_exponents().items():
        notes.append(f"approach 3's {name} is not pinned down ({getattr(main, name):.3g}; its refits' 10-90%: "
                     f"{p10:.3g} to {p90:.3g}, outside the published band {lo:g}-{hi:g}): "
                     + ("final-loss forecasts use the frontier law" if frontier is not None else
                        "no frontier law was fitted either, so final-loss forecasts still use approach 3"))
    return fit


def _frontier_law(c: np.ndarray, y: np.ndarray, budgets: np.ndarray, notes: list[str], replicates: int,
                  seed: int) -> tuple[OffsetPowerLaw | None, list[OffsetPowerLaw], bool]:
    """GPT-4's law through the frontier, and its bootstrap refits (resampled within budgets, so that every
    replicate still has every budget's frontier point). When the refits' exponents spread over more than
    EXPONENT_SPREAD x, or a tenth of them lose the floor (a loss that falls without limit: no language has
    zero entropy), the budgets have not determined the law: the exponent is then taken from published fits
    (each refit draws one from their range) and the law fitted again; the third value says so."""
    def fitted(exponent=None):
        kept: list[OffsetPowerLaw] = []
        draw = np.random.default_rng(seed)

        def refit(idx):
            drawn = None if exponent is None else draw.uniform(*PUBLISHED_EXPONENTS)
            f = fit_frontier(c[idx], y[idx], exponent=drawn)
            if f.converged:
                kept.append(f)
            return f

        law = fit_frontier(c, y, exponent=exponent)
        bootstrap(refit, len(c), {"offset": lambda f: f.offset}, replicates=replicates, seed=seed, strata=budgets)
        return law, kept

    try:
        law, kept = fitted()
        lo, hi = np.percentile([-f.exponent for f in kept], [10, 90])
        floorless = np.mean([f.offset < 1e-3 * y.min() for f in kept]) >= 0.1
        if hi > EXPONENT_SPREAD * lo or floorless:
            why = (f"a tenth of its refits or more put the floor at 0, with exponents {-hi:.3g} to {-lo:.3g}"
                   if floorless else f"its refits' exponents run {-hi:.3g} to {-lo:.3g}, 10-90%")
            law, kept = fitted(exponent=-float(np.sqrt(np.prod(PUBLISHED_EXPONENTS))))
            notes.append(f"the budgets do not determine the frontier law's exponent ({why}): it is taken from "
                         f"published Chinchilla fits ({PUBLISHED_EXPONENTS[0]:g} to {PUBLISHED_EXPONENTS[1]:g}) and "
                         f"only the scale and floor are fitted; more budgets over a wider span of compute would "
                         f"measure it")
            return law, kept, True
        return law, kept, False
    except ValueError as e:
        notes.append(f"frontier law not fitted: {e}")
        return None, [], False


def _frontier_runs(budgets: np.ndarray, approach2: IsoFLOPFit | None, notes: list[str]) -> np.ndarray:
    """Which runs the frontier law is fitted to: those of every budget whose IsoFLOP minimum lies among the
    sizes run there (all of them when fewer than 4 budgets would remain, the law's minimum). Elsewhere the
    best run is not the best loss at that compute but above it; at the low end, where the smallest model is
    already too big, the law reads that bend as a floor and forecasts too high."""
    on = np.ones(len(budgets), bool)
    if approach2 is None:
        return on
    outside = [b.compute for b in approach2.budgets if not b.inside]
    off = np.array([any(np.isclose(x, b, rtol=0.1) for b in outside) for x in budgets], bool)
    if off.any() and len(np.unique(budgets[~off])) >= 4:
        notes.append(f"frontier law fitted without budget(s) {', '.join(f'{b:.2g}' for b in outside)}: the best run "
                     f"there is not at the optimum, so it lies above the frontier")
        return ~off
    return on


def fit_curves(points: list[Point]) -> tuple[dict[str, CurveFit], float | None]:
    """One curve-law fit per model size, from the eval curves of the runs that recorded them."""
    records = [p.record for p in points if p.record is not None and len(p.record.eval_curve) >= 4]
    if not records:
        return {}, None
    batch = float(np.median([r.batch_tokens for r in records]))
    by_size: dict[int, list[LossCurve]] = {}
    for r in records:
        by_size.setdefault(r.non_embedding_params, []).append(fitted_curve(r, batch))
    fits = {}
    for size, curves in by_size.items():
        try:
            f = fit_curve(curves)
        except ValueError:
            continue  # too few points for this size: it gets no curve, only Approach 3's endpoint
        if f.converged:
            fits[str(size)] = f
    return fits, batch


def agreement_at(fit: ScalingFit, flops: float) -> str | None:
    """Whether Approach 3 and the frontier law agree on the loss at `flops`."""
    fr = fit.frontier_loss(flops)
    if fr is None:
        return None
    n3, d3 = fit.approach3.compute_optimal(flops)
    _, a3 = fit.loss(float(n3), float(d3))
    return compare_predictions(f"loss at {flops:.3g} FLOPs", {"approach 3": a3, "frontier law": fr[1]}).message
