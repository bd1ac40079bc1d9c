"""Algorithm names -> algorithms, and parameter parsing with errors that name the field.

This is the edge where untyped input (CLI flags, gRPC messages, JSON) becomes typed parameters;
`ParamError` later maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from lodestar.orchestrator.algorithms.astar import AStarDecoding
from lodestar.orchestrator.algorithms.base import SearchAlgorithm, SearchParams
from lodestar.orchestrator.algorithms.baselines import (
    BestOfN,
    Greedy,
    SelfConsistency,
    WeightedBestOfN,
)
from lodestar.orchestrator.algorithms.beam import BeamSearch, DiverseVerifierTreeSearch
from lodestar.orchestrator.algorithms.codec import algorithm_of
from lodestar.orchestrator.algorithms.early_rejection import EarlyRejectionSearch
from lodestar.orchestrator.algorithms.particle_filter import (
    EntropicParticleFilter,
    ParticleFilter,
)
from lodestar.orchestrator.algorithms.particle_gibbs import ParticleGibbs
from lodestar.orchestrator.algorithms.state import Budget
from lodestar.workers.messages import Prompt

ALGORITHMS: dict[str, SearchAlgorithm[Any, Any]] = {
    a.name: a
    for a in (
        Greedy(),
        BestOfN(),
        WeightedBestOfN(),
        SelfConsistency(),
        BeamSearch(),
        DiverseVerifierTreeSearch(),
        ParticleFilter(),
        EntropicParticleFilter(),
        ParticleGibbs(),
        AStarDecoding(),
        EarlyRejectionSearch(),
    )
}


class ParamError(ValueError):
    """Bad search input; `field` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def get_algorithm(name: str) -> SearchAlgorithm[Any, Any]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ParamError("algorithm", f"unknown algorithm {name!r} (known: {known})") from None


def _validated(model: type[Any], data: Mapping[str, Any], prefix: str, inner: str = "") -> Any:
    """`model` from `data`; its first error at `prefix.<loc>`, `inner_params` named `inner`."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        if inner and loc[:1] == ["inner_params"]:
            loc[0] = inner
        raise ParamError(".".join([prefix, *loc]), err["msg"]) from None


def parse_params(
    name: str, params: Mapping[str, Any] | None = None, *, wire: bool = False
) -> SearchParams:
    """Typed parameters of algorithm `name`; a bad field raises ParamError named as given
    (`params.n`, `params.inner_params.n`) or, with `wire`, as gRPC nests it (`params.pf.n`,
    `params.early_rejection.pf.n`), so the server passes it on unchanged."""
    algorithm, data = get_algorithm(name), params or {}
    if wire:
        return _validated(algorithm.Params, data, f"params.{name}", data.get("inner", ""))
    return _validated(algorithm.Params, data, "params")


def parse_budget(budget: Mapping[str, Any] | None = None) -> Budget:
    return _validated(Budget, budget or {}, "budget")


def check_problem(problem: Prompt) -> None:
    text = problem if isinstance(problem, str) else "".join(m.content for m in problem)
    if not text.strip():
        raise ParamError("problem", "must not be empty")


def start_search(
    name: str,
    problem: Prompt,
    params: Mapping[str, Any] | SearchParams | None = None,
    seed: int = 0,
    budget: Mapping[str, Any] | Budget | None = None,
) -> tuple[SearchAlgorithm[Any, Any], Any]:
    """Validate everything, then `init`: the algorithm and its initial state."""
    algorithm = get_algorithm(name)
    check_problem(problem)
    if seed < 0 or seed >= 2**63:
        raise ParamError("seed", "must be in [0, 2**63)")
    typed = params if isinstance(params, SearchParams) else parse_params(name, params)
    if not isinstance(typed, algorithm.Params):
        raise ParamError("params", f"expected {algorithm.Params.__name__}")
    caps = budget if isinstance(budget, Budget) else parse_budget(budget)
    return algorithm, algorithm.init(problem, typed, seed, caps)


def algorithm_for_checkpoint(data: bytes) -> SearchAlgorithm[Any, Any]:
    return get_algorithm(algorithm_of(data))
