"""Step-level beam search and diverse verifier tree search (DVTS), guided by the PRM.

Beam search (as in search-and-learn), N beams of width M:

    round 0: N first steps sampled from the prompt; score them                 (one expand)
    each round: finished candidates move to the completed pool; keep the best N/M live ones by
        score (ties: lowest index; with `filter_duplicates` only the first beam of each text
        competes) and sample M next steps from each; score them                 (one expand)
    final round (`final_round`): the expand whose steps reach max_steps samples to the end
    stop when no live candidate is left (or `stop_after` solutions are completed)
    answer: the completed solution with the highest score (or weighted vote); on a budget stop
        a live beam only when no completed solution has an answer

Completed solutions leave the beam and do not take one of its N/M slots, so every round spends
the full N samples on live beams; with fewer than N/M live, the kept ones share the N samples
(search-and-learn's rule). max_steps bounds the rounds.

Final round (search-and-learn, `sal/search/beam_search.py` and `dvts.py`: the last iteration
samples without the step stop, to `max_tokens`): with `final_round`, the expansion whose steps
would be the max_steps-th runs each one on past the delimiter to EOS (or the cap: `MAX_STEP_CALLS`
calls of max_step_tokens), so a beam still unfinished there is completed, answered when the
policy answers, instead of cut; its text is split back into steps for the PRM. Spend and budget
caps are as for any step. Off, a beam reaching max_steps ends with stop "max_steps".

DVTS (Beeching et al., search-and-learn): N/M independent subtrees, each a greedy search over M
sampled steps per round, so the N samples are spread over diverse lines instead of collapsing on
one prefix:

    each round: every live subtree samples M next steps from its current state; score them
        (one expand for all subtrees; early rejection ranks within a subtree)
        each subtree keeps its best child; it ends when that child is finished
    answer: the leaf with the highest score (or weighted vote), finished answered leaves first

Candidate weights are shares of the total score, so `weighted_vote` sums scores per answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from lodestar.orchestrator.algorithms.base import ScoredParams, Selection, StepSearch
from lodestar.orchestrator.algorithms.expansion import candidate, choose
from lodestar.orchestrator.algorithms.state import (
    Budget,
    SearchCommon,
    SearchResult,
    Trajectory,
)
from lodestar.workers.contract import Policy, Reward
from lodestar.workers.messages import Prompt


class _TreeParams(ScoredParams):
    n: int = Field(8, ge=1, le=4096)
    """Samples per round (the budget)."""
    m: int = Field(4, ge=1, le=4096)
    """Width: next steps sampled from each kept beam (subtree) per round; n must divide by m."""
    selection: Selection = "argmax"
    """argmax: highest score; weighted_vote: answer with the largest summed score."""
    final_round: bool = True
    """The step that reaches max_steps runs to EOS instead of the delimiter (search-and-learn's
    last iteration; on by default, as there)."""

    @model_validator(mode="after")
    def _n_divisible_by_m(self) -> _TreeParams:
        if self.n % self.m:
            error = PydanticCustomError(
                "divisible",
                "n ({n}) must be a multiple of m ({m})",
                {"n": self.n, "m": self.m},
            )
            details = InitErrorDetails(type=error, loc=("n",), input=self.n)
            raise ValidationError.from_exception_data(type(self).__name__, [details])
        return self


class BeamSearchParams(_TreeParams):
    stop_after: int | None = Field(None, ge=1, le=4096)
    """Stop once this many solutions are completed; None: when no live candidate is left."""
    filter_duplicates: bool = False
    """Before keeping the best N/M, drop live beams whose text an earlier one has (the first is
    kept): search-and-learn's `filter_duplicates`, off by default as there."""


class DiverseVerifierTreeSearchParams(_TreeParams):
    pass


@dataclass(slots=True)
class BeamRound:
    kept: list[str]
    """seq_ids of the live candidates kept this round, best first (each expanded m ways)."""
    scores: list[float]


@dataclass(slots=True)
class BeamSearchState:
    common: SearchCommon
    params: BeamSearchParams
    live: list[Trajectory] = field(default_factory=list)
    """Unfinished candidates of the last expand, in expand order: next round's pool."""
    completed: list[Trajectory] = field(default_factory=list)
    """Finished solutions in the order they finished (never rejected ones)."""
    rounds: list[BeamRound] = field(default_factory=list)
    started: bool = False


@dataclass(slots=True)
class DvtsRound:
    kept: list[str | None]
    """Per subtree, the seq_id of the child it kept (None: the subtree had already ended)."""


@dataclass(slots=True)
class DiverseVerifierTreeSearchState:
    common: SearchCommon
    params: DiverseVerifierTreeSearchParams
    subtrees: list[Trajectory] = field(default_factory=list)
    """Current state (the leaf once finished) of each of the n/m subtrees; the prompt at first."""
    rounds: list[DvtsRound] = field(default_factory=list)


def best_index(trajectories: Sequence[Trajectory]) -> int:
    """Highest score, ties to the lowest index, a rejected candidate last."""
    return max(
        range(len(trajectories)),
        key=lambda i: (not trajectories[i].pruned, trajectories[i].score or 0.0, -i),
    )


def top_k(trajectories: Sequence[Trajectory], k: int) -> list[int]:
    """Indices of the k highest scores, best first, ties to the lowest index."""
    order = sorted(range(len(trajectories)), key=lambda i: (-(trajectories[i].score or 0.0), i))
    return order[:k]


def distinct(trajectories: Sequence[Trajectory]) -> list[Trajectory]:
    """The first trajectory of each text, in order (search-and-learn's `filter_duplicates`)."""
    first: dict[str, Trajectory] = {}
    for t in trajectories:
        first.setdefault(t.text, t)
    return list(first.values())


def last_round(params: _TreeParams, parents: Sequence[Trajectory]) -> bool:
    """Whether this expansion is the final round: its steps would reach max_steps (a round's
    parents share one depth)."""
    return params.final_round and any(len(t.steps) + 1 >= params.max_steps for t in parents)


def _result(
    name: str, common: SearchCommon, pool: Sequence[Trajectory], selection: str
) -> SearchResult:
    total = sum(t.score or 0.0 for t in pool)
    weights = [(t.score or 0.0) / total if total > 0 else 1.0 / len(pool) for t in pool]
    candidates = tuple(candidate(t, w) for t, w in zip(pool, weights, strict=True))
    chosen = choose(candidates, selection)
    return SearchResult.of(name, common, candidates, chosen)


def _stop_reason(trajectories: Sequence[Trajectory]) -> str:
    return "budget" if any(t.stop == "budget" for t in trajectories) else "finished"


class BeamSearch(StepSearch[BeamSearchParams, BeamSearchState]):
    """Beam search: one advance is round 0 or one keep-top-N/M-and-expand-M-ways round."""

    name = "beam"
    Params = BeamSearchParams
    State = BeamSearchState

    def init(
        self, problem: Prompt, params: BeamSearchParams, seed: int, budget: Budget | None = None
    ) -> BeamSearchState:
        return self.State(common=self.new_common(problem, seed, budget), params=params)

    async def _step(self, state: BeamSearchState, policy: Policy, reward: Reward) -> None:
        p = state.params
        if not state.started:
            parents = [state.common.root()] * p.n
            record = None
        else:
            pool = distinct(state.live) if p.filter_duplicates else state.live
            kept = [pool[i] for i in top_k(pool, p.n // p.m)]
            parents = [kept[i * len(kept) // p.n] for i in range(p.n)]  # copies together: a fork
            record = BeamRound([b.seq_id for b in kept], [b.score or 0.0 for b in kept])
        children = await self._expand(state, policy, reward, parents, to_end=last_round(p, parents))
        state.started = True
        if record is not None:
            state.rounds.append(record)
        state.completed += [t for t in children if t.finished and not t.pruned]
        state.live = [t for t in children if not t.finished]
        enough = p.stop_after is not None and len(state.completed) >= p.stop_after
        if not state.live or enough:
            state.common.finish(_stop_reason(state.completed))

    def result(self, state: BeamSearchState) -> SearchResult:
        """Completed solutions; the live beams too when the search stopped before finishing
        (chosen only when no completed solution has an answer: `choose`)."""
        pool = list(state.completed)
        if state.common.stop_reason == "budget" or not pool:
            pool += state.live
        return _result(self.name, state.common, pool, state.params.selection)


class DiverseVerifierTreeSearch(
    StepSearch[DiverseVerifierTreeSearchParams, DiverseVerifierTreeSearchState]
):
    """DVTS: one advance expands every live subtree m ways and keeps each one's best child."""

    name = "dvts"
    Params = DiverseVerifierTreeSearchParams
    State = DiverseVerifierTreeSearchState

    def init(
        self,
        problem: Prompt,
        params: DiverseVerifierTreeSearchParams,
        seed: int,
        budget: Budget | None = None,
    ) -> DiverseVerifierTreeSearchState:
        common = self.new_common(problem, seed, budget)
        root = common.root()
        subtrees = [root] * (params.n // params.m)  # one prompt, forked per subtree
        return self.State(common=common, params=params, subtrees=subtrees)

    async def _step(
        self, state: DiverseVerifierTreeSearchState, policy: Policy, reward: Reward
    ) -> None:
        p = state.params
        live = [i for i, s in enumerate(state.subtrees) if not s.finished]
        parents = [state.subtrees[i] for i in live for _ in range(p.m)]
        groups = [i for i in live for _ in range(p.m)]
        children = await self._expand(
            state, policy, reward, parents, groups, last_round(p, parents)
        )
        kept: list[str | None] = [None] * len(state.subtrees)
        for j, i in enumerate(live):
            siblings = children[j * p.m : (j + 1) * p.m]
            best = siblings[best_index(siblings)]
            state.subtrees[i] = best
            kept[i] = best.seq_id
        state.rounds.append(DvtsRound(kept))
        if all(s.finished for s in state.subtrees):
            state.common.finish(_stop_reason(state.subtrees))

    def result(self, state: DiverseVerifierTreeSearchState) -> SearchResult:
        """The subtrees' leaves (their current states if stopped early; never the bare prompt)."""
        pool = [s for s in state.subtrees if s.steps]
        return _result(self.name, state.common, pool, state.params.selection)
