"""In-process backend: the embedded default for a single process, and the reference semantics.

No method awaits between reading and writing state, so each is atomic on the event loop, as the
Redis backend's Lua scripts are on the server. Nothing here survives the process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import json
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lodestar.orchestrator.state_store.base import (
    JSON,
    BatchExists,
    BatchNotFound,
    BatchRecord,
    BatchResult,
    Checkpoint,
    JobExists,
    JobNotFound,
    JobRecord,
    JobSpec,
    JobStatus,
    LeaseLost,
    ProgressEvent,
    StaleWriter,
    StateStore,
    StoreConfig,
    StreamClosed,
    batch_counts,
    check_lease_name,
    check_search_id,
    check_single_job,
    check_transition,
    validate_batch,
    validate_lease,
    validate_read,
    validate_write,
)
from lodestar.workers.messages import ErrorKind

_Kind = Literal["search", "batch"]
"""Expiry is per record kind: a batch id may equal a search id."""


@dataclass(slots=True)
class _EventLog:
    events: deque[ProgressEvent]
    last_offset: int = 0
    closed: bool = False
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


@dataclass(slots=True)
class _Batch:
    record: BatchRecord
    items: list[str]
    """Search ids by batch_index."""
    results: list[BatchResult] = field(default_factory=list)
    counted: set[str] = field(default_factory=set)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class MemoryStateStore(StateStore):
    def __init__(
        self, config: StoreConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config or StoreConfig()
        self._clock = clock
        self._jobs: dict[str, JobRecord] = {}
        self._checkpoints: dict[str, Checkpoint] = {}
        self._logs: dict[str, _EventLog] = {}
        self._cancelled: set[str] = set()
        self._batches: dict[str, _Batch] = {}
        self._expires: dict[tuple[_Kind, str], float] = {}  # -> time.monotonic() deadline
        self._expiry_heap: list[tuple[float, _Kind, str]] = []
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (owner, expiry)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # -- checkpoints ----------------------------------------------------------------------------

    async def save_checkpoint(self, search_id: str, generation: int, data: bytes) -> None:
        validate_write(search_id, generation, data)
        self._purge()
        stored = self._checkpoints.get(search_id)
        current = stored.generation if stored else 0
        job = self._jobs.get(search_id)
        if job is not None and job.status.finished:
            raise StaleWriter(search_id, generation, current, f"job is {job.status}")
        if generation != current + 1:
            raise StaleWriter(search_id, generation, current)
        self._checkpoints[search_id] = Checkpoint(generation, data)

    async def load_checkpoint(self, search_id: str) -> Checkpoint | None:
        check_search_id(search_id)
        self._purge()
        return self._checkpoints.get(search_id)

    # -- jobs -----------------------------------------------------------------------------------

    async def create_job(self, spec: JobSpec, initial: bytes | None = None) -> JobRecord:
        check_single_job(spec, initial)
        self._purge()
        if spec.search_id in self._jobs:
            raise JobExists(spec.search_id)
        job = JobRecord(spec=spec, status=JobStatus.QUEUED, created_at=self._clock())
        self._jobs[spec.search_id] = job
        if initial is not None:  # replaces any stray one: a new job starts from its own spec
            self._checkpoints[spec.search_id] = Checkpoint(0, initial)
        return job

    async def get_job(self, search_id: str) -> JobRecord | None:
        check_search_id(search_id)
        self._purge()
        return self._jobs.get(search_id)

    async def _update_job_only(
        self,
        search_id: str,
        *,
        status: JobStatus | None = None,
        spend: Mapping[str, float] | None = None,
        result: str | None = None,
        error: str | None = None,
        error_kind: ErrorKind | None = None,
    ) -> JobRecord:
        """`update_job` without its batch step (tests use it to open the crash window)."""
        job = self._existing(search_id)
        target = JobStatus(status) if status is not None else job.status
        check_transition(search_id, job.status, target)
        now = self._clock()
        changes: dict[str, object] = {"status": target}
        if spend is not None:
            changes["spend"] = dict(spend)
        if result is not None:
            changes["result"] = result
        if error is not None:
            changes["error"] = error
        if error_kind is not None:
            changes["error_kind"] = ErrorKind(error_kind)
        if target is JobStatus.RUNNING and job.started_at is None:
            changes["started_at"] = now
        if target.finished:
            changes.update(finished_at=now, lease_expires_at=None)
            self._expire_later("search", search_id)
        job = self._jobs[search_id] = dataclasses.replace(job, **changes)
        return job

    async def list_unfinished(self) -> list[JobRecord]:
        self._purge()
        jobs = [job for job in self._jobs.values() if not job.status.finished]
        return sorted(jobs, key=lambda job: (job.created_at, job.search_id))

    async def claim_job(self, search_id: str, owner: str, lease_s: float) -> JobRecord | None:
        validate_lease(owner, lease_s)
        job = self._existing(search_id)
        now = self._clock()
        if job.status.finished or not self._claimable(job, owner, now):
            return None
        return self._claim(job, owner, now + lease_s)

    async def claim_orphans(self, owner: str, lease_s: float, limit: int = 16) -> list[JobRecord]:
        validate_lease(owner, lease_s)
        self._purge()
        now = self._clock()
        orphans = [
            job
            for job in self._jobs.values()
            if not job.status.finished and self._claimable(job, None, now)
        ]
        orphans.sort(key=lambda job: (job.lease_expires_at or job.created_at, job.search_id))
        return [self._claim(job, owner, now + lease_s) for job in orphans[:limit]]

    async def renew_lease(self, search_id: str, owner: str, lease_s: float) -> float:
        validate_lease(owner, lease_s)
        job = self._existing(search_id)
        if job.status.finished or job.owner != owner:
            holder = f"is {job.status}" if job.status.finished else f"is owned by {job.owner!r}"
            raise LeaseLost(f"job {search_id!r} {holder}")
        expires = self._clock() + lease_s
        self._jobs[search_id] = dataclasses.replace(job, lease_expires_at=expires)
        return expires

    # -- named leases ---------------------------------------------------------------------------

    async def hold_lease(self, name: str, owner: str, lease_s: float) -> bool:
        check_lease_name(name)
        validate_lease(owner, lease_s)
        now = self._clock()
        holder, expires = self._leases.get(name, ("", 0.0))
        if holder not in ("", owner) and expires > now:
            return False
        self._leases[name] = (owner, now + lease_s)
        return True

    async def release_lease(self, name: str, owner: str) -> None:
        check_lease_name(name)
        if self._leases.get(name, ("", 0.0))[0] == owner:
            del self._leases[name]

    # -- progress events ------------------------------------------------------------------------

    async def append_event(self, search_id: str, data: bytes, *, terminal: bool = False) -> int:
        check_search_id(search_id)
        if not isinstance(data, bytes):
            raise TypeError(f"event data must be bytes, got {type(data).__name__}")
        self._purge()
        log = self._log(search_id)
        if log.closed:
            raise StreamClosed(f"search {search_id!r} already published its terminal event")
        log.last_offset += 1
        log.events.append(ProgressEvent(log.last_offset, data, terminal))
        log.closed = terminal
        async with log.changed:
            log.changed.notify_all()
        return log.last_offset

    async def read_events(
        self, search_id: str, after: int = 0, *, limit: int = 100, wait_s: float = 0.0
    ) -> list[ProgressEvent]:
        check_search_id(search_id)
        validate_read(after, limit, wait_s)
        self._purge()
        log = self._logs.get(search_id)
        if (log is None or log.last_offset <= after) and wait_s > 0:
            log = self._log(search_id)
            async with log.changed:
                try:
                    async with asyncio.timeout(wait_s):  # unlike wait_for, never eats a cancel
                        await log.changed.wait_for(lambda: log.last_offset > after)
                except TimeoutError:
                    return []
        if log is None:
            return []
        return [event for event in log.events if event.offset > after][:limit]

    # -- cancellation ---------------------------------------------------------------------------

    async def request_cancel(self, search_id: str) -> None:
        check_search_id(search_id)
        self._purge()
        self._cancelled.add(search_id)

    async def is_cancelled(self, search_id: str) -> bool:
        check_search_id(search_id)
        self._purge()
        return search_id in self._cancelled

    # -- batches -------------------------------------------------------------------------------

    async def create_batch(
        self,
        batch_id: str,
        settings: JSON,
        specs: Sequence[JobSpec],
        initial: Sequence[bytes] | None = None,
    ) -> BatchRecord:
        specs = list(specs)
        validate_batch(batch_id, specs, initial)
        settings = json.loads(json.dumps(settings))  # what Redis would give back
        self._purge()
        if batch_id in self._batches:
            raise BatchExists(batch_id)
        for spec in specs:  # every check before the first write: all or nothing
            if spec.search_id in self._jobs:
                raise JobExists(spec.search_id)
        now = self._clock()
        for i, spec in enumerate(specs):
            self._jobs[spec.search_id] = JobRecord(spec, JobStatus.QUEUED, created_at=now)
            if initial is not None:
                self._checkpoints[spec.search_id] = Checkpoint(0, initial[i])
        record = BatchRecord(batch_id, len(specs), settings, now, batch_counts())
        self._batches[batch_id] = _Batch(record, [spec.search_id for spec in specs])
        return record

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        check_search_id(batch_id)
        self._purge()
        batch = self._batches.get(batch_id)
        return batch.record if batch else None

    async def read_batch_results(
        self, batch_id: str, after: int = 0, *, limit: int = 100, wait_s: float = 0.0
    ) -> list[BatchResult]:
        validate_read(after, limit, wait_s)
        batch = self._existing_batch(batch_id)
        if len(batch.results) <= after and wait_s > 0:
            async with batch.changed:
                try:
                    async with asyncio.timeout(wait_s):  # unlike wait_for, never eats a cancel
                        await batch.changed.wait_for(lambda: len(batch.results) > after)
                except TimeoutError:
                    return []
        return batch.results[after : after + limit]  # offset n sits at position n - 1

    async def reconcile_batch(self, batch_id: str) -> BatchRecord:
        batch = self._existing_batch(batch_id)
        for search_id in batch.items:
            job = self._jobs.get(search_id)
            if job is not None and job.status.finished and search_id not in batch.counted:
                await self._finish_batch_item(job)
        return batch.record

    async def cancel_batch(self, batch_id: str, terminal_event: bytes) -> BatchRecord:
        if not isinstance(terminal_event, bytes):
            raise TypeError(f"event data must be bytes, got {type(terminal_event).__name__}")
        batch = self._existing_batch(batch_id)
        for search_id in batch.items:
            job = self._jobs.get(search_id)
            if job is None:
                continue
            if job.status.finished:  # counted if it was not, as reconcile_batch does
                await self._finish_batch_item(job)
            elif job.status is not JobStatus.QUEUED:  # running: its orchestrator stops it
                self._cancelled.add(search_id)
            else:
                await self.update_job(
                    search_id,
                    status=JobStatus.CANCELLED,
                    error="cancelled",
                    error_kind=ErrorKind.CANCELLED,
                )
                if not self._log(search_id).closed:
                    await self.append_event(search_id, terminal_event, terminal=True)
        return batch.record

    async def open_batch_items(self) -> int:
        self._purge()
        records = [batch.record for batch in self._batches.values()]
        return sum(r.size - r.finished for r in records if not r.done)

    async def _finish_batch_item(self, job: JobRecord) -> bool:
        """Count a finished item in its batch, once; True if this call counted it."""
        batch_id, index = job.spec.batch_id, job.spec.batch_index
        self._purge()
        batch = self._batches.get(batch_id) if batch_id is not None else None
        if batch is None or index is None or not job.status.finished:
            return False
        if index >= len(batch.items) or batch.items[index] != job.search_id:
            return False
        if job.search_id in batch.counted:
            return False
        batch.counted.add(job.search_id)
        counts = dict(batch.record.counts)
        counts[job.status.value] += 1
        batch.record = dataclasses.replace(batch.record, counts=counts)
        offset = len(batch.results) + 1
        batch.results.append(BatchResult(offset, job.search_id, index, job.status))
        if batch.record.done:
            self._expire_later("batch", batch.record.batch_id)
        async with batch.changed:
            batch.changed.notify_all()
        return True

    def _existing_batch(self, batch_id: str) -> _Batch:
        check_search_id(batch_id)
        self._purge()
        batch = self._batches.get(batch_id)
        if batch is None:
            raise BatchNotFound(batch_id)
        return batch

    # -- internals ------------------------------------------------------------------------------

    def _existing(self, search_id: str) -> JobRecord:
        check_search_id(search_id)
        self._purge()
        job = self._jobs.get(search_id)
        if job is None:
            raise JobNotFound(search_id)
        return job

    @staticmethod
    def _claimable(job: JobRecord, owner: str | None, now: float) -> bool:
        expired = job.lease_expires_at is None or job.lease_expires_at <= now
        return expired or job.owner == owner

    def _claim(self, job: JobRecord, owner: str, expires: float) -> JobRecord:
        changes: dict[str, object] = {"owner": owner, "lease_expires_at": expires}
        if job.status is JobStatus.QUEUED:
            changes.update(status=JobStatus.RUNNING, started_at=job.started_at or self._clock())
        job = self._jobs[job.search_id] = dataclasses.replace(job, **changes)
        return job

    def _log(self, search_id: str) -> _EventLog:
        log = self._logs.get(search_id)
        if log is None:
            log = self._logs[search_id] = _EventLog(deque(maxlen=self.config.events_maxlen))
        return log

    def _expire_later(self, kind: _Kind, key: str) -> None:
        deadline = time.monotonic() + self.config.finished_ttl_s
        self._expires[kind, key] = deadline
        heapq.heappush(self._expiry_heap, (deadline, kind, key))

    def _purge(self) -> None:
        """Drop every search and batch whose TTL has run out (what Redis does with expiring
        keys)."""
        now = time.monotonic()
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            deadline, kind, key = heapq.heappop(self._expiry_heap)
            if self._expires.get((kind, key)) != deadline:
                continue
            del self._expires[kind, key]
            if kind == "batch":
                self._batches.pop(key, None)
                continue
            search_id = key
            self._jobs.pop(search_id, None)
            self._checkpoints.pop(search_id, None)
            self._logs.pop(search_id, None)
            self._cancelled.discard(search_id)
