"""Async faces of in-process workers, for one-process runs (`lodestar solve`, tests, benchmarks).

The algorithms await `policy.extend` / `reward.score`; a worker in this process is synchronous
torch code, so each call runs in a thread and calls are serialised (one forward loop at a time,
as on a Ray actor). The distributed runtime swaps these for Ray actor handles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from lodestar.workers.messages import ExtendRequest, ScoreRequest, StepOutput, StepScores


class SyncPolicy(Protocol):
    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]: ...


class SyncReward(Protocol):
    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]: ...


class LocalPolicy:
    def __init__(self, worker: SyncPolicy) -> None:
        self.worker = worker
        self._lock = asyncio.Lock()

    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        async with self._lock:
            return await asyncio.to_thread(self.worker.extend, list(requests))


class LocalReward:
    def __init__(self, worker: SyncReward) -> None:
        self.worker = worker
        self._lock = asyncio.Lock()

    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        async with self._lock:
            return await asyncio.to_thread(self.worker.score, list(requests))
