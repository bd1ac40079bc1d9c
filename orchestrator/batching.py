"""Merge the model calls of many concurrent searches into large worker batches.

Each live search awaits `extend`/`score` with its own few requests; a `RequestBatcher` collects
what arrives within a short window (or until the batch is full), makes one worker call, and hands
each search its own outputs. `SearchScope` gives each search a private id namespace so sequence
ids (the workers' cache keys) never collide across searches.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from lodestar.workers.messages import ExtendRequest, ScoreRequest, StepOutput, StepScores


class WorkersUnavailable(RuntimeError):
    """A worker is gone for good (its restarts or retries ran out): the search cannot go on
    here, but nothing is wrong with the request. The service answers UNAVAILABLE."""


Req = TypeVar("Req")
Out = TypeVar("Out")


class RequestBatcher(Generic[Req, Out]):
    """One worker call per window for all pending requests, at most `max_batch` at a time.

    A caller's requests stay together in one call unless they alone exceed `max_batch`.
    """

    def __init__(
        self,
        call: Callable[[list[Req]], Awaitable[list[Out]]],
        max_batch: int = 256,
        max_wait_s: float = 0.002,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._call = call
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._pending: deque[tuple[list[Req], asyncio.Future[list[Out]]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        """Sizes of the most recent calls (bounded: a server runs for weeks)."""
        self.on_batch: Callable[[int], None] | None = None
        """Called with each call's size (metrics)."""

    async def submit(self, requests: Sequence[Req]) -> list[Out]:
        if not requests:
            return []
        if len(requests) > self.max_batch:
            chunks = [
                requests[i : i + self.max_batch] for i in range(0, len(requests), self.max_batch)
            ]
            parts = await asyncio.gather(*(self.submit(c) for c in chunks))
            return [o for part in parts for o in part]
        future: asyncio.Future[list[Out]] = asyncio.get_running_loop().create_future()
        self._pending.append((list(requests), future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await future

    async def _run(self) -> None:
        """Wait out the window, dispatch everything pending, repeat; exit when idle (the next
        submit starts a new run), so no task outlives its work or its event loop."""
        while self._pending:
            if self.max_wait_s > 0 and self._queued() < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            while self._pending:
                await self._dispatch(self._take())

    def _queued(self) -> int:
        return sum(len(r) for r, _ in self._pending)

    def _take(self) -> list[tuple[list[Req], asyncio.Future[list[Out]]]]:
        batch, size = [], 0
        while self._pending and size + len(self._pending[0][0]) <= self.max_batch:
            item = self._pending.popleft()
            batch.append(item)
            size += len(item[0])
        return batch

    async def _dispatch(self, batch: list[tuple[list[Req], asyncio.Future[list[Out]]]]) -> None:
        flat = [r for reqs, _ in batch for r in reqs]
        self.batch_sizes.append(len(flat))
        if self.on_batch is not None:
            self.on_batch(len(flat))
        try:
            outs = await self._call(flat)
            if len(outs) != len(flat):
                raise RuntimeError(f"worker returned {len(outs)} outputs for {len(flat)} requests")
        except Exception as e:  # every waiting search sees the worker's failure
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        start = 0
        for reqs, fut in batch:
            if not fut.done():
                fut.set_result(outs[start : start + len(reqs)])
            start += len(reqs)


class SearchScope:
    """A policy and a reward for one search: ids prefixed with the search id on the way out and
    stripped on the way back, so concurrent searches share workers without sharing cache keys."""

    def __init__(
        self,
        search_id: str,
        extend: Callable[[Sequence[ExtendRequest]], Awaitable[list[StepOutput]]],
        score: Callable[[Sequence[ScoreRequest]], Awaitable[list[StepScores]]],
    ) -> None:
        self.prefix = self.prefix_of(search_id)
        self._extend = extend
        self._score = score

    @staticmethod
    def prefix_of(search_id: str) -> str:
        """The prefix of every sequence id of one search, as the workers see it."""
        return f"{search_id}/"

    def _scoped(self, request: Any) -> Any:
        parent = request.parent_id
        return dataclasses.replace(
            request,
            seq_id=self.prefix + request.seq_id,
            parent_id=None if parent is None else self.prefix + parent,
        )

    def _local(self, output: Any) -> Any:
        return dataclasses.replace(output, seq_id=output.seq_id.removeprefix(self.prefix))

    async def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        outs = await self._extend([self._scoped(r) for r in requests])
        return [self._local(o) for o in outs]

    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        outs = await self._score([self._scoped(r) for r in requests])
        return [self._local(o) for o in outs]


class Workers(Protocol):
    """Where a runtime's model calls go: in-process workers or a pool of Ray actors.

    `scope` is called once when a search starts (or resumes) on this runtime and pins it to its
    workers (cache affinity); `release` is called once when it stops here, freeing its caches."""

    def scope(self, search_id: str) -> SearchScope: ...

    async def release(self, search_id: str) -> None: ...

    def batchers(self) -> dict[str, list[RequestBatcher[Any, Any]]]:
        """The batchers by role ("policy", "reward"), for metrics."""
        ...
