"""Workers in this process: the engines behind the same `Workers` interface as the Ray pool.

The runtime for one-machine commands (`lodestar solve`, `eval`, `bench`) and single-process
tests. An engine's calls are synchronous, so each runs in a worker thread: one at a time for an
engine that runs one batch at a time (one forward loop, as on a Ray actor), up to
`CONCURRENT_CALLS` at once for a concurrent one (vLLM), whose requests then go to its scheduler
as they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lodestar.orchestrator.batching import RequestBatcher, SearchScope, request_chars
from lodestar.workers.contract import CONCURRENT_CALLS, PolicyEngine, RewardEngine, host_info

T = TypeVar("T")


class _InThread:
    """One engine's calls, each in a thread of its own pool (the event loop stays free)."""

    def __init__(self, engine: PolicyEngine | RewardEngine, role: str) -> None:
        self.calls = CONCURRENT_CALLS if engine.concurrent else 1
        self.threads = ThreadPoolExecutor(self.calls, thread_name_prefix=role)

    async def run(self, method: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.threads, method, *args)


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
        self._policy, self._reward = _InThread(policy, "policy"), _InThread(reward, "reward")

        async def extend(requests: list[Any]) -> list[Any]:
            return await self._policy.run(policy.extend, requests)

        async def score(requests: list[Any]) -> list[Any]:
            return await self._reward.run(reward.score, requests)

        def batcher(call: Any, threads: _InThread) -> RequestBatcher[Any, Any]:
            bounds = dict(cost=request_chars, max_cost=max_call_chars)
            batcher = RequestBatcher(call, max_batch, max_wait_s, **bounds)
            if threads.calls > 1:
                batcher.overlap(threads.calls)
            return batcher

        self.policy_batcher = batcher(extend, self._policy)
        self.reward_batcher = batcher(score, self._reward)

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
        """The threads go; the engines go with this process."""
        self._policy.threads.shutdown(wait=False)
        self._reward.threads.shutdown(wait=False)
