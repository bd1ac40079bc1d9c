"""The plain data every search state is made of: trajectories, spend, budget, seeded randomness.

Everything here is a dataclass of primitives so a state serialises to JSON bytes (see `codec`) and
a search can stop after any step and resume elsewhere bit-for-bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lodestar.workers.messages import Prompt

_REQUEST_SEED_DOMAIN = 0x5EED
_DRAW_DOMAIN = 0xD4A3
_SELECT_DOMAIN = 0x5E1C


class BudgetExhausted(Exception):
    """Raised *before* any spend when the next unit of work would exceed a budget cap."""

    def __init__(self, resource: str) -> None:
        super().__init__(f"budget exhausted: {resource}")
        self.resource = resource


class Budget(BaseModel):
    """Caps on what one search may spend; None means uncapped. Caps are never exceeded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_generated_tokens: int | None = Field(None, ge=1)
    max_prm_passes: int | None = Field(None, ge=1)


@dataclass(slots=True)
class Spend:
    """What a search has spent: the quantities the papers compare."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    """Prefix tokens the policy encoded (cache misses and new prompt text)."""
    prm_passes: int = 0
    """Partial solutions scored by the reward model (one request = one pass)."""
    prm_tokens: int = 0
    policy_calls: int = 0
    reward_calls: int = 0
    steps: int = 0
    """Algorithm steps (`advance` calls that did work)."""


@dataclass(slots=True)
class Trajectory:
    """A partial solution: a particle, a beam, a node of the A* tree."""

    seq_id: str
    """Id under which the policy worker holds this sequence's KV cache."""
    parent_id: str | None
    steps: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    """rewards[i]: reward of the partial solution through step i."""
    score: float | None = None
    """Aggregated reward; None until scored."""
    logprob: float = 0.0
    num_tokens: int = 0
    finished: bool = False
    stop: str = ""
    """Why it finished: eos, answer, max_steps, budget, or rejected (early rejection)."""
    scored_id: str | None = None
    """Id under which the reward worker holds this trajectory's scored prefix (incremental PRM)."""

    @property
    def text(self) -> str:
        return "".join(self.steps)

    @property
    def pruned(self) -> bool:
        return self.stop == "rejected"


@dataclass(frozen=True, slots=True)
class EarlyRejection:
    """Score a candidate step after its first `tau` tokens; only the best `keep` share of each
    group survives (steps that ended within tau compete too) and the partial survivors finish.
    A setting of the search (`StepSearch`), not state: the copy that old checkpoints keep in
    their `SearchCommon` is ignored on load."""

    tau: int
    keep: float
    rescore: bool = False
    """Rescore finished survivors on their whole step; False keeps the score of the first tau
    tokens, as the author code (`partial_beam_search.py`) does."""


@dataclass(slots=True)
class SearchCommon:
    """State every algorithm has: the problem, its seed stream, ids, spend and budget."""

    problem: Prompt
    seed: int
    budget: Budget = field(default_factory=Budget)
    spend: Spend = field(default_factory=Spend)
    draws: int = 0
    """Random draws taken so far; draw k is seeded by (seed, k), so the stream resumes exactly."""
    next_id: int = 0
    done: bool = False
    stop_reason: str = ""

    def rng(self) -> np.random.Generator:
        """A fresh generator for the next random decision (counter-based: resumes exactly)."""
        self.draws += 1
        return np.random.default_rng([_DRAW_DOMAIN, self.seed, self.draws])

    def selection_rng(self) -> np.random.Generator:
        """The generator of a read-only decision (the final `sample` selection): fixed by the seed
        and the draws so far, it consumes none, so `result` stays a pure function of the state."""
        return np.random.default_rng([_SELECT_DOMAIN, self.seed, self.draws])

    def new_id(self) -> str:
        self.next_id += 1
        return str(self.next_id)

    def request_seed(self, seq_id: str) -> int:
        """The policy's sampling seed for one new sequence: fixed by (search seed, sequence id)."""
        words = np.random.SeedSequence(
            [_REQUEST_SEED_DOMAIN, self.seed, int(seq_id)]
        ).generate_state(2, np.uint32)
        return (int(words[0]) << 31) ^ int(words[1])

    def finish(self, reason: str) -> None:
        self.done = True
        self.stop_reason = reason

    def root(self) -> Trajectory:
        """The empty partial solution (the prompt alone)."""
        return Trajectory(seq_id=self.new_id(), parent_id=None)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One solution a search produced, as reported to the user."""

    text: str
    steps: tuple[str, ...]
    final_answer: str | None
    score: float | None
    """Aggregated reward (None where the algorithm uses no reward)."""
    weight: float
    """Normalised selection weight (particle weight, vote share or 1/n)."""
    finished: bool
    stop: str
    rewards: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchResult:
    algorithm: str
    answer: str
    """The chosen solution's text."""
    final_answer: str | None
    """Its canonical `\\boxed{}` content."""
    candidates: tuple[Candidate, ...]
    chosen: int | None
    """Index of the chosen candidate (None when there is no candidate)."""
    spend: Spend
    stop_reason: str

    @classmethod
    def of(
        cls,
        algorithm: str,
        common: SearchCommon,
        candidates: tuple[Candidate, ...],
        chosen: int | None,
    ) -> SearchResult:
        """The result of a search whose candidates are ranked and whose choice is made."""
        best = None if chosen is None else candidates[chosen]
        return cls(
            algorithm=algorithm,
            answer="" if best is None else best.text,
            final_answer=None if best is None else best.final_answer,
            candidates=candidates,
            chosen=chosen,
            spend=common.spend,
            stop_reason=common.stop_reason,
        )
