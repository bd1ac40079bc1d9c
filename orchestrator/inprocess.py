"""Workers in this process: the engines behind the same `Workers` interface as the Ray pool.

The runtime for one-machine commands (`lodestar solve`, `eval`, `bench`) and single-process
tests. An engine is synchronous torch code, so each call runs in a worker thread and calls are
serialised per engine (one forward loop at a time, as on a Ray actor).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from lodestar.orchestrator.batching import RequestBatcher, SearchScope, request_chars
from lodestar.workers.contract import PolicyEngine, RewardEngine, host_info

T = TypeVar("T")


class _InThread:
    """One engine's calls, one at a time, each in a worker thread (the event loop stays free)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()

    async def run(self, method: Callable[..., T], *args: Any) -> T:
        async with self.lock:
            return await asyncio.to_thread(method, *args)


class LocalWorkers:
    """`Workers` over one in-process policy and one reward, every search's calls merged."""

    def __init__(
        self,
        policy: PolicyEngine,
        reward: RewardEngine,
        max_batch: int = 256,
        max_wait_s: float = 0.001,
        max_call_chars: int | None = 1_000_000,
    ) -> None:
        self.policy, self.reward = policy, reward
        self._policy, self._reward = _InThread(), _InThread()
        bounds = dict(cost=request_chars, max_cost=max_call_chars)

        async def extend(requests: list[Any]) -> list[Any]:
            return await self._policy.run(policy.extend, requests)

        async def score(requests: list[Any]) -> list[Any]:
            return await self._reward.run(reward.score, requests)

        self.policy_batcher = RequestBatcher(extend, max_batch, max_wait_s, **bounds)
        self.reward_batcher = RequestBatcher(score, max_batch, max_wait_s, **bounds)

    def scope(self, search_id: str) -> SearchScope:
        return SearchScope(search_id, self.policy_batcher.submit, self.reward_batcher.submit)

    def batchers(self) -> dict[str, list[RequestBatcher[Any, Any]]]:
        return {"policy": [self.policy_batcher], "reward": [self.reward_batcher]}

    async def ready(self) -> list[dict[str, Any]]:
        """The engines are loaded before this is built; their one host's `info`."""
        return [host_info(self.policy, self.reward)]

    async def release(self, search_id: str) -> None:
        prefix = SearchScope.prefix_of(search_id)
        await self._policy.run(self.policy.release_prefix, prefix)
        await self._reward.run(self.reward.release_prefix, prefix)

    def shutdown(self) -> None:
        """Nothing to stop: the engines go with this process."""
