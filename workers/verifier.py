"""An exact reward for the arithmetic task: the step checker behind the PRM's `score` contract.

It stands in for a learned PRM wherever the problems are arithmetic, so search can be measured
against a perfect reward. Each step gets `ceiling` when `tasks.arithmetic.evaluate_steps` accepts
it and `floor` otherwise. The defaults are 1.0 and 0.0; particle filtering takes the logit of a
score (clipped at 1e-7), so a wrong step then weighs about e^-32 of a right one and is never
resampled. A softer pair such as 0.02 / 0.98 (logits about -3.9 / +3.9) keeps weights finite
and lets a wrong particle survive now and then, as a learned PRM's would.
"""

from __future__ import annotations

from collections.abc import Sequence

from lodestar.tasks.arithmetic import ArithmeticProblemError, Problem, evaluate_steps, split_steps
from lodestar.tasks.arithmetic import problem_from_text as _parse
from lodestar.workers.messages import ErrorKind, Prompt, RequestFailed, ScoreRequest, StepScores

NOT_ARITHMETIC = (
    "problem: the verifier reward scores arithmetic only: integers, + - * and parentheses, "
    "e.g. (12+5)*3"
)
"""What a client is told when its problem is not one the verifier can check."""


class NotArithmeticError(ValueError):
    """A request's prompt is not an arithmetic problem; names the request and the prompt."""


def problem_from_prompt(prompt: Prompt) -> Problem:
    """The problem in a prompt: the expression itself, or the last user message's content.

    Raises `NotArithmeticError` when there is no user message or it is not an expression.
    """
    if isinstance(prompt, str):
        text = prompt
    else:
        users = [m.content for m in prompt if m.role == "user"]
        if not users:
            raise NotArithmeticError(f"no user message in prompt {prompt!r}")
        text = users[-1]
    try:
        return _parse(text)
    except ArithmeticProblemError as e:
        raise NotArithmeticError(str(e)) from e


def accepts_prompt(prompt: Prompt) -> str | None:
    """None when the verifier can score this prompt, else the client-safe reason: the check
    `lodestar serve` runs at submit (`workers/intake.py`)."""
    try:
        problem_from_prompt(prompt)
    except NotArithmeticError:
        return NOT_ARITHMETIC.removeprefix("problem: ")
    return None


def judge(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """Whether each step is right. A step holding several of the task's steps (the whole partial
    answer, as `model` aggregation sends it) is right when every step in it is."""
    parts = [split_steps(step) or [step] for step in steps]
    ok = iter(evaluate_steps(problem, [p for part in parts for p in part]))
    return [all([next(ok) for _ in part]) for part in parts]


class VerifierReward:
    """Reward worker scoring arithmetic steps exactly; no model, so `tokens` is always 0."""

    def __init__(self, floor: float = 0.0, ceiling: float = 1.0) -> None:
        if not 0.0 <= floor < ceiling <= 1.0:
            raise ValueError(f"need 0 <= floor < ceiling <= 1, got {floor}, {ceiling}")
        self.floor = floor
        self.ceiling = ceiling
        self.requests = self.steps = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores | RequestFailed]:
        """One reward per step of each request, in order; a request whose prompt is not an
        arithmetic problem gets a `RequestFailed` of its own and the others are scored."""
        out: list[StepScores | RequestFailed] = []
        for r in requests:
            try:
                problem = problem_from_prompt(r.prompt)
            except NotArithmeticError:
                out.append(RequestFailed(r.seq_id, ErrorKind.INVALID_INPUT, NOT_ARITHMETIC))
                continue
            rewards = tuple(
                self.ceiling if good else self.floor for good in judge(problem, r.steps)
            )
            out.append(StepScores(seq_id=r.seq_id, rewards=rewards, tokens=0))
            self.requests += 1
            self.steps += len(r.steps)
        return out

    def release_prefix(self, prefix: str) -> int:
        """Nothing is cached: the same interface as the model workers, a no-op."""
        return 0

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "steps": self.steps}
