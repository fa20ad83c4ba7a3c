"""A power law with an offset, y(x) = offset + scale (x / x_ref)^exponent.

It is GPT-4's loss-versus-compute law L(C) = a C^b + c (OpenAI 2023, "GPT-4 Technical Report", §3.1,
arXiv 2303.08774; c is the irreducible loss) and the first step of Llama 3's capability forecast (Llama
Team 2024, "The Llama 3 Herd of Models", §3.2.1, arXiv 2407.21783: compute to the NLL of the right answer).

Written with x / x_ref, x_ref the geometric mean of the fitted x, so that scale is the power term's value
inside the data (O(y)) rather than a C^b coefficient of 1e5 whose error is all in the exponent.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, minimize_scalar

from .blas import single_threaded
from .inputs import at_least, positive, same_length
from .serial import field_values, to_plain


@dataclass
class OffsetPowerLaw:
    scale: float
    exponent: float
    offset: float
    x_ref: float
    converged: bool = True

    @property
    def coefficient(self) -> float:
        """a in y = a x^b + c."""
        return self.scale * self.x_ref ** -self.exponent

    def predict(self, x):
        return self.offset + self.scale * (np.asarray(x, float) / self.x_ref) ** self.exponent

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data) -> "OffsetPowerLaw":
        return cls(**field_values(cls, data))


@single_threaded
def fit_offset_power_law(x, y, *, what: str = "points", decreasing: bool = True,
                         exponent: float | None = None) -> OffsetPowerLaw:
    """Least squares in log y of offset + scale (x/x_ref)^exponent, with scale > 0, offset in [0, min y)
    and the exponent's sign fixed (negative when `decreasing`). A given `exponent` is held there: only
    scale and offset are fitted (3 distinct x suffice).

    Started by variable projection (for a fixed exponent, offset and scale are a linear least-squares
    problem on relative errors; the exponent is searched in one dimension), then polished on all three.
    """
    fix = "give positive x (FLOPs) and positive y (losses in nats)"
    x = positive(f"x of the {what}", x, fix=fix)
    y = positive(f"y of the {what}", y, fix=fix)
    same_length(x=x, y=y)
    if exponent is not None and (exponent < 0) != decreasing:
        raise ValueError(f"exponent {exponent:g} for a {'de' if decreasing else 'in'}creasing law: give it the sign of "
                         f"the trend")
    constants = 3 if exponent is None else 2
    at_least(f"{what} for a power law with offset ({constants} constants)", len(np.unique(x)), constants + 1,
             fix="add points at more distinct x (compute budgets)")
    x_ref = float(np.exp(np.log(x).mean()))
    u = np.log(x / x_ref)
    sign = -1.0 if decreasing else 1.0
    ceiling = float(y.min())

    def projected(exponent):
        # offset >= 0 and scale >= 0 by clipping the unconstrained solution: enough for a start
        z = np.exp(exponent * u)
        design = np.stack([np.ones_like(z), z], axis=1) / y[:, None]
        (offset, scale), *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
        offset = min(max(offset, 0.0), ceiling * 0.999)
        scale = max(scale, 1e-12)
        return offset, scale, float(np.sum((np.log(offset + scale * z) - np.log(y)) ** 2))

    if exponent is not None:
        return _fit_scale_and_offset(u, y, exponent, projected(exponent), x_ref, ceiling)
    magnitudes = np.geomspace(1e-3, 3.0, 60)
    costs = [projected(sign * m)[2] for m in magnitudes]
    k = int(np.argmin(costs))
    lo, hi = magnitudes[max(k - 1, 0)], magnitudes[min(k + 1, len(magnitudes) - 1)]
    m0 = minimize_scalar(lambda m: projected(sign * m)[2], bounds=(lo, hi), method="bounded").x
    offset0, scale0, _ = projected(sign * m0)

    def residual(p):
        log_scale, magnitude, offset = p
        return np.log(offset + np.exp(log_scale) * np.exp(sign * magnitude * u)) - np.log(y)

    lower = [np.log(scale0) - 30, 1e-6, 0.0]
    upper = [np.log(scale0) + 30, 10.0, ceiling * (1 - 1e-9)]
    start = np.clip([np.log(scale0), m0, offset0], lower, upper)
    res = least_squares(residual, start, bounds=(lower, upper), method="trf", x_scale="jac",
                        xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=5000)
    log_scale, magnitude, offset = res.x
    return OffsetPowerLaw(scale=float(np.exp(log_scale)), exponent=float(sign * magnitude),
                          offset=float(offset), x_ref=x_ref, converged=bool(res.status > 0))


def _fit_scale_and_offset(u, y, exponent, start, x_ref, ceiling) -> OffsetPowerLaw:
    offset0, scale0, _ = start
    z = np.exp(exponent * u)

    def residual(p):
        return np.log(p[1] + np.exp(p[0]) * z) - np.log(y)

    lower, upper = [np.log(scale0) - 30, 0.0], [np.log(scale0) + 30, ceiling * (1 - 1e-9)]
    res = least_squares(residual, np.clip([np.log(scale0), offset0], lower, upper), bounds=(lower, upper),
                        method="trf", x_scale="jac", xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=5000)
    return OffsetPowerLaw(scale=float(np.exp(res.x[0])), exponent=float(exponent), offset=float(res.x[1]),
                          x_ref=x_ref, converged=bool(res.status > 0))
