"""The two interfaces a search algorithm sees. Scripted fakes in tests, Ray actors in production."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lodestar.workers.messages import ExtendRequest, ScoreRequest, StepOutput, StepScores


class Policy(Protocol):
    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        """The next step of each request, in request order."""
        ...


class Reward(Protocol):
    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        """One reward per step of each request, in request order."""
        ...
