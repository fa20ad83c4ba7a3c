"""Learning-rate schedules, checked at the points that define them."""
import math

import pytest

from keel.training.config import ScheduleConfig
from keel.training.schedule import lr_at


def test_linear_warmup_reaches_peak_on_last_warmup_step():
    cfg = ScheduleConfig(name="constant", warmup_steps=10)
    assert lr_at(0, 1.0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(4, 1.0, 100, cfg) == pytest.approx(0.5)
    assert lr_at(9, 1.0, 100, cfg) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 100, cfg) == 1.0


def test_cosine_decays_from_peak_to_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(10, 2.0, 110, cfg) == pytest.approx(2.0)
    midpoint = 0.2 + (2.0 - 0.2) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_at(60, 2.0, 110, cfg) == pytest.approx(midpoint)
    assert lr_at(110, 2.0, 110, cfg) == pytest.approx(0.2)
    assert lr_at(500, 2.0, 110, cfg) == pytest.approx(0.2)  # never below the floor


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(0, 1.0, 100, cfg) == 1.0
    assert lr_at(79, 1.0, 100, cfg) == 1.0
    assert lr_at(80, 1.0, 100, cfg) == pytest.approx(1.0)
    assert lr_at(90, 1.0, 100, cfg) == pytest.approx(0.5)
    assert lr_at(99, 1.0, 100, cfg) == pytest.approx(0.05)
