"""Async faces of in-process workers, for one-process runs (`lodestar solve`, tests, benchmarks).

The algorithms await `policy.extend` / `reward.score`; a worker in this process is synchronous
torch code, so each call runs in a thread and calls are serialised (one forward loop at a time,
as on a Ray actor). The distributed runtime swaps these for Ray actors (`worker_pool`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from lodestar.orchestrator.batching import RequestBatcher, SearchScope, request_chars
from lodestar.workers.messages import (
    ExtendRequest,
    RequestFailed,
    ScoreRequest,
    StepOutput,
    StepScores,
)


class SyncPolicy(Protocol):
    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput | RequestFailed]: ...

    def release_prefix(self, prefix: str) -> int: ...


class SyncReward(Protocol):
    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores | RequestFailed]: ...

    def release_prefix(self, prefix: str) -> int: ...


class LocalPolicy:
    def __init__(self, worker: SyncPolicy) -> None:
        self.worker = worker
        self.lock = asyncio.Lock()

    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        async with self.lock:
            return await asyncio.to_thread(self.worker.extend, list(requests))


class LocalReward:
    def __init__(self, worker: SyncReward) -> None:
        self.worker = worker
        self.lock = asyncio.Lock()

    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores | RequestFailed]:
        async with self.lock:
            return await asyncio.to_thread(self.worker.score, list(requests))


class LocalWorkers:
    """`Workers` over one in-process policy and one reward, every search's calls merged."""

    def __init__(
        self,
        policy: SyncPolicy,
        reward: SyncReward,
        max_batch: int = 256,
        max_wait_s: float = 0.001,
        max_call_chars: int | None = 1_000_000,
    ) -> None:
        self._policy = LocalPolicy(policy)
        self._reward = LocalReward(reward)
        bounds = dict(cost=request_chars, max_cost=max_call_chars)
        self.policy_batcher = RequestBatcher(self._policy.extend, max_batch, max_wait_s, **bounds)
        self.reward_batcher = RequestBatcher(self._reward.score, max_batch, max_wait_s, **bounds)

    def scope(self, search_id: str) -> SearchScope:
        return SearchScope(search_id, self.policy_batcher.submit, self.reward_batcher.submit)

    def batchers(self) -> dict[str, list[RequestBatcher[Any, Any]]]:
        return {"policy": [self.policy_batcher], "reward": [self.reward_batcher]}

    async def release(self, search_id: str) -> None:
        prefix = SearchScope.prefix_of(search_id)
        async with self._policy.lock:
            self._policy.worker.release_prefix(prefix)
        async with self._reward.lock:
            self._reward.worker.release_prefix(prefix)
