"""its_hub 1.2.0's own algorithms over Lodestar's engines (evaluation/its_hub_adapter.py), on the
shipped policy and PRM: what the adapters send the engines, and that a search is seeded."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from its_hub.api import ChatMessage as HubMessage

from lodestar.evaluation.its_hub_adapter import (
    ALGORITHMS,
    CallLog,
    EnginePRM,
    FullRescoring,
    solve_with_its_hub,
    split_conversation,
)
from lodestar.evaluation.systems import peer_jobs
from lodestar.orchestrator.algorithms.answers import extract_boxed
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.tasks.arithmetic import Difficulty, generate_problems
from tests.runtime_parts import shipped_workers

pytestmark = pytest.mark.slow


class Recorded:
    """An engine that records the size of every call it serves."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def extend(self, requests: Sequence[Any]) -> list[Any]:
        self.sizes.append(len(requests))
        return self.engine.extend(requests)

    def score(self, requests: Sequence[Any]) -> list[Any]:
        self.sizes.append(len(requests))
        return self.engine.score(requests)


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return shipped_workers(reward="prm")


@pytest.fixture(scope="module")
def problems() -> list[Any]:
    """Problems long enough that PF's resampling draws decide answers: with its_hub drawing from
    one process-wide stream, concurrent searches answer some of them differently."""
    return generate_problems("test", 4, Difficulty(ops=3), seed=5)


def solve_all(models: tuple[Any, Any], jobs: list[Any], together: bool) -> list[Any]:
    """The jobs with its_hub over one `LocalWorkers`: one after another, or all at once."""

    async def run() -> list[Any]:
        workers = LocalWorkers(*models)
        try:
            if together:
                return await asyncio.gather(*(solve_with_its_hub(workers, j) for j in jobs))
            return [await solve_with_its_hub(workers, j) for j in jobs]
        finally:
            workers.shutdown()

    return asyncio.run(run())


def test_its_hub_pf_answers_with_one_policy_call_per_step_holding_every_live_particle(
    models: tuple[Any, Any], problems: list[Any]
) -> None:
    n = 4
    policy, reward = Recorded(models[0]), Recorded(models[1])
    hits_before = policy.stats()["hits"]
    job = peer_jobs(problems, n)["pf"][0]
    (result,) = solve_all((policy, reward), [job], together=False)

    assert extract_boxed(result.text) is not None  # its_hub's chosen particle has an answer
    steps = len(reward.sizes)  # its_hub's PF scores once per step, every particle it propagated
    assert steps >= 2
    assert policy.sizes == reward.sizes  # one extend per step, with that step's particles
    assert result.log.generate_sizes == policy.sizes  # each agenerate was one engine call
    assert policy.sizes[0] == n and max(policy.sizes) == n
    # Prefix caching stayed on: every particle after the first step continued a held sequence.
    hits = policy.stats()["hits"] - hits_before
    assert hits == sum(policy.sizes[1:])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_its_hub_search_answers_the_same_alone_and_among_concurrent_searches(
    models: tuple[Any, Any], problems: list[Any], algorithm: str
) -> None:
    jobs = peer_jobs(problems, 4)[algorithm]
    policy = Recorded(models[0])
    alone = solve_all((policy, models[1]), jobs, together=False)
    merged_from = len(policy.sizes)
    together = solve_all((policy, models[1]), jobs, together=True)

    assert [r.text for r in together] == [r.text for r in alone]
    assert all(r.text for r in alone)
    # Run together, the searches' calls merged: fewer, larger engine calls than alone.
    assert len(policy.sizes) - merged_from < merged_from
    assert max(policy.sizes[merged_from:]) > max(policy.sizes[:merged_from])


def test_the_prm_rescores_every_answer_in_full_on_every_call(models: tuple[Any, Any]) -> None:
    workers = LocalWorkers(*models)
    log = CallLog()
    prm = EnginePRM(FullRescoring(workers.scope("prm-test"), "last", "\n\n", log))
    answers = ["3*4=12\n\n2+12=14 \\boxed{14}", "3*4=12\n\n2+12=15 \\boxed{15}"]
    try:
        first = asyncio.run(prm.ascore("2+3*4", answers))
        tokens = log.prm_tokens
        again = prm.score("2+3*4", answers)  # the same answers: nothing is reused
        twice = log.prm_tokens
        one = prm.score("2+3*4", answers[0])
    finally:
        workers.shutdown()
    assert again == pytest.approx(first, abs=1e-5)
    assert one == pytest.approx(first[0], abs=1e-5)
    assert log.score_sizes == [2, 2, 1]
    assert twice == 2 * tokens > 0  # every step of both answers encoded again
    assert log.prm_tokens > twice


def test_a_conversation_splits_into_the_prompt_and_the_answer_to_continue() -> None:
    user, partial = HubMessage("user", "2+3*4"), HubMessage("assistant", "3*4=12\n\n")
    assert split_conversation([user]) == ("2+3*4", "")
    assert split_conversation([user, partial]) == ("2+3*4", "3*4=12\n\n")
    system = HubMessage("system", "Be brief.")
    prompt, rest = split_conversation([system, user, partial])
    assert [(m.role, m.content) for m in prompt] == [("system", "Be brief."), ("user", "2+3*4")]
    assert rest == "3*4=12\n\n"
