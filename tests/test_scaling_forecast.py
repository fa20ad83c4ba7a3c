"""Forecasting a run before it starts: which law gives the final loss, and the curve that ends there."""
import dataclasses
import math

import numpy as np
import pytest

from keel.scaling.chinchilla import ChinchillaFit
from keel.scaling.curve import schedule_areas
from keel.scaling.fit import ScalingFit
from keel.scaling.power_law import OffsetPowerLaw
from keel.scaling.shared_curve import fit_shared_curves
from keel.training.config import ScheduleConfig
from keel.training.record import RunRecord
from keel.training.schedule import lr_at

A, ALPHA, C = 3.0, 0.4, 0.001   # shared dynamics of the synthetic ladder (annealing: ~0.05-0.27 nats)
L0 = {8000: 1.9, 16000: 1.7, 32000: 1.6}


def cosine(steps, lr=0.01, warmup=10):
    cfg = ScheduleConfig(name="cosine", warmup_steps=warmup, min_lr_ratio=0.1)
    return [lr_at(s, lr, steps, cfg) for s in range(steps)]


def truth(n, lrs, steps):
    s1, s2 = schedule_areas(np.asarray(lrs))
    unit = 0.01
    idx = np.asarray(steps) - 1
    return L0[n] + A * (s1[idx] / unit) ** -ALPHA - C * s2[idx] / unit


def record(n, steps, lr=0.01) -> RunRecord:
    lrs = cosine(steps, lr)
    at = list(range(steps // 10, steps + 1, steps // 10))
    curve = [{"step": s, "tokens": s * 1024, "loss": float(v)} for s, v in zip(at, truth(n, lrs, at))]
    return RunRecord(name=f"n{n}-s{steps}", params=n + 4096, non_embedding_params=n, tokens=steps * 1024,
                     flops=6.0 * n * steps * 1024, flops_6nd=6.0 * n * steps * 1024, final_loss=curve[-1]["loss"],
                     eval_curve=curve, lrs=lrs, schedule={"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1,
                                                          "decay_fraction": 0.2, "lr": lr, "steps": steps},
                     final_lr_ratio=0.1, eval_at_end_of_decay=True, seed=0, batch_tokens=1024, seq_len=64,
                     tokenizer="byte", vocab_size=256, data_fingerprint="d", eval_set="e", model={})


def test_the_shared_curve_law_predicts_a_five_times_longer_run_from_short_ones():
    ladder = [record(n, steps, lr) for n in L0 for steps, lr in ((100, 0.012), (200, 0.01), (300, 0.008))]
    fit = fit_shared_curves(ladder)
    assert fit.alpha == pytest.approx(ALPHA, rel=0.02) and fit.l0["16000"] == pytest.approx(1.7, rel=0.01)
    long_lrs = cosine(1500, 0.006)
    steps = list(range(150, 1501, 150))
    expected = truth(16000, long_lrs, steps)
    on_l0 = fit.predict(long_lrs, 1024, steps, n_params=16000)
    assert np.max(np.abs(np.asarray(on_l0) / expected - 1)) < 0.005
    # Anchored at a final loss the scaling law gives, the shape carries the curve there.
    anchored = fit.predict(long_lrs, 1024, steps, final=float(expected[-1]) + 0.1)
    assert np.asarray(anchored) - expected == pytest.approx(np.full(len(steps), 0.1))
    assert fit.predict(long_lrs, 1024, steps, n_params=12345) is None  # a size it never saw, and no anchor


def scaling_fit(alpha):
    a3 = ChinchillaFit(E=1.5, A=50.0, B=500.0, alpha=alpha, beta=0.3)
    return ScalingFit(points=[], approach3=a3, replicates=[[1.5, 50.0, 500.0, alpha, 0.3]] * 20,
                      frontier=OffsetPowerLaw(scale=0.5, exponent=-0.1, offset=1.0, x_ref=1e12),
                      frontier_replicates=[[0.5 * 1e12 ** 0.1, -0.1, 1.0]] * 20)


def test_the_final_forecast_is_approach_3_unless_its_exponents_leave_the_published_band():
    identified = scaling_fit(0.35).final(1e5, 1e7, 1e13)
    assert identified["method"] == "approach3"
    assert identified["loss"] == pytest.approx(1.5 + 50 / 1e5 ** 0.35 + 500 / 1e7 ** 0.3)
    # alpha at its upper bound, or at 2.1 (a fit this machine's ladder gave): N did not pin the law down
    for alpha in (3.0, 2.1, 0.01):
        pinned = scaling_fit(alpha).final(1e5, 1e7, 1e13)
        assert pinned["method"] == "frontier" and pinned["loss"] == pytest.approx(1.0 + 0.5 * 10 ** -0.1)
        assert pinned["approach3"]["loss"] != pinned["loss"]  # both are kept for the report
    # Inside the band, but a fifth of the bootstrap refits put alpha at its bound (ladder Q: 0.99, refits
    # 0.35 to 3.0): the runs did not pin it down either.
    loose = dataclasses.replace(scaling_fit(0.99), replicates=[[1.5, 50.0, 500.0, 0.35, 0.3]] * 16
                                + [[1.5, 50.0, 500.0, 3.0, 0.3]] * 4)
    assert loose.unidentified_exponents() == {"alpha": pytest.approx((0.35, 3.0))}
    assert loose.final(1e5, 1e7, 1e13)["method"] == "frontier"
    assert scaling_fit(0.99).final(1e5, 1e7, 1e13)["method"] == "approach3"  # the same fit, pinned down
