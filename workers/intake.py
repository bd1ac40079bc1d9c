"""What the served models accept, checked when a search is submitted, before it is stored.

A problem too long for the policy, or one the reward cannot score (the verifier checks
arithmetic only), would otherwise be stored, queued and run, holding a worker, before failing.
`ProblemIntake.check` refuses it at submit instead, cheaply: characters and message counts
first (so a megabyte is never tokenized), then the reward's own acceptance, then the problem's
length in tokens of the served policy (its tokenizer and chat template, loaded without the model).
`ProblemIntake.admit` also gives the prompt the search runs on: the served task's canonical form
of the problem where it has one (the shipped arithmetic models), else the client's own text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lodestar.workers.messages import Prompt
from lodestar.workers.prompt_format import PolicyPrompts

SOLUTION_RESERVE = 0.5
"""Share of the policy's context kept for the solution when no token limit is configured."""
MAX_SOLUTION_RESERVE = 4096
"""At most this many tokens are reserved for the solution (long-context models)."""


class ProblemRefused(ValueError):
    """The problem cannot be served here; `field` is its path in the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ProblemLimits:
    """Server limits on one problem (`lodestar serve --max-problem-chars` and friends)."""

    max_problem_chars: int = 16_384
    """Characters of the problem text, or of all chat messages' contents together."""
    max_problem_tokens: int | None = None
    """Tokens of the rendered prompt in the served policy's tokenizer; None: the policy's
    context minus the room kept for the solution (`SOLUTION_RESERVE`)."""
    max_messages: int = 64
    max_role_chars: int = 32

    def __post_init__(self) -> None:
        values = (self.max_problem_chars, self.max_messages, self.max_role_chars)
        if min(values) < 1 or (self.max_problem_tokens is not None and self.max_problem_tokens < 1):
            raise ValueError("problem limits must be >= 1")


def default_token_limit(context_tokens: int) -> int:
    """The policy's context less the room its solution needs."""
    reserve = min(int(context_tokens * SOLUTION_RESERVE), MAX_SOLUTION_RESERVE)
    return max(1, context_tokens - reserve)


class ProblemIntake:
    """Checks one problem against the limits and the served models; `check` returns the
    problem's length in policy tokens and `admit` the prompt to search, or they raise
    `ProblemRefused`."""

    def __init__(
        self,
        limits: ProblemLimits | None = None,
        prompts: PolicyPrompts | None = None,
        context_tokens: int | None = None,
        accepts: Callable[[Prompt], str | None] | None = None,
        canonical: Callable[[Prompt], Prompt] | None = None,
    ) -> None:
        self.limits = limits = limits or ProblemLimits()
        self.prompts = prompts
        self.accepts = accepts
        """The served task's check: None when it can take the prompt, else why not
        (client-safe)."""
        self.canonical = canonical
        """An accepted prompt as the served models read it (None: the prompt as sent)."""
        self.max_tokens = limits.max_problem_tokens
        if self.max_tokens is None and context_tokens is not None:
            self.max_tokens = default_token_limit(context_tokens)

    def check(self, prompt: Prompt) -> int | None:
        return self._check(prompt)[1]

    def admit(self, prompt: Prompt) -> Prompt:
        """The prompt a search on `prompt` runs on, once `check` accepts it."""
        return self._check(prompt)[0]

    def _check(self, prompt: Prompt) -> tuple[Prompt, int | None]:
        """(the prompt the search runs on, its length in policy tokens or None)."""
        lim = self.limits
        if isinstance(prompt, str):
            chars, field = len(prompt), "problem.text"
        else:
            field = "problem.chat.messages"
            if len(prompt) > lim.max_messages:
                raise ProblemRefused(field, f"at most {lim.max_messages} messages on this server")
            for i, m in enumerate(prompt):
                if not m.role or len(m.role) > lim.max_role_chars:
                    raise ProblemRefused(f"{field}[{i}].role", f"1 to {lim.max_role_chars} chars")
            chars = sum(len(m.content) for m in prompt)
        if chars > lim.max_problem_chars:
            raise ProblemRefused(
                field, f"{chars} characters, at most {lim.max_problem_chars} on this server"
            )
        if self.accepts is not None and (why := self.accepts(prompt)) is not None:
            raise ProblemRefused("problem", why)
        if self.canonical is not None:
            prompt = self.canonical(prompt)
        if self.prompts is None:
            return prompt, None
        tokens = self.prompts.count(prompt)
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise ProblemRefused(
                field, f"{tokens} tokens for the served policy, at most {self.max_tokens}"
            )
        return prompt, tokens


def context_of(model_dir: Path) -> int | None:
    """`max_position_embeddings` from a model directory's config, without loading the model."""
    config = model_dir / "config.json"
    if not config.is_file():
        return None
    doc = json.loads(config.read_text())
    value = doc.get(
        "max_position_embeddings", doc.get("text_config", {}).get("max_position_embeddings")
    )
    return int(value) if isinstance(value, int) else None
