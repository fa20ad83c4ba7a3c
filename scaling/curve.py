"""The schedule-aware loss curve of one model size (Tissue et al. 2024, "Scaling Law with Learning Rate
Annealing", arXiv 2408.11029):

    L(s) = L0 + A S1^(-alpha) - C S2

S1 is the forward area, the sum of the learning rates of the first s steps. S2 is the annealing area,
the sum over those steps of an annealing momentum

    m_i = lambda m_(i-1) + (eta_(i-1) - eta_i),   m_0 = 0,

so that a drop in learning rate lowers the loss gradually (lambda ~ 0.999 remembers ~1/(1-lambda) steps)
and a re-warmup (a rise) raises it. The warmup that starts a run is not an annealing in reverse: the
rise before the schedule first decreases is left out of S2 (its learning rates still count in S1).
Fitted on the curves of one or two schedules, the law predicts the curve of any other schedule of the
same model and data.

Steps are counted as steps completed: lr[i] is the learning rate of step i (0-based), and the loss
"at step s" is the loss after s steps, s = 1 .. len(lr).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, minimize_scalar, nnls
from scipy.signal import lfilter

from .blas import single_threaded
from .inputs import at_least, positive, same_length
from .serial import field_values, to_plain

DECAY = 0.999


def schedule_areas(lr, *, decay: float = DECAY) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after each step: entry k is the area after k + 1 steps of the per-step schedule `lr`."""
    eta = positive("learning rates", lr, fix="give the learning rate of every step, from step 0")
    if not 0 <= decay < 1:
        raise ValueError(f"decay (lambda) must be in [0, 1), got {decay}: Tissue et al. use 0.999")
    drops = np.zeros_like(eta)
    drops[1:] = eta[:-1] - eta[1:]
    # The warmup (everything before the first decrease) is no annealing: see the module docstring.
    first_decrease = np.flatnonzero(drops > 0)
    drops[: first_decrease[0] if first_decrease.size else len(drops)] = 0
    momentum = lfilter([1.0], [1.0, -decay], drops)  # m_i = decay m_(i-1) + drop_i
    return np.cumsum(eta), np.cumsum(momentum)


@dataclass
class LossCurve:
    """An observed curve: the run's whole per-step schedule and its losses after some of its steps."""

    lr: np.ndarray
    steps: np.ndarray  # steps completed, 1 .. len(lr)
    loss: np.ndarray


@dataclass
class CurveFit:
    """L(s) = l0 + a S1^(-alpha) - c S2, with S1 and S2 in the units of the learning rates fitted."""

    l0: float
    a: float
    alpha: float
    c: float
    decay: float = DECAY
    objective: float | None = None  # summed Huber loss of the log residuals (None: not fitted)
    points: int = 0
    converged: bool = True

    def predict(self, lr, steps=None):
        """The loss after each of `steps` (steps completed; every step when None) under schedule `lr`."""
        s1, s2 = schedule_areas(lr, decay=self.decay)
        index = slice(None) if steps is None else _indices(steps, len(s1))
        return self.l0 + self.a * s1[index] ** -self.alpha - self.c * s2[index]

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "CurveFit":
        return cls(**field_values(cls, data))


# The annealing momentum's decay tried when it is fitted too (fit_curve(decay=DECAYS)): memories of ~30 to
# ~2,000 steps. Tissue et al. use 0.999, a memory of ~1,000 steps; the 3,000-step runs of
# benchmarks/curve_schedules.py fit best at 0.97-0.995, and predict other schedules better there.
DECAYS = (0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995)


@single_threaded
def fit_curve(curves: Sequence[LossCurve], *, decay: float | Sequence[float] = DECAY,
              delta: float = 1e-3) -> CurveFit:
    """Fit L0, A, alpha, C (all >= 0) to one or more curves of one model size, with the annealing
    momentum's `decay` (lambda) as given or, given several (DECAYS), the one whose fit has the lowest
    objective: lambda profiled out on a grid."""
    if np.ndim(decay) == 0:
        return _fit_curve(curves, decay=float(decay), delta=delta)
    fits = [_fit_curve(curves, decay=float(d), delta=delta) for d in decay]
    return min(fits, key=lambda f: f.objective)


def _fit_curve(curves: Sequence[LossCurve], *, decay: float, delta: float) -> CurveFit:
    """Fit L0, A, alpha, C (all >= 0) to one or more curves of one model size, at one `decay`.

    Leave out the warmup and the first few hundred steps from `steps`: the law describes the curve once
    training is under way. A curve must anneal somewhere, or C is not determined. One cosine curve
    determines all four constants (in tests/test_scaling_fits.py, to 1e-3 on clean curves and well
    enough to predict a WSD curve within 0.2% under 0.3% noise); Tissue et al. fit one or two curves.

    Variable projection gives the start (for a fixed alpha, L0, A and C are a non-negative least-squares
    problem on relative errors, and alpha is searched in one dimension); a Huber loss on log residuals,
    delta = `delta`, polishes all four.
    """
    if len(curves) == 0:
        raise ValueError("no loss curves given: pass at least one LossCurve (schedule, steps, losses)")
    s1, s2, loss = [], [], []
    for k, curve in enumerate(curves):
        fix = f"curve {k}: drop non-finite losses (spikes that were rolled back, NaN evals) and give steps completed"
        y = positive(f"loss of curve {k}", curve.loss, fix=fix)
        steps = np.asarray(curve.steps).ravel()
        same_length(steps=steps, loss=y)
        a1, a2 = schedule_areas(curve.lr, decay=decay)
        index = _indices(steps, len(a1))
        s1.append(a1[index])
        s2.append(a2[index])
        loss.append(y)
    s1, s2, loss = np.concatenate(s1), np.concatenate(s2), np.concatenate(loss)
    at_least("loss points over all curves", len(loss), 8, fix="give more evaluated steps per curve")
    if not np.any(s2 != 0):
        raise ValueError("no fitted point comes after a learning-rate decay (S2 = 0 throughout), so the annealing "
                         "term C cannot be fitted: add a curve whose schedule decays (cosine, or WSD's cooldown)")
    # Work in units of the mean learning rate so S1 ~ steps and S2 ~ steps: the constants stay O(1).
    unit = float(np.mean(np.concatenate([np.asarray(c.lr, float) for c in curves])))
    u1, u2 = s1 / unit, s2 / unit

    def projected(alpha):
        columns = np.stack([np.ones_like(u1), u1 ** -alpha, -u2], axis=1) / loss[:, None]
        norms = np.linalg.norm(columns, axis=0)
        norms[norms == 0] = 1.0
        coef, cost = nnls(columns / norms, np.ones_like(loss))
        return coef / norms, cost

    alphas = np.geomspace(0.01, 3.0, 60)
    k = int(np.argmin([projected(a)[1] for a in alphas]))
    bracket = (alphas[max(k - 1, 0)], alphas[min(k + 1, len(alphas) - 1)])
    alpha0 = minimize_scalar(lambda a: projected(a)[1], bounds=bracket, method="bounded").x
    (l0, a0, c0), _ = projected(alpha0)

    def residual(p):
        l0, log_a, alpha, c = p
        fitted = l0 + np.exp(log_a) * u1 ** -alpha - c * u2
        return np.log(np.maximum(fitted, 1e-12)) - np.log(loss)

    scale_a = max(a0, 1e-8)
    lower, upper = [0.0, np.log(scale_a) - 30, 1e-4, 0.0], [float(loss.max()), np.log(scale_a) + 30, 5.0, np.inf]
    start = np.clip([l0, np.log(scale_a), alpha0, c0], lower, np.nextafter(upper, -np.inf))
    res = least_squares(residual, start, bounds=(lower, upper), method="trf", loss="huber", f_scale=delta,
                        x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=10000)
    l0, log_a, alpha, c = res.x
    # Back to the learning rates' own units: a u1^-alpha = a unit^alpha s1^-alpha, c u2 = (c / unit) s2.
    return CurveFit(l0=float(l0), a=float(np.exp(log_a) * unit**alpha), alpha=float(alpha), c=float(c / unit),
                    decay=decay, objective=float(res.cost), points=len(loss),
                    converged=bool(res.status > 0))


def _indices(steps, length: int) -> np.ndarray:
    steps = np.asarray(steps).ravel()
    if steps.size and (not np.all(np.isfinite(steps)) or steps.min() < 1 or steps.max() > length
                       or not np.all(steps == np.round(steps))):
        raise ValueError(f"steps must be whole numbers of steps completed in 1..{length} (the schedule's "
                         "length): give the step after which each loss was measured")
    return steps.astype(int) - 1
