"""Beam search and DVTS on scripted worlds."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.baselines import Greedy, GreedyParams
from lodestar.orchestrator.algorithms.beam import (
    BeamSearch,
    BeamSearchParams,
    DiverseVerifierTreeSearch,
    DiverseVerifierTreeSearchParams,
)
from lodestar.orchestrator.algorithms.registry import ParamError, parse_params
from lodestar.orchestrator.algorithms.state import Budget, EarlyRejection
from lodestar.workers.messages import ExtendRequest
from tests.scripted import DELIM, ScriptedWorld, is_correct, problems, true_answer

BEAM, DVTS = BeamSearch(), DiverseVerifierTreeSearch()
SHAPES = [(8, 4), (8, 2), (12, 3), (6, 6), (4, 1)]


class RaggedWorld(ScriptedWorld):
    """Distinct sampled steps (a seed-drawn word: siblings rarely tie), and solutions of different
    lengths (after the first step a sample answers early w.p. 0.3). Remembers every extend."""

    def __init__(self, **kw) -> None:
        kw.setdefault("noise", 0.4)
        super().__init__(**kw)
        self.calls: list[tuple[list[ExtendRequest], list]] = []

    def _full_step(self, req: ExtendRequest) -> list[str]:
        if req.steps and not req.partial_step and req.seed % 10 < 3:
            wrong = any(" bad" in s for s in req.steps)
            return ["so", f" \\boxed{{{'999' if wrong else true_answer(req.prompt)}}}", DELIM]
        full = super()._full_step(req)
        if len(full) > 3 and not req.partial_step:
            full[2] = f" v{int(np.random.default_rng([req.seed, 7]).integers(0, 10**6))}"
        return full

    async def extend(self, requests):
        outs = await super().extend(requests)
        self.calls.append((list(requests), list(outs)))  # grow reuses the list
        return outs


def _run(algorithm, params, problem="task-1", seed=0, world=None, budget=None):
    world = world or ScriptedWorld()
    state = algorithm.init(problem, params, seed, budget)
    return asyncio.run(run_search(algorithm, state, world, world))


def _advance(algorithm, state, world):
    return asyncio.run(algorithm.advance(state, world, world))


def _top(pool, k):
    return sorted(range(len(pool)), key=lambda i: (-pool[i].score, i))[:k]


# -- beam search -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), SHAPES)
def test_beam_keeps_exactly_the_top_n_over_m_by_score_each_round(n, m):
    k = n // m
    rounds = 0
    for seed in range(8):
        world = RaggedWorld()
        state = BEAM.init(f"task-{seed}", BeamSearchParams(n=n, m=m), seed)
        state = _advance(BEAM, state, world)
        assert len(world.calls[0][0]) == n and state.rounds == []  # round 0: n from the prompt
        while not BEAM.is_done(state):
            pool, done = list(state.live), len(state.completed)
            state = _advance(BEAM, state, world)
            kept = [pool[i] for i in _top(pool, k)]
            dropped = [t for t in pool if t not in kept]
            assert state.rounds[-1].kept == [t.seq_id for t in kept]
            assert min(t.score for t in kept) >= max((t.score for t in dropped), default=0.0)
            children = state.completed[done:] + state.live
            assert len(children) == n  # one expand for all n children
            copies = Counter(t.parent_id for t in children)
            if len(pool) >= k:
                assert copies == {t.seq_id: m for t in kept}  # each kept beam m ways
            else:  # fewer live than n/m: the kept ones share the n samples
                assert set(copies) == {t.seq_id for t in kept} and sum(copies.values()) == n
            rounds += 1
        assert all(t.finished and not t.pruned for t in state.completed)
    assert rounds > 0


def test_beam_answers_with_the_best_completed_solution():
    for seed in range(15):
        world = RaggedWorld()
        state = BEAM.init(f"task-{seed}", BeamSearchParams(), seed)
        result = asyncio.run(run_search(BEAM, state, world, world))
        scores = [c.score for c in result.candidates]
        assert len(result.candidates) == len(state.completed) and not state.live
        assert all(c.finished for c in result.candidates) and result.stop_reason == "finished"
        assert result.chosen == scores.index(max(scores))
        assert sum(c.weight for c in result.candidates) == pytest.approx(1.0)


def test_beam_stops_once_enough_solutions_are_completed():
    for seed in range(10):
        world = RaggedWorld()
        state = BEAM.init(f"task-{seed}", BeamSearchParams(stop_after=3), seed)
        while not BEAM.is_done(state):
            assert len(state.completed) < 3
            state = _advance(BEAM, state, world)
        assert len(state.completed) >= 3 or not state.live


@pytest.mark.parametrize("algorithm", [BEAM, DVTS])
def test_weighted_vote_picks_the_answer_with_the_largest_summed_score(algorithm):
    for seed in range(20):
        params = algorithm.Params(n=16, selection="weighted_vote")
        result = _run(algorithm, params, f"task-{seed}", seed, RaggedWorld(p_err=0.4))
        sums: dict[str, float] = {}
        for c in result.candidates:
            sums[c.final_answer] = sums.get(c.final_answer, 0.0) + c.score
        assert sums[result.final_answer] == pytest.approx(max(sums.values()))
        group = [c.score for c in result.candidates if c.final_answer == result.final_answer]
        assert result.candidates[result.chosen].score == max(group)


# -- DVTS --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), SHAPES)
def test_dvts_each_subtree_keeps_its_best_child(n, m):
    for seed in range(8):
        world = RaggedWorld()
        problem = f"task-{seed}"
        state = DVTS.init(problem, DiverseVerifierTreeSearchParams(n=n, m=m), seed)
        assert len(state.subtrees) == n // m
        while not DVTS.is_done(state):
            before = list(state.subtrees)
            live = [i for i, s in enumerate(before) if not s.finished]
            state = _advance(DVTS, state, world)
            requests, outs = world.calls[-1]
            assert len(requests) == m * len(live)  # one expand for all live subtrees
            for j, i in enumerate(live):
                block = range(j * m, (j + 1) * m)
                assert {requests[b].parent_id for b in block} == {before[i].seq_id}
                scores = [
                    world.step_rewards(problem, [*before[i].steps, outs[b].text])[-1] for b in block
                ]
                best = j * m + int(np.argmax(scores))  # first maximum: ties to the lowest index
                assert state.subtrees[i].seq_id == requests[best].seq_id
                assert state.subtrees[i].steps[:-1] == before[i].steps  # its own lineage only
            for i, s in enumerate(before):
                if s.finished:  # an ended subtree is left alone
                    assert state.subtrees[i] is s and state.rounds[-1].kept[i] is None


def test_dvts_subtrees_end_independently_and_the_answer_is_the_best_leaf():
    ragged = 0
    for seed in range(15):
        world = RaggedWorld()
        state = DVTS.init(f"task-{seed}", DiverseVerifierTreeSearchParams(n=16), seed)
        result = asyncio.run(run_search(DVTS, state, world, world))
        depths = {len(s.steps) for s in state.subtrees}
        ragged += len(depths) > 1
        assert len(result.candidates) == 4 and all(c.finished for c in result.candidates)
        scores = [c.score for c in result.candidates]
        assert result.chosen == scores.index(max(scores))
        assert [len(b[0]) for b in world.calls] == [
            4 * sum(len(s.steps) > r for s in state.subtrees) for r in range(len(world.calls))
        ]
    assert ragged > 0  # some searches had subtrees of different depths


def test_dvts_early_rejection_ranks_within_each_subtree():
    """keep=0.25 of 4 siblings: one survivor per subtree, so no subtree loses all its children
    (ranked across subtrees, 2 survivors of 8 would leave some subtree with none)."""
    for seed in range(15):
        world = RaggedWorld()
        state = DVTS.init(f"task-{seed}", DiverseVerifierTreeSearchParams(n=16, m=4), seed)
        dvts = DiverseVerifierTreeSearch(EarlyRejection(tau=2, keep=0.25))
        while not dvts.is_done(state):
            state = _advance(dvts, state, world)
            assert not any(s.pruned for s in state.subtrees)


# -- search-and-learn's final round and filter_duplicates --------------------------------------

ANSWER_STEP = "so \\boxed{69}" + DELIM  # true_answer("task-1")
FULL = ["s0 ok w w w w" + DELIM, "s1 ok w w w w" + DELIM, "s2 ok w w w w" + DELIM, ANSWER_STEP]


@pytest.mark.parametrize("algorithm", [BEAM, DVTS])
def test_the_final_round_completes_beams_unfinished_at_max_steps_and_they_answer(algorithm):
    """max_steps 2 of a 4-step solution: round 0 samples step one (4 x 7 tokens); the round
    reaching max_steps runs each sample on to the answer and EOS (4 x (7 + 7 + 3 + 1)), its
    text split back into steps, each scored. Off, the same search ends unanswered at max_steps."""
    on = _run(algorithm, algorithm.Params(n=4, m=2, max_steps=2), "task-1", 0, ScriptedWorld(0.0))
    assert on.final_answer == true_answer("task-1") == "69"
    assert {c.stop for c in on.candidates} == {"eos"}
    assert all(list(c.steps) == FULL and len(c.rewards) == 4 for c in on.candidates)
    assert (on.spend.generated_tokens, on.spend.prm_passes, on.spend.policy_calls) == (100, 8, 2)
    off = algorithm.Params(n=4, m=2, max_steps=2, final_round=False)
    off = _run(algorithm, off, "task-1", 0, ScriptedWorld(0.0))
    assert off.final_answer is None and {c.stop for c in off.candidates} == {"max_steps"}
    assert all(list(c.steps) == FULL[:2] for c in off.candidates)
    assert (off.spend.generated_tokens, off.spend.prm_passes) == (56, 8)


@pytest.mark.parametrize("algorithm", [BEAM, DVTS])
def test_only_the_round_reaching_max_steps_drops_the_delimiter_and_it_continues_cut_text(
    algorithm,
):
    """Steps of at most 4 tokens: the final round's 18 tokens take several calls, all without a
    delimiter, and every sample still ends at EOS with the whole solution."""
    world = RaggedWorld(p_err=0.0)
    params = algorithm.Params(n=4, m=2, max_steps=2, max_step_tokens=4)
    result = _run(algorithm, params, "task-1", 0, world)
    depths = [{len(r.steps) for r in reqs} for reqs, _ in world.calls]
    for (reqs, _), depth in zip(world.calls, depths, strict=True):
        assert {r.sampling.step_delimiter for r in reqs} == ({""} if depth == {1} else {DELIM})
    assert sum(depth == {1} for depth in depths) > 1  # the final text was continued
    assert all(c.finished and c.stop in ("eos", "answer") for c in result.candidates)
    assert result.final_answer == "69"
    spent = sum(o.num_tokens for _, outs in world.calls for o in outs)
    assert result.spend.generated_tokens == spent


@pytest.mark.parametrize("algorithm", [BEAM, DVTS])
@pytest.mark.parametrize("cap", [30, 45, 60, 80, 99])
def test_the_final_round_never_exceeds_a_token_budget(algorithm, cap):
    for seed in range(3):
        params = algorithm.Params(n=4, m=2, max_steps=2)
        result = _run(
            algorithm, params, f"task-{seed}", seed, RaggedWorld(), Budget(max_generated_tokens=cap)
        )
        assert result.spend.generated_tokens <= cap
        assert result.stop_reason in ("budget", "finished")


def test_filter_duplicates_collapses_identical_beams_keeping_the_first():
    """Greedy sampling: round 0's four children are one text. Unfiltered, the top two are two
    copies of it; filtered, the first one alone is kept and takes all four samples."""
    for dedup, kept in [(False, 2), (True, 1)]:
        params = BeamSearchParams(n=4, m=2, temperature=0.0, filter_duplicates=dedup)
        state = BEAM.init("task-1", params, 0)
        world = ScriptedWorld()
        state = _advance(BEAM, state, world)
        first = [t.seq_id for t in state.live]
        assert len({t.text for t in state.live}) == 1 and len(first) == 4
        state = _advance(BEAM, state, world)
        assert state.rounds[0].kept == first[:kept]
        assert Counter(t.parent_id for t in state.live) == {i: 4 // kept for i in first[:kept]}


class CollidingWorld(ScriptedWorld):
    """Steps of one of two words (drawn from the seed), so siblings often repeat a text."""

    def _full_step(self, req: ExtendRequest) -> list[str]:
        full = super()._full_step(req)
        if len(full) > 3 and not req.partial_step:
            full[2] = f" v{req.seed % 2}"
        return full


def test_filter_duplicates_keeps_the_best_of_the_first_copies_of_each_text():
    collided = 0
    for seed in range(10):
        world = CollidingWorld(p_err=0.3, length=4)
        state = BEAM.init(f"task-{seed}", BeamSearchParams(filter_duplicates=True), seed)
        state = _advance(BEAM, state, world)
        while not BEAM.is_done(state):
            pool, seen, unique = list(state.live), set(), []
            for t in pool:
                if t.text not in seen:
                    seen.add(t.text)
                    unique.append(t)
            collided += len(unique) < len(pool)
            state = _advance(BEAM, state, world)
            assert state.rounds[-1].kept == [unique[i].seq_id for i in _top(unique, 2)]
    assert collided > 0


# -- validation, budgets, resume, accuracy -----------------------------------------------------


@pytest.mark.parametrize("name", ["beam", "dvts"])
def test_n_must_be_divisible_by_m_and_the_error_names_the_field(name):
    for bad in [{"n": 6}, {"m": 3}, {"n": 8, "m": 16}, {"n": 10, "m": 4}]:
        with pytest.raises(ParamError) as e:
            parse_params(name, bad)
        assert e.value.field == "params.n" and "multiple of m" in e.value.message
    with pytest.raises(ValidationError) as err:
        BeamSearchParams(n=9, m=2)
    assert err.value.errors()[0]["loc"] == ("n",)
    for ok in [{"n": 12, "m": 3}, {"n": 4, "m": 4}, {"n": 5, "m": 1}]:
        assert parse_params(name, ok).n == ok["n"]
    with pytest.raises(ParamError) as e:
        parse_params(name, {"m": 0})
    assert e.value.field == "params.m"


@pytest.mark.parametrize("algorithm", [BEAM, DVTS])
@pytest.mark.parametrize(
    "budget",
    [Budget(max_generated_tokens=37), Budget(max_generated_tokens=150), Budget(max_prm_passes=5),
     Budget(max_prm_passes=13), Budget(max_prm_passes=30, max_generated_tokens=200)],
)  # fmt: skip
def test_budgets_are_never_exceeded_and_the_best_so_far_comes_back(algorithm, budget):
    stopped = 0
    for seed in range(4):
        result = _run(algorithm, algorithm.Params(), f"task-{seed}", seed, RaggedWorld(), budget)
        stopped += result.stop_reason == "budget"
        assert result.spend.generated_tokens <= (budget.max_generated_tokens or 10**9)
        assert result.spend.prm_passes <= (budget.max_prm_passes or 10**9)
        assert result.stop_reason in ("budget", "finished")
        if not result.candidates:  # only when the budget cannot pay for round 0's n samples
            assert (budget.max_prm_passes or 10**9) < 8 and result.spend.generated_tokens == 0
            continue
        if result.stop_reason == "finished":
            assert all(c.finished and c.stop != "budget" for c in result.candidates)
        assert result.answer == result.candidates[result.chosen].text
        assert all(c.steps and c.score is not None for c in result.candidates)
    assert stopped > 0


CONFIGS = {
    "beam": (BEAM, BeamSearchParams()),
    "beam_2_vote": (BEAM, BeamSearchParams(m=2, selection="weighted_vote", aggregation="min")),
    "beam_stop_after": (BEAM, BeamSearchParams(n=12, m=3, stop_after=2)),
    "dvts": (DVTS, DiverseVerifierTreeSearchParams()),
    "dvts_2_vote": (DVTS, DiverseVerifierTreeSearchParams(m=2, selection="weighted_vote")),
    "beam_final_round": (BEAM, BeamSearchParams(max_steps=2, max_step_tokens=4)),
    "beam_filter_duplicates": (BEAM, BeamSearchParams(temperature=0.0, filter_duplicates=True)),
    "dvts_final_round": (DVTS, DiverseVerifierTreeSearchParams(max_steps=2, max_step_tokens=4)),
}


@pytest.mark.parametrize("key", list(CONFIGS))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), problem=st.integers(0, 50), stop=st.integers(0, 6))
def test_resume_after_any_step_is_bit_identical(key, seed, problem, stop):
    algorithm, params = CONFIGS[key]
    world = RaggedWorld()
    expected = _run(algorithm, params, f"task-{problem}", seed, world)
    state = algorithm.init(f"task-{problem}", params, seed)
    for _ in range(stop):
        state = _advance(algorithm, state, world)
    data = algorithm.dumps(state)
    resumed = algorithm.loads(data)
    assert type(resumed) is algorithm.State and algorithm.dumps(resumed) == data
    assert asyncio.run(run_search(algorithm, resumed, world, world)) == expected


@functools.cache
def _greedy_accuracy(names: tuple[str, ...]) -> float:
    greedy = Greedy()
    return sum(is_correct(p, _run(greedy, GreedyParams(), p).answer) for p in names) / len(names)


@pytest.mark.parametrize("key", ["beam", "dvts"])
def test_eight_samples_per_round_beat_greedy_by_a_clear_margin(key):
    algorithm, params = CONFIGS[key]
    names = tuple(problems(120))
    greedy = _greedy_accuracy(names)
    search = sum(
        is_correct(p, _run(algorithm, params, p, i).answer) for i, p in enumerate(names)
    ) / len(names)
    assert greedy < 0.55 and search >= greedy + 0.15, (key, search, greedy)
