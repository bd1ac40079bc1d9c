"""Entropic Annealing (ePF): the resampling temperature as pure functions of the weights' health.

PRMs are overconfident early, so plain PF collapses onto a few particles. While the effective
sample size ratio rho = ESS / N is low *and* the search is early (progress = t / T), resample from
softmax(w / tau) with tau >= 1 instead of softmax(w); late in the search, or with healthy weights,
tau = 1 and ePF is PF.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["ess", "entropy", "base"]


def ess_temperature(rho: float, progress: float) -> float:
    """The "ess" schedule: tau = max(1, (1 / rho) * (1 - progress)), hotter for worse collapse."""
    if rho <= 0.0:
        return 1.0
    return max(1.0, (1.0 / rho) * (1.0 - progress))


def entropy_temperature(entropy: float, progress: float) -> float:
    """The "entropy" schedule: tau = max(1, 1 / (H + (1 - H) * progress)), H the normalised entropy.

    The denominator is 0 only for fully collapsed weights (H = 0) at progress 0: the limit is an
    infinite temperature (uniform resampling).
    """
    beta = entropy + (1.0 - entropy) * progress
    return math.inf if beta <= 0.0 else max(1.0, 1.0 / beta)


def base_temperature(progress: float, value_max: float = 2.0) -> float:
    """The "base" schedule: tau = max(1, value_max - progress), blind to the weights."""
    return max(1.0, value_max - progress)


def annealing_temperature(
    schedule: Schedule,
    rho: float,
    entropy: float,
    progress: float,
    ess_threshold: float = 0.5,
    early_phase: float = 0.5,
) -> float:
    """The gated temperature: the schedule's tau when rho < ess_threshold and progress <
    early_phase, else 1."""
    if not (rho < ess_threshold and progress < early_phase):
        return 1.0
    if schedule == "ess":
        return ess_temperature(rho, progress)
    if schedule == "entropy":
        return entropy_temperature(entropy, progress)
    if schedule == "base":
        return base_temperature(progress)
    raise ValueError(f"unknown annealing schedule {schedule!r}")
