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
from lodestar.orchestrator.algorithms.expansion import answered, choose
from lodestar.orchestrator.algorithms.registry import ALGORITHMS, start_search
from lodestar.orchestrator.algorithms.state import Candidate
from lodestar.workers.messages import ExtendRequest
from tests.scripted import DELIM, ScriptedWorld, is_correct, problems, true_answer

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
    "pg": {"n": 4, "num_iterations": 2},  # budget 8: 4 particles x 2 sweeps
    "astar": {"n": 8},
    "early_rejection": {"inner": "beam", "inner_params": {"n": 8, "m": 2}, "tau": 2},
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


class EarlyAnswerWorld(ScriptedWorld):
    """Solutions of different lengths: after the first step a sample answers at once w.p. 0.3, so
    a budget stop finds some candidates finished and others partial."""

    def _full_step(self, req: ExtendRequest) -> list[str]:
        if req.steps and not req.partial_step and req.seed % 10 < 3:
            answer = "999" if any(" bad" in s for s in req.steps) else true_answer(req.prompt)
            return ["so", f" \\boxed{{{answer}}}", DELIM]
        return super()._full_step(req)


STEP_SEARCHES = ["beam", "dvts", "pf", "epf", "epf_lookahead", "pg", "astar", "early_rejection"]
BUDGET_STOPS = [{"max_prm_passes": 13}, {"max_prm_passes": 21}, {"max_generated_tokens": 60},
                {"max_generated_tokens": 150}]  # fmt: skip


@pytest.mark.parametrize("key", STEP_SEARCHES)
def test_a_budget_stop_answers_with_a_finished_answer_when_there_is_one(key):
    """A*'s rule everywhere: an answer-less partial is chosen only when nothing answered."""
    mixed = 0
    for seed in range(30):
        for budget in BUDGET_STOPS:
            result = _solve(key, f"task-{seed}", seed, EarlyAnswerWorld(), budget)
            if result.stop_reason != "budget":
                continue
            done = [c for c in result.candidates if answered(c)]
            chosen = result.candidates[result.chosen]
            assert answered(chosen) == bool(done)
            if done:
                assert chosen.score == max(c.score for c in done)
                mixed += any(not answered(c) and c.stop != "rejected" for c in result.candidates)
    assert mixed >= 5  # budget stops with both answered and partial candidates were tested


def _candidate(score: float, answer: str | None, stop: str) -> Candidate:
    text = f"so \\boxed{{{answer}}}" if answer else "s0 ok"
    return Candidate(text, (text,), answer, score, 0.25, stop not in ("", "continue"), stop)


@pytest.mark.parametrize("selection", ["argmax", "weighted_vote"])
def test_choose_prefers_finished_answered_candidates_over_higher_scored_partials(selection):
    partial, cut = _candidate(0.9, None, ""), _candidate(0.95, None, "budget")
    rejected, right = _candidate(0.99, None, "rejected"), _candidate(0.6, "7", "answer")
    assert choose([partial, cut, right, rejected], selection) == 2
    assert choose([partial, cut, rejected], selection) == 1  # no answer: the best partial
    assert choose([rejected], selection) is None
