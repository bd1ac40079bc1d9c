"""Greedy, best-of-N, weighted best-of-N and self-consistency on scripted worlds."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.baselines import (
    BestOfN,
    BestOfNParams,
    Greedy,
    GreedyParams,
    SelfConsistency,
    SelfConsistencyParams,
    WeightedBestOfN,
    WeightedBestOfNParams,
)
from lodestar.orchestrator.algorithms.registry import ParamError, parse_params
from lodestar.orchestrator.algorithms.state import Budget
from lodestar.workers.messages import ExtendRequest, StepOutput, StepScores
from tests.scripted import DELIM, ScriptedWorld, is_correct, problems, true_answer

GREEDY, BON, WBON, SC = Greedy(), BestOfN(), WeightedBestOfN(), SelfConsistency()
SAMPLERS = {
    "greedy": (GREEDY, GreedyParams()),
    "best_of_n": (BON, BestOfNParams()),
    "weighted_best_of_n": (WBON, WeightedBestOfNParams()),
    "self_consistency": (SC, SelfConsistencyParams()),
}
SCORED = ("best_of_n", "weighted_best_of_n")


class RecordingWorld(ScriptedWorld):
    """The scripted world, remembering every extend request."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.requests: list[list[ExtendRequest]] = []

    async def extend(self, requests):
        self.requests.append(list(requests))
        return await super().extend(requests)


class RaggedWorld(RecordingWorld):
    """Solutions of different lengths: after the first step a sample answers early w.p. 0.3."""

    def _full_step(self, req: ExtendRequest) -> list[str]:
        if req.steps and req.seed % 10 < 3:
            wrong = any(" bad" in s for s in req.steps)
            return ["so", f" \\boxed{{{'999' if wrong else true_answer(req.prompt)}}}", DELIM]
        return super()._full_step(req)


class VotingWorld:
    """One-step solutions with scripted answers and rewards, by sample index (request order).

    `answers[i]` is sample i's final answer (None: it ends at EOS without one); `rewards[i]` is
    the PRM's reward for it.
    """

    def __init__(self, answers: Sequence[str | None], rewards: Sequence[float] = ()) -> None:
        self.answers, self.rewards = list(answers), list(rewards)
        self.score_calls = 0

    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        outs = []
        for i, r in enumerate(requests):
            a = self.answers[i]
            text = f"s{i} no answer" if a is None else f"s{i} so \\boxed{{{a}}}{DELIM}"
            stop = "eos" if a is None else "delimiter"
            outs.append(StepOutput(r.seq_id, text, (1,), 0.0, 3, 1, stop))
        return outs

    async def score(self, requests):
        self.score_calls += 1
        out = []
        for r in requests:
            i = int(r.steps[-1].split(" ")[0][1:])
            out.append(StepScores(r.seq_id, (self.rewards[i],), 1))
        return out


class CopiesWorld:
    """One-step solutions where samples may be identical: sample i says `texts[i]`; the PRM's
    reward for a text is `rewards[text]`. Remembers every text it was asked to score."""

    def __init__(self, texts: Sequence[str], rewards: dict[str, float]) -> None:
        self.texts, self.rewards = list(texts), rewards
        self.scored: list[list[str]] = []

    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        texts = self.texts[: len(requests)]  # one step each: a text without an answer ends at EOS
        return [
            StepOutput(r.seq_id, t, (1,), 0.0, 3, 1, "delimiter" if "boxed" in t else "eos")
            for r, t in zip(requests, texts, strict=True)
        ]

    async def score(self, requests):
        self.scored.append([r.steps[-1] for r in requests])
        return [StepScores(r.seq_id, (self.rewards[r.steps[-1]],), 1) for r in requests]


def _boxed(answer: str) -> str:
    return f"so \\boxed{{{answer}}}{DELIM}"


def _run(algorithm, params, problem="task-1", seed=0, world=None, budget=None):
    world = world or ScriptedWorld()
    state = algorithm.init(problem, params, seed, budget)
    return asyncio.run(run_search(algorithm, state, world, world))


def _answer_counts(result) -> Counter:
    return Counter(c.final_answer for c in result.candidates if c.final_answer is not None)


# -- greedy ------------------------------------------------------------------------------------


def test_greedy_is_deterministic_uses_no_reward_and_samples_at_temperature_zero():
    for seed, problem in enumerate(problems(20)):
        world = RecordingWorld()
        first = _run(GREEDY, GreedyParams(), problem, seed, world)
        again = _run(GREEDY, GreedyParams(), problem, seed + 1000, RecordingWorld())
        assert first.answer == again.answer and first.candidates == again.candidates
        assert world.score_batches == [] and first.spend.prm_passes == 0
        assert first.spend.reward_calls == 0 and first.candidates[0].score is None
        assert [len(b) for b in world.requests] == [1] * len(world.requests)  # one grow a step
        assert all(r.sampling.temperature == 0.0 for b in world.requests for r in b)
        assert first.spend.steps == len(world.requests) == len(first.candidates[0].steps)
        assert len(first.candidates) == 1 and first.chosen == 0 and first.stop_reason == "finished"


def test_greedy_accuracy_is_the_scripted_greedy_rate():
    names = problems(120)
    accuracy = sum(is_correct(p, _run(GREEDY, GreedyParams(), p).answer) for p in names) / 120
    assert 0.3 < accuracy < 0.55  # 0.8 ** 4 ~ 0.41


def test_greedy_pins_temperature_and_takes_no_sample_count():
    assert GreedyParams().sampling().temperature == 0.0
    with pytest.raises(ValidationError):
        GreedyParams(temperature=0.7)
    for bad, field in [({"temperature": 0.5}, "params.temperature"), ({"n": 4}, "params.n")]:
        with pytest.raises(ParamError) as e:
            parse_params("greedy", bad)
        assert e.value.field == field


# -- best-of-N ---------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["last", "min", "prod", "model"])
def test_best_of_n_picks_the_argmax_of_one_score_call(aggregation):
    scored_runs = 0
    for seed in range(15):
        world = RaggedWorld(noise=0.4, p_err=0.4)
        params = BestOfNParams(n=8, aggregation=aggregation)
        result = _run(BON, params, f"task-{seed}", seed, world)
        if len(_answer_counts(result)) == 1 and all(c.final_answer for c in result.candidates):
            continue  # all agree: no score call (its own test)
        scored_runs += 1
        scores = [c.score for c in result.candidates]
        assert len(scores) == 8 and all(s is not None for s in scores)
        assert result.chosen == scores.index(max(scores))  # argmax, ties to the lowest index
        distinct = len({c.steps for c in result.candidates})  # each distinct sample once
        assert world.score_batches == [distinct] and result.spend.prm_passes == distinct
        assert all(c.finished for c in result.candidates)
        assert all(c.weight == pytest.approx(1 / 8) for c in result.candidates)
        # one grow per step, covering exactly the unfinished samples
        unfinished = [sum(len(c.steps) > k for c in result.candidates) for k in range(10)]
        assert world.extend_batches == [u for u in unfinished if u]
    assert scored_runs >= 10


def test_best_of_n_ties_go_to_the_lowest_index():
    world = VotingWorld(["1", "2", "3", "4"], [0.5, 0.9, 0.9, 0.1])
    result = _run(BON, BestOfNParams(n=4), world=world)
    assert result.chosen == 1 and result.final_answer == "2"


def test_aggregation_reaches_the_scores():
    for seed in range(5):
        for how, f in [("min", min), ("last", lambda r: r[-1])]:
            result = _run(BON, BestOfNParams(aggregation=how), f"task-{seed}", seed)
            assert all(c.score == f(c.rewards) for c in result.candidates)


# -- weighted best-of-N ------------------------------------------------------------------------


def test_weighted_best_of_n_sums_scores_per_answer_where_argmax_does_not():
    answers = ["7", "3", "3", "3", "5", None]
    rewards = [0.9, 0.5, 0.6, 0.45, 0.2, 0.3]
    argmax = _run(BON, BestOfNParams(n=6), world=VotingWorld(answers, rewards))
    weighted = _run(WBON, WeightedBestOfNParams(n=6), world=VotingWorld(answers, rewards))
    assert argmax.final_answer == "7" and argmax.chosen == 0  # the best single score
    assert weighted.final_answer == "3"  # 0.5 + 0.6 + 0.45 = 1.55 > 0.9
    assert weighted.chosen == 2  # the highest-scoring member of the winning answer
    assert [c.weight for c in weighted.candidates] == pytest.approx(
        [r / sum(rewards) for r in rewards]
    )


def test_samples_without_a_final_answer_do_not_vote():
    world = VotingWorld([None, None, "7", "2"], [0.9, 0.9, 0.5, 0.4])
    result = _run(WBON, WeightedBestOfNParams(n=4), world=world)
    assert result.chosen == 2 and result.final_answer == "7"


def test_weighted_best_of_n_tie_between_answers_goes_to_the_first_seen():
    world = VotingWorld(["4", "8", "8", "4"], [0.25, 0.5, 0.25, 0.5])  # 0.75 each
    assert _run(WBON, WeightedBestOfNParams(n=4), world=world).chosen == 3  # best "4"


def test_weighted_best_of_n_winner_has_the_largest_score_sum():
    for seed in range(30):
        result = _run(WBON, WeightedBestOfNParams(), f"task-{seed}", seed, ScriptedWorld(p_err=0.4))
        sums: dict[str, float] = {}
        for c in result.candidates:
            if c.final_answer is not None:
                sums[c.final_answer] = sums.get(c.final_answer, 0.0) + c.score
        assert sums[result.final_answer] == max(sums.values())
        group = [c.score for c in result.candidates if c.final_answer == result.final_answer]
        assert result.candidates[result.chosen].score == max(group)
        assert sum(c.weight for c in result.candidates) == pytest.approx(1.0)


def test_weighted_best_of_n_sums_scores_over_equivalent_answers():
    world = VotingWorld(["0.5", "7", "\\frac{1}{2}", "7"], [0.4, 0.45, 0.4, 0.3])
    result = _run(WBON, WeightedBestOfNParams(n=4), world=world)
    assert result.chosen == 0 and result.final_answer == "0.5"  # 0.8 for 1/2 beats 0.75 for 7


# -- scoring each distinct sample once ---------------------------------------------------------

A, B, C = _boxed("1"), _boxed("2"), _boxed("3")


@pytest.mark.parametrize("algorithm", [BON, WBON])
def test_each_distinct_sample_is_scored_once_and_copies_share_its_score(algorithm):
    world = CopiesWorld([A, B, A, C, B, A], {A: 0.3, B: 0.9, C: 0.5})
    result = _run(algorithm, algorithm.Params(n=6), world=world)
    assert world.scored == [[A, B, C]]  # one call, first copies in sample order
    assert result.spend.prm_passes == 3 and result.spend.reward_calls == 1
    assert [c.score for c in result.candidates] == [0.3, 0.9, 0.3, 0.5, 0.9, 0.3]
    assert result.chosen == 1 and result.final_answer == "2"  # B: 0.9 (weighted: 1.8 vs 0.9)
    assert result.stop_reason == "finished"


@pytest.mark.parametrize("algorithm", [BON, WBON])
def test_the_prm_is_skipped_when_every_sample_gives_the_same_answer(algorithm):
    texts = [_boxed("\\frac12"), _boxed("0.5"), _boxed("\\dfrac{1}{2}"), _boxed("1/2")]
    world = CopiesWorld(texts, {})
    result = _run(algorithm, algorithm.Params(n=4), world=world)
    assert world.scored == [] and result.spend.prm_passes == 0 and result.spend.reward_calls == 0
    assert result.chosen == 0 and result.stop_reason == "finished"
    assert all(c.score is None for c in result.candidates)
    assert [c.weight for c in result.candidates] == pytest.approx([0.25] * 4)


@pytest.mark.parametrize(
    "texts",
    [[A, A, "no answer at EOS"], [A, _boxed("7")], [_boxed("x=1"), _boxed("y=2")]],
)
def test_the_prm_is_called_while_there_is_something_to_choose(texts):
    world = CopiesWorld(texts, {t: 0.5 for t in texts})
    result = _run(BON, BestOfNParams(n=len(texts)), world=world)
    assert result.spend.prm_passes == len(set(texts)) and len(world.scored) == 1


def test_under_a_prm_cap_copies_of_a_paid_sample_come_free():
    world = CopiesWorld([A, B, A, C, B, C], {A: 0.3, B: 0.9, C: 0.95})
    result = _run(BON, BestOfNParams(n=6), world=world, budget=Budget(max_prm_passes=2))
    assert world.scored == [[A, B]] and result.spend.prm_passes == 2
    assert [c.score for c in result.candidates] == [0.3, 0.9, 0.3, None, 0.9, None]
    assert result.chosen == 1 and result.stop_reason == "budget"


def test_scored_samples_resume_bit_identical_with_copies():
    world = CopiesWorld([A, B, A, C], {A: 0.3, B: 0.9, C: 0.5})
    expected = _run(BON, BestOfNParams(n=4), world=world)
    state = BON.init("task-1", BestOfNParams(n=4), 0)
    state = asyncio.run(BON.advance(state, world, world))
    resumed = BON.loads(BON.dumps(state))
    assert asyncio.run(run_search(BON, resumed, world, world)) == expected


# -- self-consistency --------------------------------------------------------------------------


def test_self_consistency_picks_the_most_frequent_answer_with_no_reward():
    for seed in range(30):
        world = ScriptedWorld(p_err=0.4)
        result = _run(SC, SelfConsistencyParams(), f"task-{seed}", seed, world)
        counts = _answer_counts(result)
        answers = [c.final_answer for c in result.candidates]
        assert counts[result.final_answer] == max(counts.values())
        tied = {a for a, k in counts.items() if k == max(counts.values())}
        first = min(answers.index(a) for a in tied)
        assert result.chosen == first  # ties to the answer seen first, its first sample
        assert world.score_batches == [] and result.spend.prm_passes == 0
        share = counts[result.final_answer] / sum(counts.values())
        chosen_group = [
            c.weight for c in result.candidates if c.final_answer == result.final_answer
        ]
        assert sum(chosen_group) == pytest.approx(share)


@pytest.mark.parametrize(
    ("answers", "chosen"),
    [
        (["5", "9", "9", "5"], 0),
        (["9", "5", "5", "9"], 0),
        ([None, "2", "3", "3"], 2),
        ([None, "6", None, "1"], 1),
        (["1.50", "1.5", "\\frac{1}{2}", "2"], 0),  # canonical forms vote together
        (["3", "x=3", "4", "4"], 0),  # equivalent forms vote together: 2 : 2, first seen
        (["\\frac12", "7", "0.5", "7", "\\dfrac{1}{2}"], 0),
        (["7", "\\frac12", "0.5", "7", "\\dfrac{1}{2}"], 1),
        ([None, None, None, None], 0),
    ],
)
def test_self_consistency_ties_go_to_the_first_seen(answers, chosen):
    world = VotingWorld(answers)
    result = _run(SC, SelfConsistencyParams(n=len(answers)), world=world)
    assert result.chosen == chosen and world.score_calls == 0


# -- budgets, resume, the contract -------------------------------------------------------------


@pytest.mark.parametrize("key", list(SAMPLERS))
@pytest.mark.parametrize(
    "budget",
    [Budget(max_generated_tokens=5), Budget(max_generated_tokens=37), Budget(max_prm_passes=3),
     Budget(max_generated_tokens=120, max_prm_passes=6)],
)  # fmt: skip
def test_budgets_are_never_exceeded_and_a_result_comes_back(key, budget):
    algorithm, params = SAMPLERS[key]
    for seed in range(4):
        result = _run(algorithm, params, f"task-{seed}", seed, RaggedWorld(), budget)
        assert result.spend.generated_tokens <= (budget.max_generated_tokens or 10**9)
        assert result.spend.prm_passes <= (budget.max_prm_passes or 10**9)
        unscored = key in SCORED and any(c.score is None for c in result.candidates)
        cut = any(c.stop == "budget" for c in result.candidates) or not result.candidates
        assert result.stop_reason == ("budget" if cut or unscored else "finished")
        if result.candidates:  # none only when not even one token per sample was affordable
            assert result.answer == result.candidates[result.chosen].text
        else:
            assert (budget.max_generated_tokens or 10**9) < params.n


def test_best_of_n_under_a_prm_cap_scores_the_first_samples_it_can_pay_for():
    result = _run(BON, BestOfNParams(n=8), budget=Budget(max_prm_passes=3))
    assert [c.score is not None for c in result.candidates] == [True] * 3 + [False] * 5
    assert result.chosen < 3 and result.stop_reason == "budget"


def test_token_cap_cuts_samples_which_are_still_scored():
    result = _run(BON, BestOfNParams(n=4), budget=Budget(max_generated_tokens=30))
    assert result.stop_reason == "budget" and result.spend.generated_tokens <= 30
    assert all(c.score is not None for c in result.candidates)
    assert any(c.stop == "budget" for c in result.candidates)


@pytest.mark.parametrize("key", list(SAMPLERS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), problem=st.integers(0, 50), stop=st.integers(0, 8))
def test_resume_after_any_step_is_bit_identical(key, seed, problem, stop):
    algorithm, params = SAMPLERS[key]
    world = RaggedWorld()
    expected = _run(algorithm, params, f"task-{problem}", seed, world)
    state = algorithm.init(f"task-{problem}", params, seed)
    for _ in range(stop):
        state = asyncio.run(algorithm.advance(state, world, world))
    data = algorithm.dumps(state)
    resumed = algorithm.loads(data)
    assert type(resumed) is algorithm.State and algorithm.dumps(resumed) == data
    assert asyncio.run(run_search(algorithm, resumed, world, world)) == expected


@functools.cache
def _greedy_accuracy(names: tuple[str, ...]) -> float:
    return sum(is_correct(p, _run(GREEDY, GreedyParams(), p).answer) for p in names) / len(names)


@pytest.mark.parametrize("key", ["best_of_n", "weighted_best_of_n", "self_consistency"])
def test_eight_samples_beat_greedy_by_a_clear_margin(key):
    algorithm, params = SAMPLERS[key]
    names = tuple(problems(120))
    greedy = _greedy_accuracy(names)
    search = sum(
        is_correct(p, _run(algorithm, params, p, i).answer) for i, p in enumerate(names)
    ) / len(names)
    assert search >= greedy + 0.15, (key, search, greedy)
