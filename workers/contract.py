"""The worker contract: what a model engine serves and what a search awaits, stated once.

An engine (`PolicyEngine`, `RewardEngine`) is model code behind a synchronous call, hosted on a
Ray actor (`actors.ModelHost`) or in this process (`orchestrator.inprocess`). Most answer one
batch at a time (`concurrent = False`: the HF engines `policy.PolicyWorker`,
`reward.RewardWorker`, `verifier.VerifierReward`), so the runtime serialises their calls and
merges what arrives in a short window. A `concurrent` engine (`vllm_policy.VLLMPolicy`) takes
overlapping calls (up to `CONCURRENT_CALLS` at once per host, each blocking its own thread)
and schedules each request as it arrives. `factory.build_policy`/`build_reward` choose an
implementation by `ModelConfig.engine`. A batch reports one outcome per request: a request that
cannot be served is a `RequestFailed` in its place, never an exception for the whole batch.

A search sees the async faces (`Policy`, `Reward`): the runtime's batchers merge the requests of
every live search into engine calls and hand each search its own outputs (a `RequestFailed`
becomes that search's error), so algorithms never see transport, batching or other searches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from lodestar.workers.messages import (
    ExtendRequest,
    RequestFailed,
    ScoreRequest,
    StepOutput,
    StepScores,
)

CONCURRENT_CALLS = 64
"""Overlapping calls a host sends a concurrent engine (threads of a Ray actor or of the
in-process runtime): above the live searches one host serves, so none waits for a thread."""


class PolicyEngine(Protocol):
    device: Any
    """Where the model runs (reported by `info`, checked by placement tests)."""
    concurrent: bool
    """Whether calls may overlap (continuous batching) or must come one at a time."""

    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        """The next step of each request, in request order; sampling seeded per request, so a
        retried call returns what the first would have."""
        ...

    def release_prefix(self, prefix: str) -> int:
        """One search has stopped here: drop the caches of every sequence id starting with
        `prefix` (a concurrent engine aborts its requests still in flight instead); returns how
        many entries went."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters since start (tokens, calls, cache hits), for metrics."""
        ...


class RewardEngine(Protocol):
    concurrent: bool

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores | RequestFailed]:
        """One reward per step of each request, in request order."""
        ...

    def release_prefix(self, prefix: str) -> int: ...

    def stats(self) -> dict[str, int]: ...


class Policy(Protocol):
    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        """The next step of each request, in request order."""
        ...


class Reward(Protocol):
    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        """One reward per step of each request, in request order."""
        ...


def host_info(policy: PolicyEngine | None, reward: RewardEngine | None) -> dict[str, Any]:
    """What a process holding engines reports: its roles, device, torch threads and counters
    (a Ray actor adds where it runs; see `actors.ModelHost.info`)."""
    import torch

    held = {"policy": policy, "reward": reward}
    roles = [role for role, engine in held.items() if engine is not None]
    return {
        "pid": os.getpid(),
        "device": str(policy.device) if policy is not None else "cpu",
        "torch_threads": torch.get_num_threads(),
        "roles": roles,
        "concurrent": {role: held[role].concurrent for role in roles},  # type: ignore[union-attr]
        "stats": {role: held[role].stats() for role in roles},  # type: ignore[union-attr]
    }
