"""The verifier reward: exact step rewards for arithmetic under the PRM's `score` contract."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.tasks.arithmetic import generate_problems, solution_steps
from lodestar.workers.messages import (
    ChatMessage,
    ErrorKind,
    RequestFailed,
    ScoreRequest,
    StepScores,
)
from lodestar.workers.verifier import (
    NOT_ARITHMETIC,
    NotArithmeticError,
    VerifierReward,
    problem_from_prompt,
)

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
def test_a_prompt_that_is_not_arithmetic_fails_only_its_own_request(prompt: object) -> None:
    reward = VerifierReward()
    good, bad, also_good = reward.score(
        [req(GOOD), req(GOOD, prompt=prompt, seq_id="bad"), req(GOOD, seq_id="t")]
    )
    assert good == StepScores("s", (1.0, 1.0, 1.0), 0)
    assert also_good == StepScores("t", (1.0, 1.0, 1.0), 0)
    assert bad == RequestFailed("bad", ErrorKind.INVALID_INPUT, NOT_ARITHMETIC)
    assert "France" not in bad.message and P not in bad.message  # never echoes the input
    assert reward.stats() == {"requests": 2, "steps": 6}  # the bad one was not scored


@pytest.mark.parametrize("prompt", ["hello", (ChatMessage("system", P),)])
def test_problem_from_prompt_says_why_a_prompt_is_not_arithmetic(prompt: object) -> None:
    with pytest.raises(NotArithmeticError):
        problem_from_prompt(prompt)


def test_no_steps_gives_no_rewards() -> None:
    assert VerifierReward().score([req(())]) == [StepScores("s", (), 0)]
    assert VerifierReward().score([]) == []


def test_it_serves_the_async_reward_protocol_in_process() -> None:
    reward = VerifierReward()
    unused = SimpleNamespace(concurrent=False)  # a policy this test never calls
    scope = LocalWorkers(policy=unused, reward=reward).scope("s")  # type: ignore[arg-type]
    out = asyncio.run(scope.score([req(GOOD)]))
    assert out[0].rewards == (1.0, 1.0, 1.0)
    assert reward.stats() == {"requests": 1, "steps": 3}


def test_a_whole_answer_sent_as_one_step_is_right_when_every_step_in_it_is() -> None:
    """`model` aggregation (PF's default) scores the partial answer joined into one step."""
    reward = VerifierReward()
    wrong = ("7+5=12, so 12*3-4\n\n", "12*3=35, so 35-4\n\n", "35-4=31 \\boxed{31}")
    (right_whole, wrong_whole, prefix) = reward.score(
        [req(("".join(GOOD),)), req(("".join(wrong),), seq_id="w"), req(("".join(GOOD[:2]),))]
    )
    assert right_whole.rewards == (1.0,) and wrong_whole.rewards == (0.0,)
    assert prefix.rewards == (1.0,)
    assert reward.score([req(GOOD)])[0].rewards == (1.0, 1.0, 1.0)  # step by step as before
