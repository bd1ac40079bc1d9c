"""Early rejection: the two-phase `expand` (scripted world) and the wrapper around inner searches.

Phase one generates `tau` tokens of every candidate step and scores them; within each group only
the best `keep` share of the cut-off candidates is finished (phase two) and rescored.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lodestar.orchestrator.algorithms.astar import AStarDecoding, AStarParams
from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.codec import algorithm_of
from lodestar.orchestrator.algorithms.early_rejection import INNER, author_keep, inner_algorithm
from lodestar.orchestrator.algorithms.expansion import expand
from lodestar.orchestrator.algorithms.registry import (
    ALGORITHMS,
    ParamError,
    algorithm_for_checkpoint,
    parse_params,
    start_search,
)
from lodestar.orchestrator.algorithms.state import (
    Budget,
    BudgetExhausted,
    EarlyRejection,
    SearchCommon,
    Trajectory,
)
from lodestar.workers.messages import SamplingParams, ScoreRequest, StepScores
from tests.scripted import ScriptedWorld, _pieces, is_correct, problems

INNERS = ["beam", "dvts", "pf", "epf", "astar"]
SAMPLING = SamplingParams()


class RecordingWorld(ScriptedWorld):
    """The scripted world, remembering the newest reward it gave each sequence id."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.last_reward: dict[str, float] = {}
        self.head_rewards: dict[str, float] = {}

    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        outs = await super().score(requests)
        self.last_reward.update((o.seq_id, o.rewards[-1]) for o in outs)
        return outs


def _run(coro):
    return asyncio.run(coro)


def _parents(world: ScriptedWorld, problem: str, seed: int, count: int) -> tuple:
    """A common state and `count` scored partial solutions of mixed depth (0 to 3 steps)."""
    common = SearchCommon(problem=problem, seed=seed)
    rng = np.random.default_rng(seed)
    parents = []
    for _ in range(count):
        t = common.root()
        for _ in range(int(rng.integers(0, 4))):
            (t,) = _run(expand(common, world, world, [t], SAMPLING, 40, "last"))
        parents.append(t)
    return common, parents


def _both(world, common, parents, er, groups=None, budget=None):
    """Children of `parents` with early rejection and, from an identical copy, without."""
    plain, rejecting = copy.deepcopy(common), copy.deepcopy(common)
    if budget is not None:
        plain.budget = rejecting.budget = budget
    before = len(world.extend_batches)
    ours = _run(
        expand(rejecting, world, world, parents, SAMPLING, 40, "last", groups, early_rejection=er)
    )
    calls = world.extend_batches[before:]
    world.head_rewards = dict(world.last_reward)  # the plain run below reuses the same ids
    theirs = _run(expand(plain, world, world, parents, SAMPLING, 40, "last"))
    return rejecting, ours, plain, theirs, calls


def _step_tokens(parent: Trajectory, child: Trajectory) -> int:
    return child.num_tokens - parent.num_tokens


CASES = [(seed, tau, keep) for seed in range(16) for tau, keep in [(2, 0.5), (3, 0.25), (5, 1.0)]]


# -- the two-phase expand ----------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "tau", "keep"), CASES)
def test_survivors_finish_as_the_one_phase_step_and_the_rest_are_rejected(seed, tau, keep):
    world = RecordingWorld(p_err=0.3)
    common, parents = _parents(world, f"task-{seed}", seed, 10)
    _, ours, _, theirs, _ = _both(world, common, parents, EarlyRejection(tau, keep, rescore=True))
    for parent, mine, one in zip(parents, ours, theirs, strict=True):
        if mine.pruned:  # cut at tau, or a step that ended within tau and lost
            assert mine.finished
            assert _step_tokens(parent, mine) == min(tau, _step_tokens(parent, one))
            assert mine.steps[-1] == "".join(_pieces(one.steps[-1])[:tau])
            continue
        # the same sequence ids (hence request seeds) as one-phase generation: the same step
        assert mine.steps == one.steps
        assert (mine.finished, mine.stop) == (one.finished, one.stop)
        assert mine.num_tokens == one.num_tokens and math.isclose(mine.logprob, one.logprob)
        assert mine.rewards == one.rewards and mine.score == one.score  # rescored in full


@pytest.mark.parametrize(("seed", "tau", "keep"), CASES)
def test_spend_counts_both_phases_and_rejection_saves_tokens(seed, tau, keep):
    world = RecordingWorld(p_err=0.3)
    common, parents = _parents(world, f"task-{seed}", seed, 10)
    er = EarlyRejection(tau, keep, rescore=True)
    mine, ours, plain, theirs, calls = _both(world, common, parents, er)
    spent = mine.spend.generated_tokens - common.spend.generated_tokens
    assert spent == sum(_step_tokens(p, c) for p, c in zip(parents, ours, strict=True))
    assert spent <= plain.spend.generated_tokens - common.spend.generated_tokens
    cut = sum(_step_tokens(p, t) > tau for p, t in zip(parents, theirs, strict=True))
    finished_later = sum(
        _step_tokens(p, t) > tau and not c.pruned
        for p, t, c in zip(parents, theirs, ours, strict=True)
    )
    assert sum(c.pruned for c in ours) == 10 - max(1, math.ceil(keep * 10))  # all compete
    assert finished_later <= cut
    assert calls == ([10, finished_later] if finished_later else [10])
    assert mine.spend.prm_passes - common.spend.prm_passes == 10 + finished_later
    assert mine.spend.policy_calls - common.spend.policy_calls == len(calls)
    assert mine.spend.reward_calls - common.spend.reward_calls == len(calls)
    assert mine.spend.prompt_tokens > common.spend.prompt_tokens


@pytest.mark.parametrize("seed", range(20))
def test_within_each_group_the_best_keep_share_of_cut_candidates_survives(seed):
    world = RecordingWorld(p_err=0.35, noise=0.3)
    common, parents = _parents(world, f"task-{seed}", seed, 12)
    rng = np.random.default_rng(seed + 1000)
    groups = [int(g) for g in rng.integers(0, 3, size=12)]
    tau, keep = 2, float(rng.choice([0.3, 0.5, 0.75]))
    _, ours, _, theirs, _ = _both(world, common, parents, EarlyRejection(tau, keep), groups)
    for g in set(groups):
        members = [i for i in range(12) if groups[i] == g]
        cut = [i for i in members if _step_tokens(parents[i], theirs[i]) > tau]
        kept = [i for i in cut if not ours[i].pruned]
        rejected = [i for i in cut if ours[i].pruned]
        assert len(kept) == (max(1, math.ceil(keep * len(cut))) if cut else 0)
        assert all(not ours[i].pruned for i in members if i not in cut)  # whole steps stay

        def head_score(i: int) -> float:
            t = ours[i]
            return world.head_rewards[t.seq_id if t.pruned else t.parent_id]

        if kept and rejected:
            assert min(map(head_score, kept)) >= max(map(head_score, rejected))


def test_without_groups_all_candidates_compete_together():
    world = RecordingWorld(p_err=0.3)
    common, parents = _parents(world, "task-4", 4, 9)
    _, ours, _, theirs, _ = _both(world, common, parents, EarlyRejection(2, 0.5))
    cut = sum(_step_tokens(p, t) > 2 for p, t in zip(parents, theirs, strict=True))
    assert sum(not c.pruned and c.parent_id not in {p.seq_id for p in parents} for c in ours) == (
        math.ceil(0.5 * cut)
    )


def test_an_answer_inside_the_first_tau_tokens_does_not_end_the_step():
    """The final scripted step is `so \\boxed{x}` + delimiter: tau = 2 cuts it before its end."""
    world = RecordingWorld()
    common = SearchCommon(problem="task-1", seed=3)
    steps = [f"s{i} ok w w w w\n\n" for i in range(3)]
    parent = Trajectory(seq_id=common.new_id(), parent_id=None, steps=steps, num_tokens=21)
    _, ours, _, theirs, _ = _both(world, common, [parent] * 4, EarlyRejection(2, 0.5))
    assert sum(c.pruned for c in ours) == 2
    for mine, one in zip(ours, theirs, strict=True):
        assert mine.pruned or (mine.steps == one.steps and mine.steps[-1].endswith("\n\n"))


def test_steps_that_end_within_tau_compete_and_are_never_continued():
    """The author rule: every candidate competes on its head score; keep 0.25 of 8 is 2."""
    world = RecordingWorld()
    common, parents = _parents(world, "task-2", 2, 8)
    _, ours, _, theirs, calls = _both(world, common, parents, EarlyRejection(7, 0.25))
    assert calls == [8]  # every scripted step is at most 7 tokens: phase one finished them all
    assert [c.steps for c in ours] == [c.steps for c in theirs]
    kept = [i for i, c in enumerate(ours) if not c.pruned]
    assert kept == sorted(range(8), key=lambda i: (-theirs[i].score, i))[:2]


@pytest.mark.parametrize("seed", range(10))
def test_the_prm_cap_covers_both_phases_before_anything_is_spent(seed):
    world = RecordingWorld()
    common, parents = _parents(world, f"task-{seed}", seed, 8)
    groups = [i // 3 for i in range(8)]  # sizes 3, 3, 2: at most 2 + 2 + 1 rescored
    need = 8 + 5
    short = Budget(max_prm_passes=common.spend.prm_passes + need - 1)
    rejecting = copy.deepcopy(common)
    rejecting.budget, er = short, EarlyRejection(2, 0.5, rescore=True)
    args = (world, world, parents, SAMPLING, 40, "last", groups)
    with pytest.raises(BudgetExhausted):
        _run(expand(rejecting, *args, early_rejection=er))
    assert rejecting.spend == common.spend and rejecting.next_id == common.next_id
    rejecting.budget = Budget(max_prm_passes=common.spend.prm_passes + need)
    _run(expand(rejecting, *args, early_rejection=er))
    assert rejecting.spend.prm_passes <= rejecting.budget.max_prm_passes


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("per_step", [1, 2, 3, 5, 6, 40])
def test_the_token_cap_covers_both_phases(seed, per_step):
    world = RecordingWorld(p_err=0.3)
    common, parents = _parents(world, f"task-{seed}", seed, 6)
    cap = Budget(max_generated_tokens=common.spend.generated_tokens + 6 * per_step)
    mine, ours, _, theirs, calls = _both(world, common, parents, EarlyRejection(2, 0.5), None, cap)
    assert mine.spend.generated_tokens <= cap.max_generated_tokens
    assert all(_step_tokens(p, c) <= per_step for p, c in zip(parents, ours, strict=True))
    if per_step <= 2:  # tau does not fit the allowance: one phase, exactly as without rejection
        assert len(calls) == 1 and [c.steps for c in ours] == [c.steps for c in theirs]
    for p, c in zip(parents, ours, strict=True):
        if not c.pruned and _step_tokens(p, c) == per_step and not c.steps[-1].endswith("\n\n"):
            assert c.finished and c.stop in ("budget", "answer")  # an answer outranks the cut


# -- the wrapper -------------------------------------------------------------------------------


def _author(inner: str) -> float:
    """The default survivor share for n = 8: 1 / m (m = 4) for beam and dvts, else 0.5."""
    return 0.25 if inner in ("beam", "dvts") else 0.5


def _params(inner: str, **extra) -> dict:
    return {"inner": inner, "inner_params": {"n": 8}, "tau": 2, **extra}


def _solve(inner: str, problem: str, seed: int, budget=None, world=None, **extra):
    world = world or ScriptedWorld()
    algorithm, state = start_search(
        "early_rejection", problem, _params(inner, **extra), seed, budget
    )
    return _run(run_search(algorithm, state, world, world))


def _solve_inner(inner: str, problem: str, seed: int, rejection: EarlyRejection | None):
    world = ScriptedWorld()
    algorithm, state = start_search(inner, problem, {"n": 8}, seed)
    return _run(run_search(type(algorithm)(rejection), state, world, world))


@pytest.mark.parametrize("inner", INNERS)
def test_the_wrapper_is_the_inner_search_with_rejection_switched_on(inner):
    for seed in range(3):
        ours = _solve(inner, f"task-{seed}", seed)
        theirs = _solve_inner(inner, f"task-{seed}", seed, EarlyRejection(2, _author(inner)))
        assert ours.algorithm == f"early_rejection({inner})"
        assert ours.stop_reason == theirs.stop_reason
        assert ours.candidates == theirs.candidates and ours.spend == theirs.spend
        assert ours.candidates[ours.chosen].stop != "rejected"


@pytest.mark.parametrize("inner", INNERS)
def test_rejection_spends_fewer_tokens_at_similar_accuracy(inner):
    names = problems(100)
    with_er = [_solve(inner, p, i) for i, p in enumerate(names)]
    without = [_solve_inner(inner, p, i, None) for i, p in enumerate(names)]

    def accuracy(results):
        return sum(is_correct(p, r.answer) for p, r in zip(names, results, strict=True)) / 100

    tokens_er = sum(r.spend.generated_tokens for r in with_er)
    tokens = sum(r.spend.generated_tokens for r in without)
    assert tokens_er < 0.9 * tokens, (inner, tokens_er, tokens)
    assert accuracy(with_er) >= accuracy(without) - 0.05, (accuracy(with_er), accuracy(without))
    assert all(r.candidates[r.chosen].stop != "rejected" for r in with_er)


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize(
    "budget",
    [{"max_generated_tokens": 20}, {"max_generated_tokens": 90}, {"max_prm_passes": 4},
     {"max_prm_passes": 11}, {"max_prm_passes": 23, "max_generated_tokens": 150}],
)  # fmt: skip
def test_budgets_are_never_exceeded_with_rejection(inner, budget):
    for seed in range(3):
        result = _solve(inner, f"task-{seed}", seed, budget, ScriptedWorld(p_err=0.3))
        assert result.spend.generated_tokens <= budget.get("max_generated_tokens", 10**9)
        assert result.spend.prm_passes <= budget.get("max_prm_passes", 10**9)
        assert result.stop_reason


def test_astar_never_keeps_a_rejected_candidate():
    world = ScriptedWorld(p_err=0.3)
    for seed in range(10):
        _, state = start_search("early_rejection", f"task-{seed}", _params("astar"), seed)
        algorithm = ALGORITHMS["early_rejection"]
        while not algorithm.is_done(state):
            state = _run(algorithm.advance(state, world, world))
            inner = state.inner
            kept = [e.node for e in inner.open] + inner.solutions + inner.truncated
            assert not any(t.pruned for t in kept)


@pytest.mark.parametrize("inner", INNERS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**40), problem=st.integers(0, 100), stop=st.integers(0, 30))
def test_resume_after_any_step_is_bit_identical(inner, seed, problem, stop):
    world = ScriptedWorld(p_err=0.3)
    name = f"task-{problem}"
    expected = _solve(inner, name, seed, world=world)
    algorithm, state = start_search("early_rejection", name, _params(inner), seed)
    for _ in range(stop):
        if algorithm.is_done(state):
            break
        state = _run(algorithm.advance(state, world, world))
    data = algorithm.dumps(state)
    assert algorithm_for_checkpoint(data) is algorithm and algorithm_of(data) == "early_rejection"
    back = algorithm.loads(data)
    assert algorithm.dumps(back) == data
    assert inner_algorithm(back.params).early_rejection == EarlyRejection(2, _author(inner))
    assert _run(run_search(algorithm, back, world, world)) == expected


@pytest.mark.parametrize("inner", ["beam", "astar"])
def test_a_checkpoint_with_the_setting_in_the_common_state_still_resumes(inner):
    """Checkpoints written when `SearchCommon` carried `early_rejection` load (the field is
    ignored: the wrapper's params rebuild the same setting) and resume to the same result."""
    world = ScriptedWorld(p_err=0.3)
    expected = _solve(inner, "task-7", 7, world=world)
    algorithm, state = start_search("early_rejection", "task-7", _params(inner), 7)
    state = _run(algorithm.advance(state, world, world))
    doc = json.loads(algorithm.dumps(state))
    old = {"tau": 2, "keep": _author(inner), "rescore": False}
    doc["state"]["inner"]["state"]["common"]["early_rejection"] = old
    back = algorithm.loads(json.dumps(doc).encode())
    assert algorithm.dumps(back) == algorithm.dumps(state)
    assert _run(run_search(algorithm, back, world, world)) == expected


def test_resume_after_every_step_with_astar_inside_is_bit_identical():
    world = ScriptedWorld(p_err=0.3)
    for seed in range(3):
        expected = _solve("astar", f"task-{seed}", seed, world=world)
        for stop in range(expected.spend.steps + 1):
            algorithm, state = start_search(
                "early_rejection", f"task-{seed}", _params("astar"), seed
            )
            for _ in range(stop):
                state = _run(algorithm.advance(state, world, world))
            back = algorithm.loads(algorithm.dumps(state))
            assert _run(run_search(algorithm, back, world, world)) == expected


def test_the_checkpoint_nests_the_inner_checkpoint():
    algorithm, state = start_search("early_rejection", "task-1", _params("astar"), 5)
    _run(algorithm.advance(state, ScriptedWorld(), ScriptedWorld()))
    doc = json.loads(algorithm.dumps(state))
    inner = AStarDecoding()
    assert doc["state"]["params"]["inner"] == "astar" and doc["state"]["params"]["tau"] == 2
    assert json.dumps(doc["state"]["inner"], separators=(",", ":")).encode() == (
        inner.dumps(state.inner)
    )


def test_inner_params_are_validated_by_the_inner_algorithm_and_stored_complete():
    assert list(INNER) == INNERS and all(name == a.name for name, a in INNER.items())
    params = parse_params("early_rejection", {"inner": "astar", "inner_params": {"k": 3}})
    assert params.inner_params == AStarParams(k=3).model_dump(mode="json")
    assert params.tau == 64 and params.keep is None and params.rescore is False
    assert author_keep(params) == 0.5  # astar has no width: ours
    for inner, m in [("beam", 4), ("dvts", 2), ("beam", 8)]:
        typed = parse_params("early_rejection", {"inner": inner, "inner_params": {"n": 16, "m": m}})
        assert author_keep(typed) == 1 / m  # the author code's top num_beams // beam_width
    default = parse_params("early_rejection", {"inner": "astar"})
    assert default.inner_params == AStarParams().model_dump(mode="json")
    for bad, field in [
        ({"inner": "astar", "inner_params": {"k": 0}}, "params.inner_params.k"),
        ({"inner": "astar", "inner_params": {"beams": 2}}, "params.inner_params.beams"),
        ({"inner": "pf", "inner_params": {"n": "many"}}, "params.inner_params.n"),
        ({"inner": "greedy"}, "params.inner"),
        ({"inner": "early_rejection"}, "params.inner"),
        ({"tau": 0}, "params.tau"),
        ({"keep": 0.0}, "params.keep"),
        ({"keep": 1.5}, "params.keep"),
        ({"temperature": 0.2}, "params.temperature"),
        ({"max_steps": 3}, "params.max_steps"),
        ({"lookahead": True}, "params.lookahead"),
    ]:
        with pytest.raises(ParamError) as e:
            parse_params("early_rejection", bad)
        assert e.value.field == field, (bad, e.value)
    for bad, field in [  # as the gRPC message nests them
        ({"inner": "astar", "inner_params": {"k": 0}}, "params.early_rejection.astar.k"),
        ({"inner": "pf", "tau": 0}, "params.early_rejection.tau"),
    ]:
        with pytest.raises(ParamError) as e:
            parse_params("early_rejection", bad, wire=True)
        assert e.value.field == field, (bad, e.value)


def test_inner_sampling_parameters_reach_the_policy():
    world = ScriptedWorld()
    params = {"inner": "astar", "inner_params": {"n": 2, "temperature": 0.0, "max_steps": 2}}
    algorithm, state = start_search("early_rejection", "task-3", params, 1)
    result = _run(run_search(algorithm, state, world, world))
    assert all(len(c.steps) <= 2 for c in result.candidates)
    assert state.inner.params.temperature == 0.0
    assert inner_algorithm(state.params).early_rejection.tau == 64
