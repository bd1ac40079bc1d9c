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

from lodestar.tasks.arithmetic import ArithmeticProblemError, Problem, evaluate_steps
from lodestar.tasks.arithmetic import problem_from_text as _parse
from lodestar.workers.messages import Prompt, ScoreRequest, StepScores


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


class VerifierReward:
    """Reward worker scoring arithmetic steps exactly; no model, so `tokens` is always 0."""

    def __init__(self, floor: float = 0.0, ceiling: float = 1.0) -> None:
        if not 0.0 <= floor < ceiling <= 1.0:
            raise ValueError(f"need 0 <= floor < ceiling <= 1, got {floor}, {ceiling}")
        self.floor = floor
        self.ceiling = ceiling
        self.requests = self.steps = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        """One reward per step of each request, in order.

        Raises `NotArithmeticError` (naming the request) before scoring anything if any prompt is
        not an arithmetic problem.
        """
        problems = []
        for r in requests:
            try:
                problems.append(problem_from_prompt(r.prompt))
            except NotArithmeticError as e:
                raise NotArithmeticError(f"request {r.seq_id!r}: {e}") from e
        out = []
        for r, problem in zip(requests, problems, strict=True):
            ok = evaluate_steps(problem, r.steps)
            rewards = tuple(self.ceiling if good else self.floor for good in ok)
            out.append(StepScores(seq_id=r.seq_id, rewards=rewards, tokens=0))
        self.requests += len(requests)
        self.steps += sum(len(r.steps) for r in requests)
        return out

    def release_prefix(self, prefix: str) -> int:
        """Nothing is cached: the same interface as the model workers, a no-op."""
        return 0

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "steps": self.steps}
