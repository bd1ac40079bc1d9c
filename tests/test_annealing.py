"""ePF's Entropic Annealing schedules: the worked checks of ALGORITHMS.md and the gate."""

from __future__ import annotations

import math

import pytest

from lodestar.orchestrator.algorithms.annealing import (
    annealing_temperature,
    base_temperature,
    entropy_temperature,
    ess_temperature,
)


def test_worked_check_ess_schedule_rho_02_progress_02_gives_exactly_4():
    assert ess_temperature(0.2, 0.2) == 4.0
    assert annealing_temperature("ess", rho=0.2, entropy=0.3, progress=0.2) == 4.0


def test_worked_check_healthy_late_weights_are_gated_to_1():
    assert annealing_temperature("ess", rho=0.5, entropy=0.9, progress=0.8) == 1.0
    # the gate, not the schedule, makes it 1: the raw schedule would still be hotter
    assert ess_temperature(0.5, 0.0) == 2.0
    assert annealing_temperature("ess", rho=0.5, entropy=0.9, progress=0.0) == 1.0


def test_worked_check_entropy_schedule_h_05_progress_03():
    assert entropy_temperature(0.5, 0.3) == pytest.approx(1 / 0.65, abs=1e-15)
    assert entropy_temperature(0.5, 0.3) == pytest.approx(1.538, abs=5e-4)
    assert annealing_temperature("entropy", rho=0.1, entropy=0.5, progress=0.3) == pytest.approx(
        1 / 0.65, abs=1e-15
    )


def test_worked_check_base_schedule_at_progress_05_is_15():
    assert base_temperature(0.5) == 1.5
    # inside the annealing gate the base schedule gives the same value
    assert annealing_temperature("base", rho=0.1, entropy=0.5, progress=0.49) == 2.0 - 0.49


@pytest.mark.parametrize("schedule", ["ess", "entropy", "base"])
def test_gate_needs_both_low_ess_and_early_progress(schedule):
    collapsed, early, late = 0.1, 0.1, 0.6
    assert annealing_temperature(schedule, collapsed, 0.2, early) > 1.0
    assert annealing_temperature(schedule, collapsed, 0.2, late) == 1.0
    assert annealing_temperature(schedule, 0.9, 0.95, early) == 1.0
    # the thresholds are parameters
    assert annealing_temperature(schedule, 0.6, 0.5, early, ess_threshold=0.7) > 1.0
    assert annealing_temperature(schedule, collapsed, 0.2, late, early_phase=0.7) > 1.0


@pytest.mark.parametrize("schedule", ["ess", "entropy", "base"])
def test_temperature_is_never_below_1(schedule):
    for rho in (0.01, 0.2, 0.49, 0.5, 1.0):
        for h in (0.0, 0.3, 1.0):
            for progress in (0.01, 0.3, 0.49, 0.9, 1.0):
                assert annealing_temperature(schedule, rho, h, progress) >= 1.0


def test_ess_schedule_is_hotter_the_worse_the_collapse_and_cools_with_progress():
    assert ess_temperature(0.1, 0.2) > ess_temperature(0.2, 0.2) > ess_temperature(0.4, 0.2)
    assert ess_temperature(0.1, 0.1) > ess_temperature(0.1, 0.3) > ess_temperature(0.1, 0.45)


def test_entropy_schedule_limit_of_full_collapse_at_start_is_infinite():
    assert entropy_temperature(0.0, 0.0) == math.inf
    assert entropy_temperature(1.0, 0.0) == 1.0


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="schedule"):
        annealing_temperature("cosine", 0.1, 0.1, 0.1)  # type: ignore[arg-type]
