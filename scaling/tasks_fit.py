"""Capability forecasts from a ladder's task results (RunRecord.tasks, written by training/tasks.py).

Two laws over the runs' training FLOPs (scaling/capability.py has the fitters and the papers):
- GPT-4's: -E_P[log pass_rate(C)] = alpha C^(-k), over the problems every run passes at least sometimes;
- Llama 3's two steps: C -> mean answer NLL (power law with offset) -> mean pass rate (sigmoid). Step 1 is
  fitted, as Llama 3 does, on compute-optimal models: at each budget the run with the lowest eval loss (an
  IsoFLOP ladder's other sizes lie above that frontier at the same compute). Step 2 takes every run.

And a bridge from the loss: the answer NLL is a line in the run's final eval loss over every run, so that a
run's loss forecast (its law and its interval, scaling/fit.py) carries over to the task: the answer NLL and,
through step 2, the pass rate at a forecast loss, each with the loss forecast's interval carried over (the
law from compute has none). The answer tokens are held-out text the eval loss also averages over. The line
is an assumption: on this machine's first ladder scored on tasks, the check run's answers improved less
than its loss, and the bridge missed by more than the law from compute (benchmarks/RESULTS.md, ladder J).

`fit_tasks` raises (ValueError, one line) only when the records cannot be fitted together: scored on
different suites or at different temperatures. When the records are consistent but a law cannot be fitted
from them (too few runs, no problem passed by every run, every run saturated) that law is None and
`skipped` says why; the other law may still be there. It returns None when no record carries tasks.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from ..training.record import RunRecord
from .budgets import group_by_budget
from .capability import CapabilityFit, TwoStepFit, fit_capability, fit_two_step, solved_problems


def fit_tasks(records: list[RunRecord], rates: Literal["sampled", "exact"] = "sampled") -> dict | None:
    """Fit both laws and the bridge to the records that carry tasks. `rates`: the pass rates the laws are
    fitted to, "sampled" (the fraction of samples that passed, as GPT-4 did) or "exact" (the probability
    that a sample passes, never 0, so every problem counts; training/tasks.py computes both)."""
    scored = [r for r in records if r.tasks]
    if not scored:
        return None
    suites = sorted({r.tasks["suite"] for r in scored})
    if len(suites) > 1:
        raise ValueError(f"the records were scored on {len(suites)} different task suites ({', '.join(suites)}): "
                         "fit records of one suite at a time (train.tasks and the corpus must match)")
    temperatures = sorted({r.tasks["temperature"] for r in scored})
    if len(temperatures) > 1:
        raise ValueError(f"the records were sampled at temperatures {temperatures}: pass rates at different "
                         "temperatures do not lie on one law; fit records of one temperature at a time")
    key = {"sampled": "pass_rate", "exact": "pass_prob"}[rates]
    compute = np.array([r.flops for r in scored], float)
    per_problem = np.array([r.tasks["per_problem"][key] for r in scored], float)
    nll = np.array([r.tasks["answer_nll"] for r in scored], float)
    pass_rate = np.array([r.tasks[key] for r in scored], float)
    loss = np.array([r.final_loss for r in scored], float)
    out = {"suite": suites[0], "runs": len(scored), "problems": per_problem.shape[1], "rates": rates,
           "pass_rate_key": key, "temperature": temperatures[0], "capability": None, "two_step": None,
           "sigmoid_logit_rms": None, "nll_from_loss": None, "skipped": {}}
    try:
        out["solved_problems"] = int(solved_problems(per_problem).sum())
        out["capability"] = fit_capability(compute, per_problem).to_dict()
    except ValueError as e:  # the fitters' one-line reasons: too few runs, nothing solved by all, saturated
        out["skipped"]["capability"] = str(e)
    best = np.array([g[np.argmin(loss[g])] for g in group_by_budget(compute)])
    rest = np.setdiff1d(np.arange(len(scored)), best)
    try:
        two_step = fit_two_step(compute[best], nll[best], pass_rate[best], extra_nll=nll[rest],
                                extra_accuracy=pass_rate[rest])
        out["two_step"] = two_step.to_dict()
        out["sigmoid_logit_rms"] = two_step.accuracy.logit_rms(nll, pass_rate)
    except ValueError as e:
        out["skipped"]["two_step"] = str(e)
    if len(np.unique(loss)) >= 3:
        slope, intercept = np.polyfit(loss, nll, 1)
        out["nll_from_loss"] = {"slope": float(slope), "intercept": float(intercept),
                                "rms": float(np.sqrt(np.mean((intercept + slope * loss - nll) ** 2)))}
    else:
        out["skipped"]["nll_from_loss"] = f"{len(np.unique(loss))} distinct final losses: the line needs 3 or more"
    return out


def predict_tasks(fit: dict, flops, loss=None, scatter=0.0, logit_scatter=0.0) -> dict:
    """At `flops` (a number or an array): `answer_nll` and `pass_rate` (the mean over the whole suite) from
    Llama 3's two steps, `solved_pass_rate` (the geometric-mean pass rate over the problems GPT-4's law was
    fitted on) from GPT-4's; with the run's (forecast) final `loss` also `answer_nll_from_loss` and
    `pass_rate_from_loss` through the bridge, `scatter` (nats, broadcast with `loss`) added to the bridged
    NLL and `logit_scatter` to the pass rate's logit on step 2's sigmoid; None for a law that was not
    fitted."""
    out: dict = {"answer_nll": None, "pass_rate": None, "solved_pass_rate": None, "answer_nll_from_loss": None,
                 "pass_rate_from_loss": None}
    if fit.get("two_step") is not None:
        law = TwoStepFit.from_dict(fit["two_step"])
        out["answer_nll"] = _plain(law.nll.predict(flops))
        out["pass_rate"] = _plain(law.predict(flops))
    if loss is not None and fit.get("nll_from_loss") is not None:
        line = fit["nll_from_loss"]
        bridged = line["intercept"] + line["slope"] * np.asarray(loss, float) + scatter
        out["answer_nll_from_loss"] = _plain(bridged)
        if fit.get("two_step") is not None:
            sigmoid = TwoStepFit.from_dict(fit["two_step"]).accuracy
            out["pass_rate_from_loss"] = _plain(sigmoid.predict(bridged, logit_shift=logit_scatter))
    if fit.get("capability") is not None:
        out["solved_pass_rate"] = _plain(CapabilityFit.from_dict(fit["capability"]).predict_pass_rate(flops))
    return out


def _plain(x):
    x = np.asarray(x, float)
    return float(x) if x.ndim == 0 else x.tolist()
