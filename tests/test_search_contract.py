"""The contract every registered algorithm keeps, checked over the registry (scripted models).

Per-algorithm behaviour lives in each algorithm's own test file; this file pins what is common:
seeded determinism, bit-identical resume after any step, budgets never exceeded, and search
beating greedy decoding when the reward is informative.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.registry import ALGORITHMS, start_search
from tests.scripted import ScriptedWorld, is_correct, problems

BUDGET_8 = {
    "greedy": {},
    "best_of_n": {"n": 8},
    "weighted_best_of_n": {"n": 8},
    "self_consistency": {"n": 8},
    "beam": {"n": 8},
    "dvts": {"n": 8},
    "pf": {"n": 8},
    "epf": {"n": 8},
    "epf_lookahead": {"n": 8, "lookahead": True},
    "astar": {"n": 8},
    "early_rejection": {"inner": "beam", "inner_params": {"n": 8}, "tau": 2},
}
SEARCHES = [name for name in BUDGET_8 if name != "greedy"]


def _name(key: str) -> str:
    return key.removesuffix("_lookahead")


def _solve(key: str, problem: str, seed: int, world: ScriptedWorld | None = None, budget=None):
    world = world or ScriptedWorld()
    algorithm, state = start_search(_name(key), problem, BUDGET_8[key], seed, budget)
    return asyncio.run(run_search(algorithm, state, world, world))


def test_every_registered_algorithm_is_covered():
    assert {_name(k) for k in BUDGET_8} == set(ALGORITHMS)


@pytest.mark.parametrize("key", list(BUDGET_8))
def test_same_seed_same_result(key):
    assert _solve(key, "task-3", 11) == _solve(key, "task-3", 11)


@pytest.mark.parametrize("key", list(BUDGET_8))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), problem=st.integers(0, 50), stop=st.integers(0, 30))
def test_resume_after_any_step_is_bit_identical(key, seed, problem, stop):
    world = ScriptedWorld()
    name = f"task-{problem}"
    algorithm, state = start_search(_name(key), name, BUDGET_8[key], seed)
    expected = asyncio.run(run_search(algorithm, state, world, world))

    algorithm, state = start_search(_name(key), name, BUDGET_8[key], seed)
    for _ in range(stop):
        if algorithm.is_done(state):
            break
        state = asyncio.run(algorithm.advance(state, world, world))
    data = algorithm.dumps(state)
    resumed = algorithm.loads(data)
    assert algorithm.dumps(resumed) == data
    assert asyncio.run(run_search(algorithm, resumed, world, world)) == expected


@pytest.mark.parametrize("key", SEARCHES)
@pytest.mark.parametrize(
    "budget",
    [{"max_generated_tokens": 37}, {"max_generated_tokens": 150}, {"max_prm_passes": 5},
     {"max_prm_passes": 13, "max_generated_tokens": 200}],
)  # fmt: skip
def test_budgets_are_never_exceeded(key, budget):
    for seed in range(3):
        result = _solve(key, f"task-{seed}", seed, budget=budget)
        spend = result.spend
        assert spend.generated_tokens <= budget.get("max_generated_tokens", 10**9)
        assert spend.prm_passes <= budget.get("max_prm_passes", 10**9)
        assert result.stop_reason


@pytest.mark.parametrize("key", SEARCHES)
def test_search_at_budget_8_beats_greedy_with_an_informative_reward(key):
    names = problems(120)
    greedy = sum(is_correct(p, _solve("greedy", p, 0).answer) for p in names) / len(names)
    search = sum(is_correct(p, _solve(key, p, i).answer) for i, p in enumerate(names)) / len(names)
    assert 0.3 < greedy < 0.55  # the scripted task: 0.8 ** 4 ~ 0.41
    assert search >= greedy + 0.15, (key, search, greedy)


@pytest.mark.parametrize("key", list(BUDGET_8))
def test_results_report_candidates_and_spend(key):
    result = _solve(key, "task-5", 3)
    assert result.candidates and result.chosen is not None
    chosen = result.candidates[result.chosen]
    assert result.answer == chosen.text and result.final_answer == chosen.final_answer
    assert result.spend.generated_tokens > 0 and result.spend.steps > 0
    if key not in ("greedy", "self_consistency"):
        assert result.spend.prm_passes > 0 and all(c.score is not None for c in result.candidates)
