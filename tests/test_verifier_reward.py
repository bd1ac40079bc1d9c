"""The verifier reward: exact step rewards for arithmetic under the PRM's `score` contract."""

from __future__ import annotations

import asyncio

import pytest

from lodestar.orchestrator.inprocess import LocalReward
from lodestar.tasks.arithmetic import generate_problems, solution_steps
from lodestar.workers.messages import ChatMessage, ScoreRequest, StepScores
from lodestar.workers.verifier import NotArithmeticError, VerifierReward, problem_from_prompt

P = "(7+5)*3-4"
GOOD = ("7+5=12, so 12*3-4\n\n", "12*3=36, so 36-4\n\n", "36-4=32 \\boxed{32}")


def req(steps: tuple[str, ...], prompt: object = P, seq_id: str = "s") -> ScoreRequest:
    return ScoreRequest(seq_id=seq_id, parent_id=None, prompt=prompt, steps=steps)  # type: ignore[arg-type]


def test_correct_steps_score_one_and_wrong_steps_zero() -> None:
    out = VerifierReward().score(
        [req(GOOD, seq_id="a"), req(("7+5=12\n\n", "12*3=35\n\n", "35-4=31"), seq_id="b")]
    )
    assert out == [
        StepScores(seq_id="a", rewards=(1.0, 1.0, 1.0), tokens=0),
        StepScores(seq_id="b", rewards=(1.0, 0.0, 0.0), tokens=0),
    ]


def test_results_keep_request_order_and_lengths() -> None:
    problems = generate_problems("test", 20)
    requests = [
        req(tuple(solution_steps(p))[:k], prompt=p.expression, seq_id=str(i))
        for i, p in enumerate(problems)
        for k in range(4)
    ]
    out = VerifierReward().score(requests)
    assert [o.seq_id for o in out] == [r.seq_id for r in requests]
    assert all(o.rewards == (1.0,) * len(r.steps) for o, r in zip(out, requests, strict=True))


def test_floor_and_ceiling_replace_zero_and_one() -> None:
    (out,) = VerifierReward(floor=0.02, ceiling=0.98).score([req(("7+5=12\n\n", "1+1=2\n\n"))])
    assert out.rewards == (0.98, 0.02)


@pytest.mark.parametrize(("floor", "ceiling"), [(0.5, 0.5), (-0.1, 1.0), (0.0, 1.5), (0.9, 0.1)])
def test_invalid_floor_or_ceiling_is_rejected(floor: float, ceiling: float) -> None:
    with pytest.raises(ValueError):
        VerifierReward(floor=floor, ceiling=ceiling)


def test_chat_prompts_use_the_last_user_message() -> None:
    chat = (
        ChatMessage("system", "Solve step by step."),
        ChatMessage("user", "2+2"),
        ChatMessage("assistant", "4"),
        ChatMessage("user", f"  {P}\n"),
    )
    assert problem_from_prompt(chat).expression == P
    (out,) = VerifierReward().score([req(GOOD, prompt=chat)])
    assert out.rewards == (1.0, 1.0, 1.0)


def test_spelling_of_the_expression_does_not_matter() -> None:
    (out,) = VerifierReward().score([req(GOOD, prompt=" ( 7 + 5 ) * 3 - 4 ")])
    assert out.rewards == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "prompt",
    [
        "What is the capital of France?",
        "",
        "7",
        "7/2+1",
        (ChatMessage("system", P),),
        (ChatMessage("user", "Compute (7+5)*3-4, please."),),
    ],
)
def test_a_prompt_that_is_not_arithmetic_is_rejected_naming_the_request(prompt: object) -> None:
    reward = VerifierReward()
    with pytest.raises(NotArithmeticError, match="request 'bad'"):
        reward.score([req(GOOD), req(GOOD, prompt=prompt, seq_id="bad")])
    assert reward.stats() == {"requests": 0, "steps": 0}  # nothing was scored


def test_no_steps_gives_no_rewards() -> None:
    assert VerifierReward().score([req(())]) == [StepScores("s", (), 0)]
    assert VerifierReward().score([]) == []


def test_it_serves_the_async_reward_protocol_in_process() -> None:
    reward = VerifierReward()
    out = asyncio.run(LocalReward(reward).score([req(GOOD)]))
    assert out[0].rewards == (1.0, 1.0, 1.0)
    assert reward.stats() == {"requests": 1, "steps": 3}
