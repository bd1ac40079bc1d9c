"""A*-decoding on the scripted world: f order, step costs, deduplication, budgets, resume."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lodestar.orchestrator.algorithms.astar import (
    AStarDecoding,
    AStarParams,
    AStarState,
    affordable,
    state_key,
)
from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.expansion import grow
from lodestar.orchestrator.algorithms.registry import ParamError, parse_params
from lodestar.orchestrator.algorithms.state import (
    Budget,
    BudgetExhausted,
    EarlyRejection,
    SearchCommon,
    Spend,
    Trajectory,
)
from lodestar.workers.messages import ExtendRequest, SamplingParams
from tests.scripted import ScriptedWorld, is_correct, problems

ASTAR = AStarDecoding()


class DistinctWorld(ScriptedWorld):
    """The scripted task with a seed-drawn word in every sampled step, so samples rarely repeat
    (the plain world's correct steps are all identical and deduplicate away)."""

    def _full_step(self, req: ExtendRequest) -> list[str]:
        full = super()._full_step(req)
        if len(full) > 3 and not req.partial_step and req.sampling.temperature > 0:
            full[2] = f" v{int(np.random.default_rng([req.seed, 7]).integers(0, 10**6))}"
        return full


def _init(problem: str, seed: int, budget: Budget | None = None, **params) -> AStarState:
    return ASTAR.init(problem, AStarParams(**params), seed, budget)


def _solve(problem, seed, world=None, budget=None, **params):
    world = world or ScriptedWorld()
    return asyncio.run(run_search(ASTAR, _init(problem, seed, budget, **params), world, world))


def _advance(state, world):
    return asyncio.run(ASTAR.advance(state, world, world))


def _greedy(problem: str, world: ScriptedWorld) -> str:
    """Greedy decoding (temperature 0) straight through `grow`: the baseline to beat."""
    common = SearchCommon(problem=problem, seed=0)
    t = common.root()
    while not t.finished:
        (t,) = asyncio.run(grow(common, world, [t], SamplingParams(temperature=0.0), 40))
    return t.text


# -- the open set ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_width", [None, 1, 3])
@pytest.mark.parametrize("step_cost", ["zero", "depth", "regret"])
def test_each_step_expands_the_lowest_f_states_in_order(batch_width, step_cost):
    for seed in range(6):
        world = DistinctWorld(noise=0.4)
        state = _init(f"task-{seed}", seed, batch_width=batch_width, step_cost=step_cost)
        while not ASTAR.is_done(state):
            before = sorted((e.f, e.order, e.node.seq_id) for e in state.open)
            free = state.params.n - len(state.solutions)
            done = len(state.expansions)
            state = _advance(state, world)
            popped = [(x.f, x.order, x.seq_id) for x in state.expansions[done:]]
            assert popped == before[: len(popped)]  # the B smallest (f, order), in that order
            assert len(popped) == min(batch_width or free, len(before))
        assert state.common.stop_reason in ("solutions", "exhausted")
        assert state.expansions[0].f == 1.0 and state.expansions[0].depth == 0  # the prompt


def test_f_is_g_plus_one_minus_score_and_ties_pop_first_in_first_out():
    for seed in range(4):
        state = _init(f"task-{seed}", seed, step_cost="regret", cost_weight=0.3)
        world = ScriptedWorld()
        while not ASTAR.is_done(state):
            state = _advance(state, world)
            for e in state.open:
                assert e.f == e.g + 1.0 - (e.node.score or 0.0)  # the root (reopened): f = 1
    state = _init("task-0", 0)
    state.open.clear()
    for i in range(6):
        ASTAR._push(state, Trajectory(seq_id=str(100 + i), parent_id=None), g=0.0, f=0.5)
    ASTAR._push(state, Trajectory(seq_id="99", parent_id=None), g=0.0, f=0.25)
    order = []
    while state.open:
        order.append(heapq.heappop(state.open).node.seq_id)
    assert order == ["99", *[str(100 + i) for i in range(6)]]


# -- step costs --------------------------------------------------------------------------------


def _path_g(t: Trajectory, step_cost: str, lam: float) -> float:
    """g from the specification, recomputed from a node's own rewards (aggregation `last`)."""
    g = 0.0
    for r in t.rewards:
        g += {"zero": 0.0, "depth": lam, "regret": lam * (1.0 - r)}[step_cost]
    return g


@pytest.mark.parametrize("step_cost", ["zero", "depth", "regret"])
@pytest.mark.parametrize("lam", [0.1, 0.7])
def test_step_cost_accumulates_g_as_specified(step_cost, lam):
    for seed in range(5):
        state = _init(f"task-{seed}", seed, step_cost=step_cost, cost_weight=lam, batch_width=2)
        world = DistinctWorld(noise=0.4)
        nodes = 0
        while not ASTAR.is_done(state):
            state = _advance(state, world)
            for e in state.open:
                assert e.g == pytest.approx(_path_g(e.node, step_cost, lam), abs=1e-12)
                nodes += 1
        for x in state.expansions[1:]:
            assert (x.g == 0.0) == (step_cost == "zero")
        assert nodes > 0


def test_a_heavy_depth_cost_turns_best_first_into_breadth_first():
    """f = lambda * depth + h with h in [0, 1): lambda >= 1 pops every depth before the next."""
    for seed in range(5):
        world = DistinctWorld(noise=0.4)
        state = _init(f"task-{seed}", seed, step_cost="depth", cost_weight=1.0, batch_width=1)
        state.params = state.params.model_copy(update={"n": 3})
        while not ASTAR.is_done(state):
            state = _advance(state, world)
        depths = [x.depth for x in state.expansions]
        assert depths == sorted(depths)
        zero = _init(f"task-{seed}", seed, batch_width=1)
        while not ASTAR.is_done(zero):
            zero = _advance(zero, world)
        assert len(zero.expansions) < len(state.expansions)  # best-first dives, BFS does not


# -- deduplication -----------------------------------------------------------------------------


def test_a_policy_that_repeats_itself_expands_each_state_once():
    """With p_err = 0 every sample of a step is the same text: k samples give one new state (and
    with max_expansions 1 nothing is reopened)."""
    world = ScriptedWorld(p_err=0.0, length=3)
    state = _init("task-1", 5, k=4, max_expansions=1)
    while not ASTAR.is_done(state):
        state = _advance(state, world)
    assert [x.depth for x in state.expansions] == [0, 1, 2, 3]
    assert state.duplicates == 4 * 3  # 3 repeats per expansion
    assert len(state.solutions) == 1 and state.common.stop_reason == "exhausted"
    assert len(state.seen) == 5  # prompt, three steps, the solution
    assert world.extend_batches == [4, 4, 4, 4]


def test_no_two_kept_states_have_the_same_steps():
    for seed in range(10):
        world = ScriptedWorld()
        state = _init(f"task-{seed}", seed)
        while not ASTAR.is_done(state):
            state = _advance(state, world)
        kept = [e.node for e in state.open] + state.solutions + state.truncated
        keys = [state_key(t.steps) for t in kept]
        assert len(keys) == len(set(keys))
        assert set(keys) <= set(state.seen)
        assert state.duplicates > 0  # the plain scripted world repeats itself a lot


class UniqueWorld(ScriptedWorld):
    """Every sampled step starts with a seed-drawn word, so no two samples repeat, and a partial
    step's first tau >= 1 tokens (early rejection's head) already tell siblings apart."""

    def _full_step(self, req: ExtendRequest) -> list[str]:
        full = super()._full_step(req)
        if not req.partial_step and req.sampling.temperature > 0:
            full[0] += f"v{int(np.random.default_rng([req.seed, 11]).integers(0, 10**9))}"
        return full


@pytest.mark.parametrize("max_expansions", [2, 3])
def test_a_node_whose_samples_repeat_seen_states_is_reopened_with_its_f(max_expansions):
    """p_err = 0: all k samples of a step are one text, so every expansion finds 1 new state (or
    none) and k - 1 repeats: each node is reopened, with its own f and g, until max_expansions."""
    world = ScriptedWorld(p_err=0.0, length=3)
    state = _init("task-1", 5, k=4, max_expansions=max_expansions)
    while not ASTAR.is_done(state):
        state = _advance(state, world)
    assert len(state.expanded) == 4  # the prompt and three steps: the one solution is not opened
    assert set(state.expanded.values()) == {max_expansions}
    first = {}
    for x in state.expansions:
        assert (x.f, x.g) == first.setdefault(x.seq_id, (x.f, x.g))
    assert state.duplicates == 4 * 4 * max_expansions - 4  # all repeats, but the 4 first finds
    assert state.common.stop_reason == "exhausted" and len(state.solutions) == 1


@pytest.mark.parametrize("early_rejection", [False, True])
def test_a_node_whose_samples_are_all_new_is_never_reopened(early_rejection):
    """Reopening is for repeats only: a successor early rejection killed is no repeat."""
    rejected = 0
    for seed in range(6):
        world = UniqueWorld(noise=0.4)
        state = _init(f"task-{seed}", seed)
        # rescore: the second phase's PRM passes show that it ran
        astar = AStarDecoding(EarlyRejection(2, 0.5, rescore=True) if early_rejection else None)
        while not astar.is_done(state):
            state = asyncio.run(astar.advance(state, world, world))
        assert state.duplicates == 0 and set(state.expanded.values()) == {1}
        assert len(state.expansions) == len(state.expanded)  # the prompt too: once
        rejected += state.common.spend.prm_passes > 4 * len(state.expansions)  # two phases ran
    assert rejected == (6 if early_rejection else 0)


def test_a_star_with_early_rejection_spends_no_more_than_without_on_distinct_samples():
    spend = {}
    for early_rejection in (False, True):
        tokens = passes = expansions = 0
        for i, p in enumerate(problems(40)):
            world = UniqueWorld(noise=0.4)
            state = _init(p, i)
            astar = AStarDecoding(EarlyRejection(tau=2, keep=0.5) if early_rejection else None)
            result = asyncio.run(run_search(astar, state, world, world))
            tokens, passes = (
                tokens + result.spend.generated_tokens,
                passes + result.spend.prm_passes,
            )
            expansions += len(state.expansions)
        spend[early_rejection] = tokens, passes, expansions
    (tokens, passes, expansions), (tokens_er, passes_er, expansions_er) = spend[False], spend[True]
    assert tokens_er <= tokens and expansions_er <= expansions, spend
    # each expansion pays k heads plus ceil(k / 2) rescored survivors: at most 1.5x the passes
    assert passes_er <= 1.5 * passes, spend


# -- budgets, batch width, k -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8])
def test_stops_once_n_solutions_are_finished(n):
    for seed in range(5):
        world = DistinctWorld()
        state = _init(f"task-{seed}", seed, n=n)
        while not ASTAR.is_done(state):
            assert len(state.solutions) < n  # no expansion starts once n are finished
            state = _advance(state, world)
        assert len(state.solutions) >= n and state.common.stop_reason == "solutions"
        assert all(t.finished and t.stop in ("answer", "eos", "max_steps") for t in state.solutions)


@pytest.mark.parametrize("cap", [1, 7, 20, 37, 64, 150, 400])
def test_generated_token_cap_is_never_exceeded(cap):
    for seed in range(6):
        result = _solve(f"task-{seed}", seed, DistinctWorld(), Budget(max_generated_tokens=cap))
        assert result.spend.generated_tokens <= cap
        assert result.stop_reason in ("budget", "solutions", "exhausted")
        assert result.candidates and result.chosen is not None


@pytest.mark.parametrize("cap", [1, 2, 5, 13, 30, 61])
@pytest.mark.parametrize("early_rejection", [False, True])
def test_prm_pass_cap_is_never_exceeded(cap, early_rejection):
    for seed in range(6):
        world = DistinctWorld()
        state = _init(f"task-{seed}", seed, Budget(max_prm_passes=cap), k=4)
        astar = AStarDecoding(EarlyRejection(tau=2, keep=0.5) if early_rejection else None)
        result = asyncio.run(run_search(astar, state, world, world))
        assert result.spend.prm_passes <= cap
        assert result.stop_reason in ("budget", "solutions", "exhausted")


def test_a_short_budget_shrinks_the_batch_first_then_k():
    def common(passes=None, tokens=None, spent_passes=0, spent_tokens=0):
        budget = Budget(max_prm_passes=passes, max_generated_tokens=tokens)
        c = SearchCommon(problem="p", seed=0, budget=budget)
        c.spend = Spend(prm_passes=spent_passes, generated_tokens=spent_tokens)
        return c

    p = AStarParams()
    assert affordable(common(), p, 4, 4) == (4, 4)
    assert affordable(common(passes=20, spent_passes=10), p, 4, 4) == (2, 4)
    assert affordable(common(passes=20, spent_passes=17), p, 4, 4) == (1, 3)
    assert affordable(common(tokens=100, spent_tokens=95), p, 4, 4) == (1, 4)
    assert affordable(common(tokens=100, spent_tokens=97), p, 4, 4) == (1, 3)
    er = EarlyRejection(tau=8, keep=0.5)  # each node: k heads + ceil(k / 2) finished and rescored
    assert affordable(common(passes=13), p, 4, 4, er) == (2, 4)
    assert affordable(common(passes=5), p, 4, 4, er) == (1, 3)
    # when tau does not fit the per-step token allowance, expand runs one phase: no extra passes
    assert affordable(common(passes=4, tokens=20), p, 4, 4, er) == (1, 4)
    for kwargs, rejection in [({"passes": 3, "spent_passes": 3}, None),
                              ({"tokens": 5, "spent_tokens": 5}, None),
                              ({"passes": 1}, er)]:  # fmt: skip
        with pytest.raises(BudgetExhausted):
            affordable(common(**kwargs), p, 4, 4, rejection)


def test_the_budget_stop_keeps_unexpanded_states_open_and_reports_the_best():
    world = DistinctWorld()
    state = _init("task-2", 2, Budget(max_prm_passes=10), k=4)
    while not ASTAR.is_done(state):
        state = _advance(state, world)
    assert state.common.stop_reason == "budget"
    assert [x.k for x in state.expansions] == [4, 4, 2]  # 4 + 4 passes, then the 2 left
    result = ASTAR.result(state)
    assert len(result.candidates) == len(state.solutions) + len(state.open) + len(state.truncated)
    if not state.solutions:
        best = max(range(len(result.candidates)), key=lambda i: result.candidates[i].score)
        assert result.chosen == best and not result.candidates[best].finished


def test_a_budget_too_small_for_one_successor_reports_the_prompt_unfinished():
    state = _init("task-1", 0, Budget(max_prm_passes=1))
    astar = AStarDecoding(EarlyRejection(tau=2, keep=0.5))  # 2 passes per successor
    result = asyncio.run(run_search(astar, state, ScriptedWorld(), ScriptedWorld()))
    assert result.stop_reason == "budget" and result.spend.prm_passes == 0
    assert result.chosen == 0 and len(result.candidates) == 1
    assert result.answer == "" and not result.candidates[0].finished


def test_a_one_token_budget_reports_the_cut_step_as_a_partial_state():
    result = _solve("task-1", 0, DistinctWorld(), budget=Budget(max_generated_tokens=1))
    assert result.spend.generated_tokens == 1 and result.stop_reason == "budget"
    assert result.answer == "s0" and result.candidates[result.chosen].stop == "budget"


@pytest.mark.parametrize(("batch_width", "k"), [(None, 4), (1, 1), (2, 3), (5, 2), (16, 4)])
def test_each_step_is_one_policy_call_of_b_times_k_requests(batch_width, k):
    for seed in range(4):
        world = DistinctWorld()
        state = _init(f"task-{seed}", seed, batch_width=batch_width, k=k, n=6)
        while not ASTAR.is_done(state):
            free, size = 6 - len(state.solutions), len(state.open)
            calls = len(world.extend_batches)
            state = _advance(state, world)
            b = min(batch_width or free, size)
            assert world.extend_batches[calls:] == [b * k]
            assert world.score_batches[calls:] == [b * k]
        assert all(x.k == k for x in state.expansions)


# -- the answer --------------------------------------------------------------------------------


def test_the_answer_is_the_best_finished_solution():
    for seed in range(10):
        world = DistinctWorld(noise=0.4)
        state = _init(f"task-{seed}", seed)
        result = asyncio.run(run_search(ASTAR, state, world, world))
        finished = [c for c in result.candidates if c.finished]
        assert len(finished) == len(state.solutions) >= 1
        assert result.candidates[result.chosen].score == max(c.score for c in finished)
        assert math.isclose(sum(c.weight for c in result.candidates), 1.0)


def test_weighted_vote_picks_the_answer_with_the_largest_summed_score():
    for seed in range(10):
        world = DistinctWorld(noise=0.45, p_err=0.4)
        result = _solve(f"task-{seed}", seed, world, selection="weighted_vote")
        mass: dict[str | None, float] = {}
        for c in result.candidates:
            mass[c.final_answer] = mass.get(c.final_answer, 0.0) + c.weight
        assert mass[result.final_answer] == pytest.approx(max(mass.values()))


def test_a_star_at_n_8_beats_greedy_on_the_scripted_task():
    names = problems(120)
    world = ScriptedWorld()
    greedy = sum(is_correct(p, _greedy(p, world)) for p in names) / len(names)
    astar = sum(is_correct(p, _solve(p, i, world).answer) for i, p in enumerate(names)) / 120
    distinct = sum(
        is_correct(p, _solve(p, i, DistinctWorld()).answer) for i, p in enumerate(names)
    ) / len(names)
    assert 0.3 < greedy < 0.55
    assert astar >= greedy + 0.3 and distinct >= greedy + 0.3, (astar, distinct, greedy)


# -- checkpoints -------------------------------------------------------------------------------


def _resumed(state, stop, world, algorithm=ASTAR):
    for _ in range(stop):
        if algorithm.is_done(state):
            break
        state = asyncio.run(algorithm.advance(state, world, world))
    data = algorithm.dumps(state)
    back = algorithm.loads(data)
    assert algorithm.dumps(back) == data
    return asyncio.run(run_search(algorithm, back, world, world))


PARAMS = [
    {},
    {"batch_width": 1, "step_cost": "regret", "cost_weight": 0.3},
    {"k": 3, "step_cost": "depth", "selection": "weighted_vote", "aggregation": "min"},
]


@pytest.mark.parametrize("params", PARAMS)
def test_resume_after_every_step_is_bit_identical(params):
    for seed in range(3):
        world = DistinctWorld(noise=0.4)
        expected = _solve(f"task-{seed}", seed, world, **params)
        for stop in range(expected.spend.steps + 1):
            assert _resumed(_init(f"task-{seed}", seed, **params), stop, world) == expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**40),
    problem=st.integers(0, 200),
    stop=st.integers(0, 40),
    params=st.sampled_from(PARAMS),
    cap=st.sampled_from([None, {"max_prm_passes": 19}, {"max_generated_tokens": 90}]),
)
def test_resume_at_any_stop_point_is_bit_identical(seed, problem, stop, params, cap):
    world = DistinctWorld(noise=0.4)
    budget = Budget(**cap) if cap else None
    expected = _solve(f"task-{problem}", seed, world, budget, **params)
    state = _init(f"task-{problem}", seed, budget, **params)
    assert _resumed(state, stop, world) == expected


def test_state_is_plain_data():
    state = _init("task-1", 1)
    _advance(state, ScriptedWorld())
    for f in dataclasses.fields(state):
        assert not isinstance(getattr(state, f.name), np.generic | np.ndarray)
    assert isinstance(state.open[0].f, float) and type(state.open[0].order) is int


def test_bad_parameters_name_the_field():
    for params, field in [
        ({"k": 0}, "params.k"),
        ({"n": 0}, "params.n"),
        ({"batch_width": 0}, "params.batch_width"),
        ({"step_cost": "linear"}, "params.step_cost"),
        ({"cost_weight": -1}, "params.cost_weight"),
        ({"selection": "vote"}, "params.selection"),
        ({"beam": 4}, "params.beam"),
    ]:
        with pytest.raises(ParamError) as e:
            parse_params("astar", params)
        assert e.value.field == field
