"""Early rejection around any step-level search (beam, dvts, pf, epf, astar).

Every candidate step is first generated for `tau` tokens and scored on that partial step; within
each group of siblings only the best `keep` share survives (by default the author code's top
num_beams // beam_width, steps that ended within tau competing too), the partial survivors are
generated to the end (not rescored unless `rescore`, as in the author code), and the rest come
back with stop "rejected" and are never chosen. A rejected candidate is dead, not a result:
PF and ePF give it weight zero, leave it out of ESS and entropy and refill its slot at the next
resampling (it is never absorbed); A* does not count it as a repeat (it never reopens a state);
beam and DVTS never keep it. The mechanism lives in `expansion.expand` (its `early_rejection`
argument); this wrapper only builds the inner search with it switched on and otherwise delegates
to it, so the inner algorithm runs unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from lodestar.orchestrator.algorithms.astar import AStarDecoding
from lodestar.orchestrator.algorithms.base import SearchAlgorithm, SearchParams, StepSearch
from lodestar.orchestrator.algorithms.beam import BeamSearch, DiverseVerifierTreeSearch
from lodestar.orchestrator.algorithms.codec import FORMAT_VERSION
from lodestar.orchestrator.algorithms.particle_filter import EntropicParticleFilter, ParticleFilter
from lodestar.orchestrator.algorithms.state import (
    Budget,
    EarlyRejection,
    SearchCommon,
    SearchResult,
)
from lodestar.workers.contract import Policy, Reward
from lodestar.workers.messages import Prompt

Inner = Literal["beam", "dvts", "pf", "epf", "astar"]
INNER: dict[str, type[StepSearch[Any, Any]]] = {
    "beam": BeamSearch,
    "dvts": DiverseVerifierTreeSearch,
    "pf": ParticleFilter,
    "epf": EntropicParticleFilter,
    "astar": AStarDecoding,
}


class EarlyRejectionParams(SearchParams):
    """The inner search's parameters go in `inner_params` (sampling and max_steps included)."""

    inner: Inner = "beam"
    inner_params: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    """Parameters of the inner algorithm, validated by its own Params (errors name
    `inner_params.<field>`); stored with every default filled in."""
    tau: int = Field(64, ge=1, le=32768)
    """Tokens of a candidate step generated before it is scored and maybe rejected."""
    keep: float | None = Field(None, gt=0.0, le=1.0)
    """Share of each group's candidates that survive (at least one), steps that ended within tau
    competing too. None: the author code's rule (`partial_beam_search.py`, the top
    num_beams // beam_width), i.e. 1 / m for beam and dvts (n // m of beam's n candidates, the
    best child of each dvts subtree); 0.5 for pf, epf and astar, which have no width (ours)."""
    rescore: bool = False
    """Rescore survivors on their finished step (one more PRM pass each); False, as the author
    code, keeps the score of the first tau tokens."""

    @field_validator("inner_params")
    @classmethod
    def _inner_params_valid(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "inner" not in info.data:  # `inner` itself is invalid; that error is reported
            return value
        # A ValidationError raised here keeps its locations, nested under `inner_params`.
        typed = INNER[info.data["inner"]].Params.model_validate(value)
        return typed.model_dump(mode="json")

    @field_validator("temperature", "top_p", "max_steps", "max_step_tokens", "step_delimiter")
    @classmethod
    def _set_inside(cls, value: Any, info: ValidationInfo) -> Any:
        """The shared sampling fields belong to the inner search; only their defaults pass here."""
        if info.field_name and value != cls.model_fields[info.field_name].default:
            raise ValueError("set it in inner_params: the inner search does the sampling")
        return value


def author_keep(params: EarlyRejectionParams) -> float:
    """The survivor share: `keep` when set, else 1 / m for beam and dvts, 0.5 otherwise."""
    if params.keep is not None:
        return params.keep
    width = params.inner_params.get("m") if params.inner in ("beam", "dvts") else None
    return 1.0 / width if width else 0.5


def inner_algorithm(params: EarlyRejectionParams) -> StepSearch[Any, Any]:
    """The inner search with early rejection on as `params` set it: rebuilt from them at every
    call, so the wrapper's checkpoint (which holds them) resumes the same configured search."""
    return INNER[params.inner](EarlyRejection(params.tau, author_keep(params), params.rescore))


@dataclass(slots=True)
class EarlyRejectionState:
    params: EarlyRejectionParams
    inner: Any
    """The inner algorithm's own state."""

    @property
    def common(self) -> SearchCommon:
        return self.inner.common


class EarlyRejectionSearch(SearchAlgorithm[EarlyRejectionParams, EarlyRejectionState]):
    """Runs `params.inner` with early rejection on; results say "early_rejection(<inner>)"."""

    name = "early_rejection"
    Params = EarlyRejectionParams
    State = EarlyRejectionState

    def init(
        self, problem: Prompt, params: EarlyRejectionParams, seed: int, budget: Budget | None = None
    ) -> EarlyRejectionState:
        inner = inner_algorithm(params)
        inner_state = inner.init(
            problem, inner.Params.model_validate(params.inner_params), seed, budget
        )
        return EarlyRejectionState(params=params, inner=inner_state)

    async def advance(
        self, state: EarlyRejectionState, policy: Policy, reward: Reward
    ) -> EarlyRejectionState:
        await inner_algorithm(state.params).advance(state.inner, policy, reward)
        return state

    async def _step(self, state: EarlyRejectionState, policy: Policy, reward: Reward) -> None:
        await inner_algorithm(state.params)._step(state.inner, policy, reward)

    def is_done(self, state: EarlyRejectionState) -> bool:
        return inner_algorithm(state.params).is_done(state.inner)

    def result(self, state: EarlyRejectionState) -> SearchResult:
        inner = inner_algorithm(state.params).result(state.inner)
        return replace(inner, algorithm=f"{self.name}({state.params.inner})")

    def dumps(self, state: EarlyRejectionState) -> bytes:
        """Our parameters, and the inner algorithm's own checkpoint nested as a JSON object."""
        inner = json.loads(inner_algorithm(state.params).dumps(state.inner))
        body = {"params": state.params.model_dump(mode="json"), "inner": inner}
        doc = {"format": FORMAT_VERSION, "algorithm": self.name, "state": body}
        return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()

    def loads(self, data: bytes) -> EarlyRejectionState:
        doc = json.loads(data)
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported checkpoint format {doc.get('format')!r}")
        params = self.Params.model_validate(doc["state"]["params"])
        inner_doc = json.dumps(doc["state"]["inner"], separators=(",", ":"), allow_nan=True)
        inner = inner_algorithm(params).loads(inner_doc.encode())
        return EarlyRejectionState(params=params, inner=inner)
