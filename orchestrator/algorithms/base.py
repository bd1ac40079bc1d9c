"""The one interface every algorithm implements, and the parameters they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from lodestar.orchestrator.algorithms.codec import decode_state, encode_state
from lodestar.orchestrator.algorithms.expansion import expand
from lodestar.orchestrator.algorithms.state import (
    Budget,
    BudgetExhausted,
    EarlyRejection,
    SearchCommon,
    SearchResult,
    Trajectory,
)
from lodestar.workers.contract import Policy, Reward
from lodestar.workers.messages import Prompt, SamplingParams

Aggregation = Literal["last", "min", "prod", "model"]
Selection = Literal["argmax", "weighted_vote"]
ParticleSelection = Literal["argmax", "weighted_vote", "sample"]
"""PF and PG also take `sample`: one candidate drawn from the normalised final weights."""


MAX_DELIMITER_CHARS = 32
"""A step delimiter is a few characters ("\n\n", "Step"); a long one is a client error."""


class SearchParams(BaseModel):
    """Parameters every algorithm takes. Validated once at the edge; errors name the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_steps: int = Field(40, ge=1, le=1024)
    max_step_tokens: int = Field(256, ge=1, le=32768)
    step_delimiter: str = Field("\n\n", min_length=1, max_length=MAX_DELIMITER_CHARS)

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_step_tokens=self.max_step_tokens,
            step_delimiter=self.step_delimiter,
        )


class ScoredParams(SearchParams):
    """Parameters of algorithms that use the reward model."""

    aggregation: Aggregation = "last"
    """How step rewards become one score: newest, min, product, or the PRM on the whole answer."""


P = TypeVar("P", bound=SearchParams)
S = TypeVar("S")


class SearchAlgorithm(ABC, Generic[P, S]):
    """init -> advance ... advance -> result, with the whole state plain data between steps.

    Algorithm objects hold no state of their own: everything a search needs, its parameters
    included, lives in the state, so a checkpoint alone resumes it.
    """

    name: ClassVar[str]
    Params: ClassVar[type[SearchParams]]
    State: ClassVar[type]

    @abstractmethod
    def init(self, problem: Prompt, params: P, seed: int, budget: Budget | None = None) -> S: ...

    @abstractmethod
    async def _step(self, state: S, policy: Policy, reward: Reward) -> None:
        """One algorithm step, mutating `state`; calls `state.common.finish(...)` when done."""

    @abstractmethod
    def result(self, state: S) -> SearchResult: ...

    async def advance(self, state: S, policy: Policy, reward: Reward) -> S:
        """One step. Mutates and returns `state`; after an exception reload it from a checkpoint."""
        common = self.common(state)
        if common.done:
            return state
        try:
            await self._step(state, policy, reward)
        except BudgetExhausted:
            common.finish("budget")
        common.spend.steps += 1
        return state

    def is_done(self, state: S) -> bool:
        return self.common(state).done

    @staticmethod
    def common(state: Any) -> SearchCommon:
        return state.common

    def dumps(self, state: S) -> bytes:
        return encode_state(self.name, state)

    def loads(self, data: bytes) -> S:
        return decode_state(data, self.State)

    @staticmethod
    def new_common(problem: Prompt, seed: int, budget: Budget | None) -> SearchCommon:
        if seed < 0:
            raise ValueError("seed must be >= 0")
        return SearchCommon(problem=problem, seed=seed, budget=budget or Budget())


class StepSearch(SearchAlgorithm[P, S]):
    """A search that grows every step through `_expand`, with `early_rejection` (None: off); the
    `early_rejection` wrapper builds it from its own params, so its checkpoint resumes alone."""

    def __init__(self, early_rejection: EarlyRejection | None = None) -> None:
        self.early_rejection = early_rejection

    async def _expand(
        self,
        state: Any,
        policy: Policy,
        reward: Reward,
        parents: Sequence[Trajectory],
        groups: Sequence[int] | None = None,
        to_end: bool = False,
    ) -> list[Trajectory]:
        """`expansion.expand` with the state's sampling, step cap and aggregation."""
        p = state.params
        how = (p.sampling(), p.max_steps, p.aggregation, groups, to_end, self.early_rejection)
        return await expand(state.common, policy, reward, parents, *how)


async def run_search(
    algorithm: SearchAlgorithm[Any, Any], state: Any, policy: Policy, reward: Reward
) -> SearchResult:
    """Advance until done and return the result: the in-process loop, no checkpoints."""
    while not algorithm.is_done(state):
        state = await algorithm.advance(state, policy, reward)
    return algorithm.result(state)
