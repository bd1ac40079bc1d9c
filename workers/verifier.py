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

from lodestar.tasks.arithmetic import (
    SHIPPED_DOMAIN,
    OutsideDomain,
    Problem,
    evaluate_steps,
    read_problem,
    split_steps,
)
from lodestar.workers.messages import (
    ChatMessage,
    ErrorKind,
    Prompt,
    RequestFailed,
    ScoreRequest,
    StepScores,
)

NOT_ARITHMETIC = (
    "problem: the verifier reward scores arithmetic only: integers, + - * and parentheses, "
    "e.g. (12+5)*3"
)
"""What a client is told when its problem is not one the verifier can check."""


class NotArithmeticError(ValueError):
    """A request's prompt is not an arithmetic problem; names the request and the prompt.
    `reason` says why without quoting the prompt (client-safe)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def problem_from_prompt(prompt: Prompt, *, bounded: bool = False) -> Problem:
    """The problem in a prompt: the expression in the text, or in the last user message's
    content, as a user types it (`tasks.arithmetic.read_problem`: `what is 2 + 3?` is 2+3).
    `bounded`: only the shipped policy's domain; the verifier itself checks any size.

    Raises `NotArithmeticError` when there is no user message or it is not an expression.
    """
    if isinstance(prompt, str):
        text = prompt
    else:
        users = [m.content for m in prompt if m.role == "user"]
        if not users:
            raise NotArithmeticError(f"no user message in prompt {prompt!r}", "no user message")
        text = users[-1]
    try:
        return read_problem(text, bounded=bounded)
    except OutsideDomain as e:
        raise NotArithmeticError(str(e), e.reason) from e


def accepts_prompt(prompt: Prompt, *, bounded: bool = False) -> str | None:
    """None when the prompt is arithmetic this deployment can take, else the client-safe reason
    and what it takes: the check `lodestar serve` runs at submit (`workers/intake.py`).
    `bounded` when the shipped policy serves (`SHIPPED_DOMAIN`), else what the verifier scores."""
    try:
        problem_from_prompt(prompt, bounded=bounded)
    except NotArithmeticError as e:
        takes = SHIPPED_DOMAIN if bounded else NOT_ARITHMETIC.removeprefix("problem: ")
        return f"{e.reason}; {takes}"
    return None


def canonical_prompt(prompt: Prompt) -> Prompt:
    """An accepted prompt with its problem as the shipped policy was trained to read it: the
    canonical expression (`2 + 3 * 4` and `what is 2+3*4?` are both `2+3*4`), in place of the
    text or of the last user message's content; the search runs on this."""
    expression = problem_from_prompt(prompt).expression
    if isinstance(prompt, str):
        return expression
    last = max(i for i, m in enumerate(prompt) if m.role == "user")
    return (*prompt[:last], ChatMessage("user", expression), *prompt[last + 1 :])


def judge(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """Whether each step is right. A step holding several of the task's steps (the whole partial
    answer, as `model` aggregation sends it) is right when every step in it is."""
    parts = [split_steps(step) or [step] for step in steps]
    ok = iter(evaluate_steps(problem, [p for part in parts for p in part]))
    return [all([next(ok) for _ in part]) for part in parts]


class VerifierReward:
    """Reward worker scoring arithmetic steps exactly; no model, so `tokens` is always 0."""

    concurrent = False

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
