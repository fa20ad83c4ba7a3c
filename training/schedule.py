"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant.

A schedule is a pure function of the step, so the checkpointed step is all the state it has.
"""
from __future__ import annotations

import math

from .config import ScheduleConfig


def lr_at(step: int, base_lr: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps`."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    min_lr = base_lr * cfg.min_lr_ratio
    if cfg.name == "constant":
        return base_lr
    if cfg.name == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "wsd":
        # Decay linearly over the last decay_fraction of the run; hold the peak until then.
        decay_steps = max(round(total_steps * cfg.decay_fraction), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return base_lr
        progress = min((step - decay_start) / decay_steps, 1.0)
        return base_lr + (min_lr - base_lr) * progress
    raise ValueError(f"unknown schedule {cfg.name!r}")
