"""The orchestrator: runs the searches of a state store on a set of workers, one step at a time.

Every accepted search is a job in the store and an asyncio task here. A task claims its job (a
lease), loads the latest checkpoint or starts the algorithm from the job's spec, then loops:
`advance` one step -> compare-and-set checkpoint + progress event + read the cancel flag (one
round trip, `record_step`) -> stop if cancelled. So
the store always holds the state after the newest completed step, and a search whose
orchestrator dies is resumed from there by another one (`claim_orphans` once the lease lapses),
with the same result as if nothing had happened: the state carries the RNG and the workers'
sampling is seeded per request.

Failures, by kind:
- the store cannot be reached: the search's waiter gets `StateStoreUnavailable` (within the
  store's timeouts); the job stays in the store and is resumed when the store is back;
- the search was taken over (`StaleWriter`, `LeaseLost`): this task stops writing and the waiter
  follows the new owner's progress through the store;
- anything else (a worker whose retries ran out, a bad model output): the job fails with the error.

Admission control is per orchestrator: at most `max_live` searches advance at once and
`max_queued` more wait for a slot; beyond that `submit` raises `Overloaded` and nothing is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lodestar.orchestrator.algorithms.base import SearchAlgorithm
from lodestar.orchestrator.algorithms.registry import (
    ParamError,
    algorithm_for_checkpoint,
    start_search,
)
from lodestar.orchestrator.algorithms.state import SearchResult
from lodestar.orchestrator.batching import Workers
from lodestar.orchestrator.state_store import (
    BatchRecord,
    InvalidTransition,
    JobNotFound,
    JobRecord,
    JobSpec,
    JobStatus,
    LeaseLost,
    StaleWriter,
    StateStore,
    StateStoreUnavailable,
    StreamClosed,
)
from lodestar.workers.messages import prompt_from_json

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The orchestrator's queue is full; nothing was stored. Retry later or elsewhere."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"overloaded: {limit} searches already accepted and unfinished")
        self.limit = limit


@dataclass(frozen=True)
class OrchestratorConfig:
    max_live: int = 64
    """Searches advancing at once (their model calls merge into shared batches)."""
    max_queued: int = 1024
    """Accepted searches waiting for a live slot; beyond live + queued, submit fails fast."""
    lease_s: float = 15.0
    """A job whose owner stops renewing for this long is resumed elsewhere."""
    scan_interval_s: float = 1.0
    """How often leases are renewed and orphaned jobs looked for."""
    resume_orphans: bool = True
    owner: str = field(default_factory=lambda: f"orch-{uuid.uuid4().hex[:12]}")

    def __post_init__(self) -> None:
        if self.max_live < 1 or self.max_queued < 0:
            raise ValueError("need max_live >= 1 and max_queued >= 0")
        if not 0 < self.scan_interval_s < self.lease_s:
            raise ValueError("need 0 < scan_interval_s < lease_s (leases must be renewed in time)")


class SearchObserver(Protocol):
    """What the orchestrator reports as it runs (the service's metrics implement it)."""

    def step(self, seconds: float, spent: Mapping[str, int]) -> None:
        """One step took `seconds` and spent `spent` (deltas of the Spend fields)."""

    def search_finished(self, status: JobStatus) -> None: ...


def progress_event(algorithm: SearchAlgorithm[Any, Any], state: Any, generation: int) -> dict:
    """What a streaming client sees after each step: the spend so far and the best partial
    solution (the text the search would answer with if it stopped now)."""
    best = algorithm.result(state)
    return {
        "generation": generation,
        "done": algorithm.is_done(state),
        "spend": dataclasses.asdict(algorithm.common(state).spend),
        "best": best.answer,
        "best_final_answer": best.final_answer,
    }


def _start(spec: JobSpec) -> tuple[SearchAlgorithm[Any, Any], Any]:
    """Validate a job's spec in full and build the algorithm's initial state."""
    return start_search(
        spec.algorithm, prompt_from_json(spec.problem), spec.params, spec.seed, spec.budget
    )


def being_cancelled() -> bool:
    """True while the current task has a cancel pending (one an except clause may have eaten)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def result_to_json(result: SearchResult) -> str:
    return json.dumps(dataclasses.asdict(result), allow_nan=True)


class Orchestrator:
    """Accepts, runs, resumes and cancels searches; `start()` before use, `close()` after."""

    def __init__(
        self,
        store: StateStore,
        workers: Workers,
        config: OrchestratorConfig | None = None,
        observer: SearchObserver | None = None,
    ) -> None:
        self.store = store
        self.workers = workers
        self.config = config or OrchestratorConfig()
        self.observer = observer
        self._slots = asyncio.Semaphore(self.config.max_live)
        self._tasks: dict[str, asyncio.Task[JobRecord]] = {}
        self._running: set[str] = set()
        self._lost: set[str] = set()
        """Live searches whose lease another orchestrator took; they stop at the next step."""
        self._wake = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None

    @property
    def owner(self) -> str:
        return self.config.owner

    @property
    def accepted(self) -> int:
        """Searches accepted here and not yet finished (live + waiting for a slot)."""
        return len(self._tasks)

    @property
    def live(self) -> int:
        return len(self._running)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._maintainer is None:
            self._maintainer = asyncio.create_task(self._maintain(), name="orchestrator-maintain")

    async def close(self) -> None:
        """Stop without finishing anything: unfinished jobs keep their last checkpoint and are
        resumed by whichever orchestrator claims them once their leases lapse."""
        tasks = [t for t in (self._maintainer, *self._tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._maintainer = None

    # -- the API ---------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> JobRecord:
        """Validate, store and schedule a search. Raises `ParamError` (bad request, nothing
        stored), `Overloaded`, `JobExists` or `StateStoreUnavailable`."""
        _start(spec)
        limit = self.config.max_live + self.config.max_queued
        if self.accepted >= limit:
            raise Overloaded(limit)
        record = await self.store.create_job(spec)
        log.info(
            "search %s accepted (%s)",
            spec.search_id,
            spec.algorithm,
            extra={"search_id": spec.search_id},
        )
        self._spawn(spec.search_id)
        return record

    async def submit_batch(
        self, batch_id: str, settings: Any, specs: Sequence[JobSpec]
    ) -> BatchRecord:
        """Validate every item, then store the batch and its queued jobs in one go. Items are
        not admitted here: every orchestrator of the store claims them as it has free slots.
        Raises `ParamError` (`items[i].problem`, or the shared field), `BatchExists`,
        `JobExists`."""
        for i, spec in enumerate(specs):
            try:
                _start(spec)
            except ParamError as e:  # the item's own fields get its index; shared ones do not
                per_item = e.field.split(".")[0] in ("problem", "seed")
                raise ParamError(
                    f"items[{i}].{e.field}" if per_item else e.field, e.message
                ) from None
        record = await self.store.create_batch(batch_id, settings, specs)
        log.info("batch %s accepted (%d items)", batch_id, len(specs), extra={"batch_id": batch_id})
        self._wake.set()
        return record

    async def cancel(self, search_id: str) -> JobRecord:
        """Flag the search; it stops before its next step (a queued one never starts). Returns
        the job as it is now (raises `JobNotFound`)."""
        await self.store.request_cancel(search_id)
        record = await self.store.get_job(search_id)
        if record is None:
            raise JobNotFound(search_id)
        return record

    async def wait(self, search_id: str) -> JobRecord:
        """The job once finished. Follows a search run elsewhere through its progress events."""
        task = self._tasks.get(search_id)
        if task is not None:
            return await asyncio.shield(task)
        return await self._follow_to_end(search_id)

    async def solve(self, spec: JobSpec) -> JobRecord:
        await self.submit(spec)
        return await self.wait(spec.search_id)

    # -- running one search ----------------------------------------------------------------------

    def _spawn(self, search_id: str) -> None:
        task = asyncio.create_task(self._run(search_id), name=f"search-{search_id}")
        self._tasks[search_id] = task
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[JobRecord]) -> None:
        search_id = task.get_name().removeprefix("search-")
        self._tasks.pop(search_id, None)
        self._lost.discard(search_id)
        self._wake.set()  # a slot is free: claim queued work now
        if not task.cancelled() and task.exception() is not None:  # retrieved: waiters re-raise
            log.warning(
                "search %s: %s", search_id, task.exception(), extra={"search_id": search_id}
            )

    async def _run(self, search_id: str) -> JobRecord:
        async with self._slots:
            record = await self.store.claim_job(search_id, self.owner, self.config.lease_s)
            if record is None:  # finished, or another orchestrator holds it
                return await self._follow_to_end(search_id)
            self._running.add(search_id)
            try:
                return await self._drive(record)
            except (StaleWriter, LeaseLost, InvalidTransition) as e:
                log.info(
                    "search %s moved to another owner: %s",
                    search_id,
                    e,
                    extra={"search_id": search_id},
                )
                return await self._follow_to_end(search_id)
            finally:
                self._running.discard(search_id)
                with contextlib.suppress(Exception):
                    await self.workers.release(search_id)

    async def _drive(self, record: JobRecord) -> JobRecord:
        spec, sid = record.spec, record.search_id
        if await self.store.is_cancelled(sid):
            return await self._finish(sid, JobStatus.CANCELLED, error="cancelled")
        algorithm: SearchAlgorithm[Any, Any]
        checkpoint = await self.store.load_checkpoint(sid)
        if checkpoint is None:
            algorithm, state = _start(spec)
            generation = 0
        else:
            algorithm = algorithm_for_checkpoint(checkpoint.data)
            state = algorithm.loads(checkpoint.data)
            generation = checkpoint.generation
        scope = self.workers.scope(sid)
        cancelled = False  # checked above; then the flag comes back with each step's write
        try:
            while not algorithm.is_done(state):
                if being_cancelled():  # see _maintain
                    raise asyncio.CancelledError
                if sid in self._lost:
                    raise LeaseLost(f"search {sid!r} was claimed by another orchestrator")
                if cancelled:
                    return await self._finish(sid, JobStatus.CANCELLED, error="cancelled")
                before = dataclasses.asdict(algorithm.common(state).spend)
                started = time.perf_counter()
                state = await algorithm.advance(state, scope, scope)
                generation += 1
                event = progress_event(algorithm, state, generation)
                if self.observer is not None:
                    spent = {k: v - before[k] for k, v in event["spend"].items()}
                    self.observer.step(time.perf_counter() - started, spent)
                cancelled = await self.store.record_step(
                    sid, generation, algorithm.dumps(state), json.dumps(event).encode()
                )
        except (StateStoreUnavailable, StaleWriter, LeaseLost, InvalidTransition):
            raise
        except Exception as e:  # a worker gave up, or a model produced something unusable
            log.exception("search %s failed", sid, extra={"search_id": sid})
            return await self._finish(sid, JobStatus.FAILED, error=f"{type(e).__name__}: {e}")
        result = algorithm.result(state)
        return await self._finish(
            sid,
            JobStatus.SUCCEEDED,
            result=result_to_json(result),
            spend=dataclasses.asdict(result.spend),
            final_answer=result.final_answer,
        )

    async def _finish(
        self,
        sid: str,
        status: JobStatus,
        *,
        result: str | None = None,
        error: str | None = None,
        spend: dict[str, float] | None = None,
        final_answer: str | None = None,
    ) -> JobRecord:
        record = await self.store.update_job(
            sid, status=status, result=result, error=error, spend=spend
        )
        if self.observer is not None:
            self.observer.search_finished(status)
        log.info("search %s %s", sid, status, extra={"search_id": sid, "status": str(status)})
        event = {"status": str(status), "final_answer": final_answer, "error": error}
        with contextlib.suppress(StreamClosed):
            await self.store.append_event(sid, json.dumps(event).encode(), terminal=True)
        return record

    async def _follow_to_end(self, search_id: str) -> JobRecord:
        record = await self.store.get_job(search_id)
        if record is None:
            raise JobNotFound(search_id)
        if not record.status.finished:
            async for event in self.store.follow(search_id):
                if event.terminal:
                    break
            record = await self.store.get_job(search_id)
        assert record is not None
        return record

    # -- leases and orphans ----------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Renew leases every `scan_interval_s`; look for claimable jobs as often, and at once
        when a slot frees up or a batch arrives (so queued batch items never wait a scan)."""
        renewed = 0.0
        while True:
            self._wake.clear()
            try:
                if time.monotonic() - renewed >= self.config.scan_interval_s:
                    renewed = time.monotonic()
                    await self._renew_leases()
                if self.config.resume_orphans:
                    await self._claim_orphans()
            except StateStoreUnavailable as e:
                log.warning("orchestrator %s: %s", self.owner, e)
            if being_cancelled():  # redis-py can swallow a cancel (or make it an error)
                raise asyncio.CancelledError
            # asyncio.timeout, not wait_for: in 3.11 a cancel racing wait_for's timeout turns into a
            # TimeoutError, which would be swallowed here and leave close() waiting forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.scan_interval_s):
                    await self._wake.wait()

    async def _renew_leases(self) -> None:
        for sid in list(self._running):
            try:
                await self.store.renew_lease(sid, self.owner, self.config.lease_s)
            except LeaseLost:
                if sid not in self._running:  # finished since the snapshot
                    continue
                record = await self.store.get_job(sid)
                if record is not None and record.status.finished:
                    continue  # this task just finished it and has not yet left _running
                log.warning("search %s: lease lost, stopping here", sid, extra={"search_id": sid})
                self._lost.add(sid)

    async def _claim_orphans(self) -> None:
        free = self.config.max_live - len(self._tasks)
        if free <= 0:
            return
        for record in await self.store.claim_orphans(self.owner, self.config.lease_s, free):
            if record.search_id not in self._tasks:
                log.info(
                    "resuming orphaned search %s",
                    record.search_id,
                    extra={"search_id": record.search_id},
                )
                self._spawn(record.search_id)
