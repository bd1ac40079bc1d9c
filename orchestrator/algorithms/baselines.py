"""The sampling baselines: greedy, best-of-N, weighted best-of-N and self-consistency.

All four draw independent complete samples with one loop, a step at a time so the orchestrator
batches them with other searches:

    every sample draws its first step from the prompt                          (one grow)
    while any sample is unfinished: every unfinished sample draws its next step (one grow)
    scored baselines: the PRM scores each distinct sample once, aggregated      (one score)
    answer: greedy -> its only sample; best-of-N -> argmax score; weighted best-of-N -> the
            answer with the largest summed score; self-consistency -> the most frequent answer

Answers are compared by equivalence (`answers.equivalent`: `\\frac12` and `0.5` are one answer).
Identical samples (the same steps) are scored once and share the score, and when every sample
has a final answer and they are all equivalent there is nothing to choose: the PRM is not called
and the first sample wins. `prm_passes` counts what was scored.

When the token budget cannot pay for another step, the unfinished samples end there (stop
"budget") and are still scored, so the answer is the best of what was generated. When the PRM
budget cannot pay for every distinct sample, the first ones (by index) that it can pay for are
scored, with their duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pydantic import Field, field_validator

from lodestar.orchestrator.algorithms.answers import (
    answer_groups,
    extract_boxed,
    final_answer,
    winning_group,
)
from lodestar.orchestrator.algorithms.base import ScoredParams, SearchAlgorithm, SearchParams
from lodestar.orchestrator.algorithms.expansion import candidate, grow, score, vote_answer
from lodestar.orchestrator.algorithms.state import (
    Budget,
    BudgetExhausted,
    Candidate,
    SearchCommon,
    SearchResult,
    Trajectory,
)
from lodestar.workers.contract import Policy, Reward
from lodestar.workers.messages import Prompt, SamplingParams


class GreedyParams(SearchParams):
    """One sample at temperature 0: `temperature` is pinned (any other value is an error)."""

    temperature: float = 0.0

    @field_validator("temperature")
    @classmethod
    def _pinned(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("greedy decodes at temperature 0")
        return value

    def sampling(self) -> SamplingParams:
        return replace(super().sampling(), temperature=0.0)


class BestOfNParams(ScoredParams):
    n: int = Field(8, ge=1, le=4096)
    """Independent complete samples (the budget)."""


class WeightedBestOfNParams(BestOfNParams):
    pass


class SelfConsistencyParams(SearchParams):
    n: int = Field(8, ge=1, le=4096)
    """Independent complete samples (the budget)."""


@dataclass(slots=True)
class GreedyState:
    common: SearchCommon
    params: GreedyParams
    samples: list[Trajectory] = field(default_factory=list)
    """The samples in draw order (index = sample index, the tie-break order)."""
    started: bool = False


@dataclass(slots=True)
class BestOfNState(GreedyState):
    params: BestOfNParams


@dataclass(slots=True)
class WeightedBestOfNState(GreedyState):
    params: WeightedBestOfNParams


@dataclass(slots=True)
class SelfConsistencyState(GreedyState):
    params: SelfConsistencyParams


class _IndependentSamples(SearchAlgorithm[Any, Any]):
    """The shared sampling loop; subclasses say how many samples, whether to score, and choose."""

    scored: ClassVar[bool] = False

    def init(
        self, problem: Prompt, params: Any, seed: int, budget: Budget | None = None
    ) -> GreedyState:
        return self.State(common=self.new_common(problem, seed, budget), params=params)

    def _count(self, params: Any) -> int:
        return int(params.n)

    async def _step(self, state: GreedyState, policy: Policy, reward: Reward) -> None:
        common, params = state.common, state.params
        parents = (
            [common.root()] * self._count(params)
            if not state.started
            else [t for t in state.samples if not t.finished]
        )
        cut = False
        try:
            children = await grow(common, policy, parents, params.sampling(), params.max_steps)
        except BudgetExhausted:  # nothing was spent; what is unfinished ends here
            cut = True
            for t in state.samples:
                if not t.finished:
                    t.finished, t.stop = True, "budget"
        else:
            if not state.started:
                state.samples = children
            else:
                grown = iter(children)
                state.samples = [t if t.finished else next(grown) for t in state.samples]
        state.started = True
        if all(t.finished for t in state.samples):
            cut = cut or any(t.stop == "budget" for t in state.samples)
            if self.scored:
                cut = not await self._score(state, reward) or cut
            common.finish("budget" if cut else "finished")

    async def _score(self, state: GreedyState, reward: Reward) -> bool:
        """One PRM call for each distinct sample the budget pays for (none when all agree on the
        answer); duplicates share their first copy's score. False if some stayed unscored."""
        common, samples = state.common, state.samples
        if _all_agree(samples):
            return True
        first: dict[tuple[str, ...], int] = {}  # lookups only: order comes from the samples
        copy_of = [first.setdefault(tuple(t.steps), i) for i, t in enumerate(samples)]
        distinct = [i for i, c in enumerate(copy_of) if c == i]
        cap = common.budget.max_prm_passes
        affordable = len(distinct) if cap is None else max(0, cap - common.spend.prm_passes)
        paid = distinct[:affordable]
        await score(common, reward, [samples[i] for i in paid], state.params.aggregation)
        for i, c in enumerate(copy_of):
            if c != i:
                samples[i].rewards, samples[i].score = list(samples[c].rewards), samples[c].score
        return affordable >= len(distinct)

    def _weights(self, samples: Sequence[Trajectory]) -> list[float]:
        return [1.0 / len(samples)] * len(samples)

    def _choose(self, samples: Sequence[Trajectory], candidates: Sequence[Candidate]) -> int:
        """Highest score, ties to the lowest index (an unscored sample ranks last)."""
        return max(range(len(candidates)), key=lambda i: (_score(candidates[i]), -i))

    def result(self, state: GreedyState) -> SearchResult:
        samples = state.samples
        weights = self._weights(samples) if samples else []
        candidates = tuple(candidate(t, w) for t, w in zip(samples, weights, strict=True))
        chosen = self._choose(samples, candidates) if candidates else None
        return SearchResult.of(self.name, state.common, candidates, chosen)


def _score(c: Candidate) -> float:
    return float("-inf") if c.score is None else c.score


def _all_agree(samples: Sequence[Trajectory]) -> bool:
    """Every sample has a final answer and all of them are equivalent: nothing to choose."""
    groups = answer_groups([extract_boxed(t.text) for t in samples])
    return bool(groups) and all(g == 0 for g in groups)


class Greedy(_IndependentSamples):
    """One sample at temperature 0, no reward: the baseline every search must beat."""

    name = "greedy"
    Params = GreedyParams
    State = GreedyState

    def _count(self, params: Any) -> int:
        return 1


class BestOfN(_IndependentSamples):
    """N complete samples, each distinct one scored once by the PRM (aggregated); the argmax
    wins. When all N agree on the answer the PRM is skipped and the first sample wins."""

    name = "best_of_n"
    Params = BestOfNParams
    State = BestOfNState
    scored = True


class WeightedBestOfN(_IndependentSamples):
    """N scored samples vote for their final answer with their score; the largest sum wins.

    Equivalent answers vote together. The chosen candidate is the highest-scoring member of the
    winning answer (ties: lowest index); samples without a final answer do not vote. Weight = the
    sample's share of the total score, so an answer's summed weight is its share of the vote
    (1/N each when the PRM was skipped because all N agree).
    """

    name = "weighted_best_of_n"
    Params = WeightedBestOfNParams
    State = WeightedBestOfNState
    scored = True

    def _weights(self, samples: Sequence[Trajectory]) -> list[float]:
        if all(t.score is None for t in samples):
            return super()._weights(samples)
        scores = [t.score or 0.0 for t in samples]
        total = sum(scores)
        return [s / total if total > 0 else 0.0 for s in scores]

    def _choose(self, samples: Sequence[Trajectory], candidates: Sequence[Candidate]) -> int:
        answers = [vote_answer(c) for c in candidates]
        group = winning_group(answers, [t.score or 0.0 for t in samples])  # raw sums: exact ties
        if not group:
            return super()._choose(samples, candidates)
        return max(group, key=lambda i: (_score(candidates[i]), -i))


class SelfConsistency(_IndependentSamples):
    """N samples, no reward: the most frequent final answer, ties to the first seen.

    Equivalent answers (`answers.equivalent`) count as one. The chosen candidate is the first
    sample with that answer. Weight = 1 / (samples with an answer) for each of them, 0 for the
    rest, so an answer's summed weight is its vote share.
    """

    name = "self_consistency"
    Params = SelfConsistencyParams
    State = SelfConsistencyState

    def _weights(self, samples: Sequence[Trajectory]) -> list[float]:
        answers = [final_answer(t.text) for t in samples]
        voters = sum(a is not None for a in answers)
        if voters == 0:
            return super()._weights(samples)
        return [0.0 if a is None else 1.0 / voters for a in answers]

    def _choose(self, samples: Sequence[Trajectory], candidates: Sequence[Candidate]) -> int:
        group = winning_group([vote_answer(c) for c in candidates])
        return group[0] if group else 0
