"""Value tests that tell the algorithms apart: hand-computed aggregations, and a scripted world
whose reward misleads often enough that only a search using it the way the papers do wins."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Sequence

import pytest

from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.early_rejection import author_keep
from lodestar.orchestrator.algorithms.expansion import aggregate, expand, grow, score
from lodestar.orchestrator.algorithms.registry import parse_params, start_search
from lodestar.orchestrator.algorithms.state import EarlyRejection, SearchCommon, Trajectory
from lodestar.workers.messages import SamplingParams, ScoreRequest, StepScores
from tests.scripted import NoisyRewardWorld, ScriptedWorld, _pieces, is_correct, problems

STEP_REWARDS = (0.9, 0.5, 0.8)
WHOLE_REWARD = 0.3


class FixedReward:
    """Per-step rewards STEP_REWARDS; a whole answer sent as one step gets WHOLE_REWARD."""

    def __init__(self) -> None:
        self.requests: list[ScoreRequest] = []

    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        self.requests += requests
        return [
            StepScores(
                r.seq_id,
                (WHOLE_REWARD,) if len(r.steps) == 1 else STEP_REWARDS[: len(r.steps)],
                1,
            )
            for r in requests
        ]


def _three_steps(common: SearchCommon) -> Trajectory:
    steps = ["s0 ok\n\n", "s1 ok\n\n", "so \\boxed{7}\n\n"]
    return Trajectory(seq_id=common.new_id(), parent_id=None, steps=steps, rewards=[0.9, 0.5])


@pytest.mark.parametrize(
    ("how", "expected"), [("last", 0.8), ("min", 0.5), ("prod", 0.9 * 0.5 * 0.8), ("model", 0.8)]
)
def test_aggregate_of_hand_computed_rewards(how, expected):
    assert aggregate(list(STEP_REWARDS), how) == pytest.approx(expected)
    assert aggregate([0.2, 0.6, 0.7], "prod") == pytest.approx(0.084)  # not min's 0.2


@pytest.mark.parametrize(
    ("how", "expected"), [("last", 0.8), ("min", 0.5), ("prod", 0.36), ("model", WHOLE_REWARD)]
)
def test_score_sets_the_aggregated_value_of_each_rule(how, expected):
    """`model` sends the whole partial answer as ONE step (the PF authors' code), with no cached
    prefix, and its score is that one reward; the others score every step."""
    common, reward = SearchCommon(problem="task-1", seed=0), FixedReward()
    t = _three_steps(common)
    asyncio.run(score(common, reward, [t], how))
    (request,) = reward.requests
    assert t.score == pytest.approx(expected)
    if how == "model":
        assert request.steps == (t.text,) and request.parent_id is None
        assert t.rewards == [0.9, 0.5, WHOLE_REWARD]
    else:
        assert request.steps == tuple(t.steps) and t.rewards == list(STEP_REWARDS)


def test_pf_by_default_scores_each_partial_answer_as_one_step():
    class Recording(ScriptedWorld):
        def __init__(self) -> None:
            super().__init__()
            self.requests: list[ScoreRequest] = []

        async def score(self, requests):
            self.requests += requests
            return await super().score(requests)

    world = Recording()
    algorithm, state = start_search("pf", "task-3", {"n": 4}, 0)
    result = asyncio.run(run_search(algorithm, state, world, world))
    assert len(world.requests) == result.spend.prm_passes > 4
    assert all(len(r.steps) == 1 and r.parent_id is None for r in world.requests)
    for c in result.candidates:  # the score is the PRM's read of the whole answer
        (whole,) = world.step_rewards("task-3", [c.text])
        assert c.score == pytest.approx(whole)


# -- a reward that misleads: the ordering PF > best-of-N > greedy ------------------------------

NAMES = tuple(problems(150, "noisy"))


@functools.cache
def _accuracy(name: str, params: tuple[tuple[str, object], ...], seed0: int = 0) -> float:
    world = NoisyRewardWorld()
    correct = 0
    for i, p in enumerate(NAMES):
        algorithm, state = start_search(name, p, dict(params), seed0 + i)
        correct += is_correct(p, asyncio.run(run_search(algorithm, state, world, world)).answer)
    return correct / len(NAMES)


@pytest.mark.parametrize("seed0", [0, 1000])
def test_with_a_noisy_reward_pf_beats_best_of_n_which_beats_greedy(seed0):
    """Measured at seeds 0, 1000, 5000: greedy 0.12, best-of-8 0.50-0.62, PF-8 0.80-0.85."""
    greedy = _accuracy("greedy", ())
    best_of_n = _accuracy("best_of_n", (("n", 8),), seed0)
    pf = _accuracy("pf", (("n", 8),), seed0)
    assert greedy < 0.2 and best_of_n >= greedy + 0.25, (greedy, best_of_n)
    assert pf >= best_of_n + 0.12, (pf, best_of_n)


def test_with_a_noisy_reward_resampling_on_the_weights_is_what_wins():
    """softmax_temperature 100 resamples almost uniformly: the search keeps its particles and
    its argmax but loses the weights, and falls below best-of-N (measured 0.31-0.39)."""
    uniform = _accuracy("pf", (("n", 8), ("softmax_temperature", 100.0)))
    assert uniform < _accuracy("best_of_n", (("n", 8),)) - 0.1
    assert uniform < _accuracy("pf", (("n", 8),)) - 0.3


def test_the_noisy_world_misleads_a_single_read_often():
    world = NoisyRewardWorld()
    right = [world.step_rewards(f"noisy-{i}", ["s0 ok w\n\n"])[0] for i in range(400)]
    wrong = [world.step_rewards(f"noisy-{i}", ["s0 bad w\n\n"])[0] for i in range(400)]
    misled = sum(w > r for r, w in zip(right, wrong, strict=True)) / 400
    assert 0.1 < misled < 0.35 and math.isclose(sum(right) / 400, 0.75, abs_tol=0.05)


# -- early rejection: the author keep rule -----------------------------------------------------


@pytest.mark.parametrize("rescore", [False, True])
def test_early_rejection_keeps_the_top_n_over_m_and_rescores_only_when_asked(rescore):
    """beam n = 8, m = 4: the author code keeps the top 8 // 4 = 2 of the 8 heads (cut at tau = 2
    tokens); a survivor keeps its head's score unless `rescore` (one more PRM pass each)."""
    params = parse_params("early_rejection", {"inner_params": {"n": 8, "m": 4}, "tau": 2})
    assert author_keep(params) == 0.25
    world = ScriptedWorld(p_err=0.5, noise=0.3)
    common = SearchCommon(problem="task-5", seed=5)
    er = EarlyRejection(2, author_keep(params), rescore=rescore)
    root = common.root()
    children = asyncio.run(
        expand(common, world, world, [root] * 8, SamplingParams(), 40, "last", early_rejection=er)
    )
    kept = [c for c in children if not c.pruned]
    assert len(kept) == 2 and common.spend.prm_passes == 8 + (2 if rescore else 0)

    def head(c: Trajectory) -> float:
        return world.step_rewards("task-5", ["".join(_pieces(c.steps[-1])[:2])])[0]

    assert min(map(head, kept)) >= max(map(head, [c for c in children if c.pruned]))
    for c in kept:
        assert c.steps[-1].endswith("\n\n")  # finished to its delimiter
        whole = world.step_rewards("task-5", c.steps)[-1]
        assert c.score == pytest.approx(whole if rescore else head(c))


# -- a step longer than max_step_tokens stays one step ------------------------------------------


def test_a_step_longer_than_the_token_cap_is_continued_not_split():
    """Scripted steps are 7 tokens; at max_step_tokens 3 each takes 3 calls (3 + 3 + 1 tokens)
    continued as a partial step, and the PRM sees as many steps as at the default cap."""
    world = ScriptedWorld(p_err=0.0)
    common = SearchCommon(problem="task-2", seed=2)
    (child,) = asyncio.run(
        grow(common, world, [common.root()], SamplingParams(max_step_tokens=3), 40)
    )
    assert child.steps == ["s0 ok w w w w\n\n"] and child.num_tokens == 7
    assert world.extend_batches == [1, 1, 1] and common.spend.generated_tokens == 7
    assert not child.finished
    for name in ("pf", "beam", "best_of_n"):  # the seeds differ (more requests), not the shape
        result = _solve_with(name, {"n": 4, "max_step_tokens": 3})
        for c in result.candidates:
            assert len(c.steps) == 4 and all(s.endswith("\n\n") for s in c.steps), name


def _solve_with(name: str, params: dict) -> object:
    world = ScriptedWorld()
    algorithm, state = start_search(name, "task-6", params, 6)
    return asyncio.run(run_search(algorithm, state, world, world))
