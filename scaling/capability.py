"""Forecasting a capability (a benchmark's pass rate) from compute, two ways.

GPT-4 (OpenAI 2023, "GPT-4 Technical Report", arXiv 2303.08774, §3.1): on the problems every model solves
at least sometimes, the mean negative log pass rate follows a power law in compute,

    -E_P[log pass_rate(C)] = alpha C^(-k).

Llama 3 (Llama Team 2024, "The Llama 3 Herd of Models", arXiv 2407.21783, §3.2.1): two steps, compute ->
the normalised negative log-likelihood of the right answer (a power law with offset, fitted on
compute-optimal models), then that NLL -> accuracy (a sigmoid, which may also be fitted on older models
trained differently, since it relates two measurements of the same model).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from .blas import single_threaded
from .inputs import at_least, positive, same_length
from .power_law import OffsetPowerLaw, fit_offset_power_law
from .serial import field_values, to_plain


def solved_problems(pass_rates) -> np.ndarray:
    """Mask of the problems every model solves at least sometimes (pass rate > 0 for every model);
    `pass_rates` is (models, problems). GPT-4's law is about these: log 0 has no mean."""
    rates = np.asarray(pass_rates, float)
    if rates.ndim != 2:
        raise ValueError(f"pass_rates must be a (models, problems) table, got shape {rates.shape}: "
                         "give one row per model and one column per problem")
    if not np.all(np.isfinite(rates)) or rates.min() < 0 or rates.max() > 1:
        raise ValueError("pass rates must lie in [0, 1]: give the fraction of samples that passed, per problem")
    return np.all(rates > 0, axis=0)


def mean_neg_log_pass_rate(pass_rates) -> np.ndarray:
    """-E_P[log pass_rate] per model, over the problems every model solves at least sometimes."""
    mask = solved_problems(pass_rates)
    if not mask.any():
        raise ValueError("no problem is solved at least once by every model: drop the smallest models "
                         "or sample more attempts per problem")
    return -np.log(np.asarray(pass_rates, float)[:, mask]).mean(axis=1)


@dataclass
class CapabilityFit:
    """-E_P[log pass_rate(C)] = alpha C^(-k), with C in the units it was fitted in."""

    alpha: float
    k: float
    problems: int  # problems in the solved subset the law is about
    converged: bool = True

    def predict(self, compute):
        """-E_P[log pass_rate] at `compute`."""
        return self.alpha * np.asarray(compute, float) ** -self.k

    def predict_pass_rate(self, compute):
        """The geometric-mean pass rate over the solved subset, exp(-predict(compute))."""
        return np.exp(-self.predict(compute))

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "CapabilityFit":
        return cls(**field_values(cls, data))


def fit_capability(compute, pass_rates) -> CapabilityFit:
    """Fit GPT-4's law to models' compute and their (models, problems) pass rates.

    Least squares of log(-E_P[log pass_rate]) on log C, a straight line. C is centred on its geometric
    mean for the fit; alpha is reported in C's own units, where it is the metric at C = 1 (GPT-4's plots
    normalise compute so that 1 is the model being forecast, which makes alpha the forecast itself).
    """
    c = positive("compute", compute, fix="give each model's training FLOPs (or compute relative to a target)")
    metric = mean_neg_log_pass_rate(pass_rates)
    same_length(compute=c, pass_rates=metric)
    at_least("models for the capability law", len(np.unique(c)), 3,
             fix="evaluate models trained with at least 3 different amounts of compute")
    if np.any(metric <= 0):
        raise ValueError("a model passes every solved problem every time (metric 0): the law needs "
                         "problems that are not yet saturated; drop the saturated model or add harder problems")
    centre = np.log(c).mean()
    slope, intercept = np.polyfit(np.log(c) - centre, np.log(metric), 1)
    k = -slope
    return CapabilityFit(alpha=float(np.exp(intercept + k * centre)), k=float(k),
                         problems=int(solved_problems(pass_rates).sum()))


@dataclass
class SigmoidLaw:
    """accuracy(nll) = floor + (ceiling - floor) / (1 + exp(slope (nll - midpoint))), slope > 0."""

    slope: float
    midpoint: float
    floor: float = 0.0  # chance accuracy (0.25 for four-way multiple choice)
    ceiling: float = 1.0
    converged: bool = True

    def predict(self, nll, logit_shift=0.0):
        """Accuracy at `nll`; `logit_shift` (broadcast with it) moves the answer up or down the sigmoid's
        logit, as a model that lies off the curve does."""
        z = self.slope * (np.asarray(nll, float) - self.midpoint) - np.asarray(logit_shift, float)
        return self.floor + (self.ceiling - self.floor) / (1 + np.exp(z))

    def logit_rms(self, nll, accuracy) -> float | None:
        """How far models lie off the sigmoid: the rms, in logits, of their accuracy against its value at
        their NLL, over the models strictly between floor and ceiling (a logit there is finite); None when
        fewer than 3 are."""
        x, y = np.asarray(nll, float).ravel(), np.asarray(accuracy, float).ravel()
        inside = (y > self.floor) & (y < self.ceiling)
        if inside.sum() < 3:
            return None
        q = (y[inside] - self.floor) / (self.ceiling - self.floor)
        curve = -self.slope * (x[inside] - self.midpoint)  # the sigmoid's own logit
        return float(np.sqrt(np.mean((np.log(q / (1 - q)) - curve) ** 2)))

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "SigmoidLaw":
        return cls(**field_values(cls, data))


@single_threaded
def fit_sigmoid(nll, accuracy, *, floor: float = 0.0, ceiling: float = 1.0) -> SigmoidLaw:
    """Least-squares fit of accuracy against the answer's NLL, floor and ceiling held fixed."""
    x = positive("answer NLL", nll, fix="give the mean negative log-likelihood of the correct answer, in nats")
    y = np.asarray(accuracy, float).ravel()
    same_length(nll=x, accuracy=y)
    if not 0 <= floor < ceiling <= 1:
        raise ValueError(f"need 0 <= floor < ceiling <= 1, got floor={floor}, ceiling={ceiling}: "
                         "give chance accuracy as the floor")
    if not np.all(np.isfinite(y)) or y.min() < 0 or y.max() > 1:
        raise ValueError("accuracies must lie in [0, 1]: give fractions, not percentages")
    at_least("models for the NLL-to-accuracy sigmoid", len(np.unique(x)), 3,
             fix="add models with different answer NLLs (older or smaller models work)")
    span = ceiling - floor

    def residual(p):
        log_slope, midpoint = p
        return floor + span / (1 + np.exp(np.exp(log_slope) * (x - midpoint))) - y

    # Start where the data cross half-way between floor and ceiling, with a slope spanning the data.
    spread = max(float(np.ptp(x)), 1e-3)
    starts = [(np.log(4 / spread), float(np.median(x))), (np.log(1 / spread), float(np.median(x)))]
    res = min((least_squares(residual, s, method="lm", xtol=1e-14, ftol=1e-14, max_nfev=5000) for s in starts),
              key=lambda r: r.cost)
    log_slope, midpoint = res.x
    return SigmoidLaw(slope=float(np.exp(log_slope)), midpoint=float(midpoint), floor=floor, ceiling=ceiling,
                      converged=bool(res.status > 0))


@dataclass
class TwoStepFit:
    """Llama 3's forecast: compute -> answer NLL (power law with offset) -> accuracy (sigmoid)."""

    nll: OffsetPowerLaw
    accuracy: SigmoidLaw

    @property
    def converged(self) -> bool:
        return self.nll.converged and self.accuracy.converged

    def predict(self, compute):
        """Accuracy at `compute`."""
        return self.accuracy.predict(self.nll.predict(compute))

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "TwoStepFit":
        values = field_values(cls, data)
        return cls(nll=OffsetPowerLaw.from_dict(values["nll"]), accuracy=SigmoidLaw.from_dict(values["accuracy"]))


def fit_two_step(compute, nll, accuracy, *, extra_nll=(), extra_accuracy=(), floor: float = 0.0,
                 ceiling: float = 1.0) -> TwoStepFit:
    """Step 1 on (compute, nll) of compute-optimal models; step 2 on their (nll, accuracy) plus any
    (extra_nll, extra_accuracy) of other models, as Llama 3 adds Llama 2 models to step 2."""
    step1 = fit_offset_power_law(compute, nll, what="models (compute, answer NLL)", decreasing=True)
    step2 = fit_sigmoid(np.concatenate([np.ravel(nll), np.ravel(extra_nll)]),
                        np.concatenate([np.ravel(accuracy), np.ravel(extra_accuracy)]), floor=floor, ceiling=ceiling)
    return TwoStepFit(nll=step1, accuracy=step2)
