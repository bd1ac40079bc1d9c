"""Many searches at once in one process, their model calls merged into shared worker batches.

The single-process runtime: `lodestar solve`, evaluation and benchmarks. The distributed runtime
runs the same algorithms over Ray actors; only what sits behind `RequestBatcher` changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.registry import start_search
from lodestar.orchestrator.algorithms.state import SearchResult
from lodestar.orchestrator.inprocess import LocalWorkers, SyncPolicy, SyncReward
from lodestar.workers.messages import Prompt


@dataclass(frozen=True)
class SearchJob:
    algorithm: str
    problem: Prompt
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    budget: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Finished:
    job: SearchJob
    result: SearchResult
    wall_time_s: float


class LocalEngine:
    """Runs searches concurrently (at most `concurrency` live) over one policy and one reward."""

    def __init__(
        self,
        policy: SyncPolicy,
        reward: SyncReward,
        max_batch: int = 256,
        max_wait_s: float = 0.001,
        concurrency: int = 32,
    ) -> None:
        self.workers = LocalWorkers(policy, reward, max_batch, max_wait_s)
        self.concurrency = concurrency
        self._ids = 0

    async def solve(self, job: SearchJob) -> Finished:
        job_args = (job.algorithm, job.problem, job.params, job.seed, job.budget)
        algorithm, state = start_search(*job_args)
        self._ids += 1
        search_id = f"s{self._ids}"
        scope = self.workers.scope(search_id)
        started = time.perf_counter()
        try:
            result = await run_search(algorithm, state, scope, scope)
        finally:
            await self.workers.release(search_id)
        return Finished(job, result, time.perf_counter() - started)

    async def solve_all(self, jobs: Iterable[SearchJob]) -> list[Finished]:
        """Results in job order."""
        gate = asyncio.Semaphore(self.concurrency)

        async def one(job: SearchJob) -> Finished:
            async with gate:
                return await self.solve(job)

        return list(await asyncio.gather(*(one(j) for j in jobs)))

    @property
    def policy_batch_sizes(self) -> list[int]:
        return list(self.workers.policy_batcher.batch_sizes)
