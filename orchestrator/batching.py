"""Merge the model calls of many concurrent searches into large worker batches.

Each live search awaits `extend`/`score` with its own few requests; a `RequestBatcher` collects
what arrives within a short window (or until the batch is full), makes one worker call, and hands
each search its own outputs. `SearchScope` gives each search a private id namespace so sequence
ids (the workers' cache keys) never collide across searches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from lodestar.orchestrator.errors import SearchError, WorkersUnavailable
from lodestar.workers.messages import (
    ExtendRequest,
    RequestFailed,
    ScoreRequest,
    StepOutput,
    StepScores,
)

__all__ = ["RequestBatcher", "SearchScope", "Workers", "WorkersUnavailable", "request_chars"]

log = logging.getLogger(__name__)


Req = TypeVar("Req")
Out = TypeVar("Out")


def request_chars(request: ExtendRequest | ScoreRequest) -> int:
    """A request's size for call bounds: the characters of its prefix, which bound what a
    worker may have to encode for it (a cache hit encodes less, never more)."""
    prompt = request.prompt
    size = len(prompt) if isinstance(prompt, str) else sum(len(m.content) for m in prompt)
    return size + sum(map(len, request.steps)) + len(getattr(request, "partial_step", ""))


class RequestBatcher(Generic[Req, Out]):
    """One worker call per window for all pending requests, bounded in count (`max_batch`) and
    in size (`max_cost` by `cost`, e.g. characters of prefix), so one search's long prefill never
    holds a worker for the others' time.

    Calls go one at a time by default (`max_in_flight=1`: an engine that runs one batch at a
    time, so what arrives during a call joins the next); an engine that batches continuously
    takes up to `max_in_flight` overlapping calls, with no window (`max_wait_s=0`).

    A caller's requests stay together in one call unless they alone exceed a bound. Each caller
    gets its own outcome: the worker's per-request results, or, when the whole call raised, the
    error of a call that held its requests alone (the batch is bisected by caller until the
    failure is pinned on the caller it belongs to). A caller that stops waiting (its search was
    cancelled or ran out of time) leaves the queue before its requests are sent.
    """

    def __init__(
        self,
        call: Callable[[list[Req]], Awaitable[list[Out]]],
        max_batch: int = 256,
        max_wait_s: float = 0.002,
        *,
        cost: Callable[[Req], int] | None = None,
        max_cost: int | None = None,
        max_in_flight: int = 1,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        if max_cost is not None and (max_cost < 1 or cost is None):
            raise ValueError("max_cost needs a cost function and must be >= 1")
        self._call = call
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._cost = cost
        self.max_cost = max_cost
        self.max_in_flight = max_in_flight
        self._pending: deque[_Pending[Req, Out]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        """Overlapping calls running now (at most `max_in_flight`; unused at 1)."""
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        """Sizes of the most recent calls (bounded: a server runs for weeks)."""
        self.on_batch: Callable[[int], None] | None = None
        """Called with each call's size (metrics)."""
        self.bisections = 0
        """Calls that failed as a whole with more than one caller in them and were split."""

    def overlap(self, calls: int) -> None:
        """Serve an engine that batches continuously (vLLM): no window, up to `calls`
        overlapping calls, each caller's requests sent as they arrive."""
        self.max_wait_s, self.max_in_flight = 0.0, calls

    async def submit(self, requests: Sequence[Req]) -> list[Out]:
        if not requests:
            return []
        chunks = self._chunks(list(requests))
        if len(chunks) > 1:
            parts = await asyncio.gather(*(self.submit(c) for c in chunks))
            return [o for part in parts for o in part]
        future: asyncio.Future[list[Out]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(list(requests), self._total_cost(requests), future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await future

    def _total_cost(self, requests: Sequence[Req]) -> int:
        return 0 if self._cost is None else sum(self._cost(r) for r in requests)

    def _chunks(self, requests: list[Req]) -> list[list[Req]]:
        """Split one caller's requests at the count and size bounds (a request larger than
        `max_cost` on its own travels alone)."""
        chunks: list[list[Req]] = [[]]
        size = 0
        for r in requests:
            c = 0 if self._cost is None else self._cost(r)
            over_count = len(chunks[-1]) >= self.max_batch
            over_cost = self.max_cost is not None and size + c > self.max_cost
            if chunks[-1] and (over_count or over_cost):
                chunks.append([])
                size = 0
            chunks[-1].append(r)
            size += c
        return chunks

    async def _run(self) -> None:
        """Wait out the window, dispatch everything pending, repeat; exit when idle (the next
        submit starts a new run), so no task outlives its work or its event loop. A batch is
        taken only once a call slot is free, so what arrives meanwhile joins it."""
        while self._pending:
            if self.max_wait_s > 0 and self._queued() < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            while self._pending:
                if self.max_in_flight == 1:
                    batch = self._take()
                    if batch:
                        await self._dispatch(batch)
                    continue
                while len(self._calls) >= self.max_in_flight:
                    await asyncio.wait(self._calls, return_when=asyncio.FIRST_COMPLETED)
                batch = self._take()
                if batch:
                    call = asyncio.get_running_loop().create_task(self._dispatch(batch))
                    self._calls.add(call)
                    call.add_done_callback(self._calls.discard)

    def _queued(self) -> int:
        return sum(len(p.requests) for p in self._pending)

    def _take(self) -> list[_Pending[Req, Out]]:
        batch: list[_Pending[Req, Out]] = []
        size = cost = 0
        while self._pending:
            head = self._pending[0]
            if head.future.done():  # its caller stopped waiting: never sent
                self._pending.popleft()
                continue
            fits = size + len(head.requests) <= self.max_batch and (
                self.max_cost is None or cost + head.cost <= self.max_cost
            )
            if batch and not fits:
                break
            batch.append(self._pending.popleft())
            size += len(head.requests)
            cost += head.cost
        return batch

    async def _dispatch(self, batch: list[_Pending[Req, Out]]) -> None:
        flat = [r for p in batch for r in p.requests]
        self.batch_sizes.append(len(flat))
        if self.on_batch is not None:
            self.on_batch(len(flat))
        try:
            outs = await self._call(flat)
            if len(outs) != len(flat):
                raise RuntimeError(f"worker returned {len(outs)} outputs for {len(flat)} requests")
        except Exception as e:
            if len(batch) == 1 or isinstance(e, WorkersUnavailable):
                for p in batch:  # its own failure, or a worker gone for everyone
                    if not p.future.done():
                        p.future.set_exception(e)
                return
            # Whose fault? Retry each half alone: the good callers' requests succeed, the
            # failure ends up with the caller it belongs to (sampling is seeded per request,
            # so a retried request gives what it would have).
            self.bisections += 1
            log.warning("a worker call of %d callers failed (%s); bisecting", len(batch), e)
            half = len(batch) // 2
            for part in (batch[:half], batch[half:]):
                live = [p for p in part if not p.future.done()]
                if live:
                    await self._dispatch(live)
            return
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(outs[start : start + len(p.requests)])
            start += len(p.requests)


@dataclasses.dataclass(slots=True)
class _Pending(Generic[Req, Out]):
    """One caller's requests waiting for a call, and where its outcome goes."""

    requests: list[Req]
    cost: int
    future: asyncio.Future[list[Out]]


class SearchScope:
    """A policy and a reward for one search: ids prefixed with the search id on the way out and
    stripped on the way back, so concurrent searches share workers without sharing cache keys."""

    def __init__(
        self,
        search_id: str,
        extend: Callable[[Sequence[ExtendRequest]], Awaitable[list[StepOutput | RequestFailed]]],
        score: Callable[[Sequence[ScoreRequest]], Awaitable[list[StepScores | RequestFailed]]],
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
        return [self._local(_succeeded(o)) for o in outs]

    async def score(self, requests: Sequence[ScoreRequest]) -> list[StepScores]:
        outs = await self._score([self._scoped(r) for r in requests])
        return [self._local(_succeeded(o)) for o in outs]


def _succeeded(outcome: Any) -> Any:
    """A worker's outcome for one of this search's requests, or the search's typed failure."""
    if isinstance(outcome, RequestFailed):
        raise SearchError.from_outcome(outcome)
    return outcome


class Workers(Protocol):
    """Where a runtime's model calls go: in-process workers or a pool of Ray actors.

    `scope` is called once when a search starts (or resumes) on this runtime and pins it to its
    workers (cache affinity); `release` is called once when it stops here, freeing its caches."""

    def scope(self, search_id: str) -> SearchScope: ...

    async def release(self, search_id: str) -> None: ...

    def batchers(self) -> dict[str, list[RequestBatcher[Any, Any]]]:
        """The batchers by role ("policy", "reward"), for metrics."""
        ...

    async def ready(self) -> list[dict[str, Any]]:
        """Once the models have loaded: each host's `info` (`workers.contract.host_info`)."""
        ...

    def shutdown(self) -> None: ...
