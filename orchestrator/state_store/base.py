"""The search-state store: what the distributed runtime keeps outside any one process.

One search (keyed by its search id) owns a job record, a checkpoint, a progress-event log and a
cancellation flag. Every backend implements `StateStore` with the same semantics, so the memory
backend (one process) and the Redis backend (many orchestrators) pass the same tests.

Contracts shared by both backends:

- Checkpoints are compare-and-set on a generation counter. Generation 0, the initial state the
  spec was validated by, is written with the job in one atomic step (`create_job`,
  `create_batch`), so no orchestrator builds it again; a search without a checkpoint (a job an
  older version stored) is at generation 0 too. `save_checkpoint(g)` succeeds only when
  `g == stored + 1`, otherwise it raises `StaleWriter`. Raising (not returning False) means a
  stale orchestrator cannot ignore the loss.
- Job status moves queued -> running -> succeeded | failed | cancelled (queued may also go
  straight to failed or cancelled). A finished job is immutable, and after it finishes every key
  of the search expires after `finished_ttl_s`.
- A job is *claimable* when it is unfinished and its lease is absent or expired; claims are
  atomic, so two orchestrators never both win the same job.
- Progress events get offsets 1, 2, 3, ... per search; a terminal event closes the log.
- Any failure to reach the backing service raises `StateStoreUnavailable` within bounded time.

Batches (SubmitBatch/GetBatch) are a second record kind beside jobs: many searches submitted
together and followed as one unit. Their methods sit on `StateStore` itself (every backend must
implement them), and their contract is:

- `create_batch` creates the batch record and one queued job per item, each with its
  generation-0 checkpoint, all or nothing: a taken batch id (`BatchExists`) or search id
  (`JobExists`) leaves no record, job or checkpoint behind. Items
  carry `batch_id` / `batch_index` in their `JobSpec`; `create_job` refuses such specs, so every
  job naming a batch is one of its items.
- When an item's job finishes (`update_job`), the batch counts it by terminal status and appends
  a `BatchResult` to its result log (offsets 1, 2, 3, ... in finish order), exactly once per job:
  a retried `update_job` (InvalidTransition on the finished job) re-runs the idempotent batch step
  instead of counting twice. Where that step is a separate write (Redis), a crash between the two
  leaves the batch one short until `reconcile_batch` recounts from the jobs.
- Once every item has finished, the batch's keys expire after `finished_ttl_s`, like a job's.
- `cancel_batch` finishes the still-queued items as cancelled in the store itself (no
  orchestrator claims them first) and flags the running ones, which their orchestrators stop.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, NamedTuple, Self

from lodestar.workers.messages import ErrorKind

JSON = Any
"""A JSON-serialisable value (dict, list, str, number, bool or None)."""


class StateStoreError(Exception):
    """Base of every error the store raises on purpose."""


class StateStoreUnavailable(StateStoreError):
    """The backing service cannot be reached (outage, timeout, pool exhausted).

    A write that raised it may or may not have landed (the reply, not the request, may be what
    was lost): re-read to find out, e.g. the generation `load_checkpoint` returns."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"state store unavailable: {detail}")


class StaleWriter(StateStoreError):
    """A checkpoint write lost the compare-and-set: someone else owns this search's progress."""

    def __init__(self, search_id: str, generation: int, stored: int, reason: str = "") -> None:
        why = reason or f"expected generation {stored + 1}"
        super().__init__(
            f"stale checkpoint for search {search_id!r}: generation {generation} rejected, "
            f"stored generation is {stored} ({why})"
        )
        self.search_id = search_id
        self.generation = generation
        self.stored = stored


class JobNotFound(StateStoreError, KeyError):
    def __init__(self, search_id: str) -> None:
        super().__init__(f"no job for search {search_id!r}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class JobExists(StateStoreError):
    def __init__(self, search_id: str) -> None:
        super().__init__(f"a job for search {search_id!r} already exists")
        self.search_id = search_id


class BatchNotFound(StateStoreError, KeyError):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch {batch_id!r}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class BatchExists(StateStoreError):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"a batch {batch_id!r} already exists")
        self.batch_id = batch_id


class InvalidTransition(StateStoreError):
    """A status change the lifecycle forbids, or any change to a finished job."""


class LeaseLost(StateStoreError):
    """The caller no longer owns the job (claimed by another orchestrator, or finished)."""


class StreamClosed(StateStoreError):
    """An event was appended after the search's terminal event."""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

ALLOWED_FROM: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.QUEUED}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.SUCCEEDED: frozenset({JobStatus.RUNNING}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED, JobStatus.RUNNING}),
}
"""For each target status, the statuses a job may be in before it (same status = field update)."""


def check_transition(search_id: str, current: JobStatus, target: JobStatus) -> None:
    if current.finished:
        raise InvalidTransition(f"job {search_id!r} is finished ({current}) and immutable")
    if current not in ALLOWED_FROM[target]:
        raise InvalidTransition(f"job {search_id!r}: {current} -> {target} is not allowed")


MAX_ID_CHARS = 128
_SEARCH_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_CHARS}}}")


def check_search_id(search_id: str) -> str:
    """Ids become Redis hash tags, so braces (and anything exotic) are refused at the edge."""
    if not isinstance(search_id, str) or not _SEARCH_ID.fullmatch(search_id):
        raise ValueError(f"search id must match {_SEARCH_ID.pattern}, got {search_id!r}")
    return search_id


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a search was asked to do; fixed when the job is created."""

    search_id: str
    algorithm: str
    params: dict[str, JSON]
    problem: JSON
    seed: int
    budget: dict[str, JSON] | None = None
    batch_id: str | None = None
    """The batch this search is an item of (set by the service for SubmitBatch items)."""
    batch_index: int | None = None
    """The item's 0-based position in its batch; set exactly when `batch_id` is."""

    def __post_init__(self) -> None:
        if (self.batch_id is None) != (self.batch_index is None):
            raise ValueError("batch_id and batch_index must be both set or both None")
        index = self.batch_index
        if index is not None and (type(index) is not int or index < 0):
            raise ValueError(f"batch_index must be an int >= 0, got {index!r}")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as stored: its spec plus its lifecycle. Times are store-clock epoch seconds."""

    spec: JobSpec
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    owner: str | None = None
    """Id of the orchestrator that runs (or last ran) the search."""
    lease_expires_at: float | None = None
    spend: dict[str, float] = field(default_factory=dict)
    result: str | None = None
    """JSON text of the search result, opaque to the store."""
    error: str | None = None
    """A short, client-safe message (the detail is in the server's log)."""
    error_kind: ErrorKind | None = None
    """Why the search failed or was cancelled; the service maps it to a status code."""

    @property
    def search_id(self) -> str:
        return self.spec.search_id


class Checkpoint(NamedTuple):
    generation: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    offset: int
    """1-based position in the search's event log; read_events(after=offset) continues after it."""
    data: bytes
    terminal: bool = False


BATCH_COUNTED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
"""The statuses a batch counts its finished items by, in `BatchRecord.counts` order."""


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """A batch as stored: its size and shared settings, and how many of its items have finished."""

    batch_id: str
    size: int
    settings: JSON
    """Settings every item shares, stored for the service and returned as given (opaque here)."""
    created_at: float
    counts: dict[str, int]
    """Finished items by terminal status name; always holds every status of `BATCH_COUNTED`."""

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> bool:
        return self.finished == self.size


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One finished item, as the batch's result log records it."""

    offset: int
    """1-based position in the batch's result log (finish order); read after it to continue."""
    search_id: str
    index: int
    """The item's `batch_index`."""
    status: JobStatus


def batch_counts(counts: Mapping[str, int] | None = None) -> dict[str, int]:
    """`counts` with every counted status present (absent ones are 0)."""
    counts = counts or {}
    return {status.value: int(counts.get(status.value, 0)) for status in BATCH_COUNTED}


@dataclass(frozen=True)
class StoreConfig:
    """Settings every backend shares. Validated here, trusted below."""

    finished_ttl_s: float = 24 * 3600.0
    """How long a finished search's keys live before they expire."""
    events_maxlen: int = 10_000
    """Events kept per search; older ones are trimmed (a reader sees a gap in offsets)."""

    def __post_init__(self) -> None:
        if self.finished_ttl_s <= 0:
            raise ValueError("finished_ttl_s must be > 0")
        if self.events_maxlen < 1:
            raise ValueError("events_maxlen must be >= 1")


class StateStore(ABC):
    """Async store of jobs, checkpoints, progress events and cancellation flags, per search, and
    of batch records over many searches."""

    # -- lifecycle ------------------------------------------------------------------------------

    @abstractmethod
    async def ping(self) -> None:
        """Return when the store answers; raise `StateStoreUnavailable` otherwise."""

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- checkpoints ----------------------------------------------------------------------------

    @abstractmethod
    async def save_checkpoint(self, search_id: str, generation: int, data: bytes) -> None:
        """Store `data` as `generation` iff it is the stored generation + 1 and the job (if any)
        is unfinished; raise `StaleWriter` otherwise."""

    async def record_step(self, search_id: str, generation: int, data: bytes, event: bytes) -> bool:
        """What the orchestrator writes after each step: `save_checkpoint`, then a progress
        event, then `is_cancelled`. Backends that can do it in one round trip override this, and
        then the checkpoint and its event land together or not at all. Returns the cancel flag."""
        await self.save_checkpoint(search_id, generation, data)
        await self.append_event(search_id, event)
        return await self.is_cancelled(search_id)

    @abstractmethod
    async def load_checkpoint(self, search_id: str) -> Checkpoint | None: ...

    # -- jobs -----------------------------------------------------------------------------------

    @abstractmethod
    async def create_job(self, spec: JobSpec, initial: bytes | None = None) -> JobRecord:
        """Create a queued, unowned job and, atomically with it, `initial` as its generation-0
        checkpoint (None: no checkpoint); raise `JobExists` if the search id is taken."""

    @abstractmethod
    async def get_job(self, search_id: str) -> JobRecord | None: ...

    async def update_job(
        self,
        search_id: str,
        *,
        status: JobStatus | None = None,
        spend: Mapping[str, float] | None = None,
        result: str | None = None,
        error: str | None = None,
        error_kind: ErrorKind | None = None,
    ) -> JobRecord:
        """Change status and/or fields; None leaves a field as it is.

        Raises `JobNotFound`, or `InvalidTransition` for a forbidden status change or any change
        to a finished job. Finishing releases the lease and starts the TTL of the search's keys.
        """
        try:
            job = await self._update_job_only(
                search_id,
                status=status,
                spend=spend,
                result=result,
                error=error,
                error_kind=error_kind,
            )
        except InvalidTransition:
            # Perhaps a retry whose first try finished the job, then lost its batch step.
            finished = await self.get_job(search_id)
            if finished is not None and finished.status.finished:
                await self._finish_batch_item(finished)
            raise
        if job.status.finished:
            await self._finish_batch_item(job)
        return job

    @abstractmethod
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
        """`update_job` without its batch step (tests call it to open the crash window)."""

    @abstractmethod
    async def _finish_batch_item(self, job: JobRecord) -> bool:
        """The batch half of finishing a job: count it once in its batch; True if this call
        counted it."""

    @abstractmethod
    async def list_unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first."""

    @abstractmethod
    async def claim_job(self, search_id: str, owner: str, lease_s: float) -> JobRecord | None:
        """Take (or renew) ownership if the job is claimable or already `owner`'s.

        A queued job becomes running. Returns None when another owner holds an unexpired lease
        or the job is finished; raises `JobNotFound` when there is no job.
        """

    @abstractmethod
    async def claim_orphans(self, owner: str, lease_s: float, limit: int = 16) -> list[JobRecord]:
        """Claim up to `limit` claimable jobs: never-claimed ones and those whose owner stopped
        renewing. Jobs `owner` itself let expire come back too; callers dedupe by search id."""

    @abstractmethod
    async def renew_lease(self, search_id: str, owner: str, lease_s: float) -> float:
        """Extend `owner`'s lease to now + lease_s and return the new expiry.

        Raises `LeaseLost` when another owner has claimed the job or it has finished."""

    # -- named leases ---------------------------------------------------------------------------

    @abstractmethod
    async def hold_lease(self, name: str, owner: str, lease_s: float) -> bool:
        """Take the lease `name` (e.g. "fleet:demo:owner": one gateway at a time reconciles a
        model fleet) or renew it if `owner` holds it, for `lease_s`; False while another owner
        holds it. One holder at a time, as long as holders renew within `lease_s`."""

    @abstractmethod
    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up now if `owner` holds it (another owner may take it at once)."""

    # -- progress events ------------------------------------------------------------------------

    @abstractmethod
    async def append_event(self, search_id: str, data: bytes, *, terminal: bool = False) -> int:
        """Append one event and return its offset; raise `StreamClosed` after a terminal one."""

    @abstractmethod
    async def read_events(
        self, search_id: str, after: int = 0, *, limit: int = 100, wait_s: float = 0.0
    ) -> list[ProgressEvent]:
        """Events with offset > `after`, oldest first, at most `limit`.

        With `wait_s > 0` and nothing to return yet, wait up to `wait_s` for the next event;
        an empty list means the wait timed out.
        """

    async def follow(
        self, search_id: str, after: int = 0, *, wait_s: float = 5.0
    ) -> AsyncIterator[ProgressEvent]:
        """Every event after `after` as it arrives, ending with the terminal event."""
        while True:
            for event in await self.read_events(search_id, after, wait_s=wait_s):
                yield event
                if event.terminal:
                    return
                after = event.offset

    # -- cancellation ---------------------------------------------------------------------------

    @abstractmethod
    async def request_cancel(self, search_id: str) -> None:
        """Flag the search for cancellation; its orchestrator polls `is_cancelled` each step."""

    @abstractmethod
    async def is_cancelled(self, search_id: str) -> bool: ...

    # -- batches --------------------------------------------------------------------------------

    @abstractmethod
    async def create_batch(
        self,
        batch_id: str,
        settings: JSON,
        specs: Sequence[JobSpec],
        initial: Sequence[bytes] | None = None,
    ) -> BatchRecord:
        """Create the batch record and one queued job per spec, with `initial[i]` as item i's
        generation-0 checkpoint (as `create_job`), all or nothing.

        Spec i must carry `batch_id` and `batch_index == i`, and `initial` (if given) must have
        one bytes value per spec (else `ValueError`). Raises
        `BatchExists` or `JobExists` when an id is taken, leaving nothing new behind. The jobs are
        ordinary jobs from then on (`list_unfinished`, `claim_orphans`, ...).
        """

    @abstractmethod
    async def get_batch(self, batch_id: str) -> BatchRecord | None: ...

    @abstractmethod
    async def read_batch_results(
        self, batch_id: str, after: int = 0, *, limit: int = 100, wait_s: float = 0.0
    ) -> list[BatchResult]:
        """Finished items with offset > `after`, in finish order, at most `limit`.

        Waits like `read_events` (up to `wait_s` for the next one; empty when it timed out).
        Raises `BatchNotFound` for an unknown (or expired) batch.
        """

    @abstractmethod
    async def reconcile_batch(self, batch_id: str) -> BatchRecord:
        """Count every finished item the batch has missed (read from the jobs themselves) and
        return the repaired record. Idempotent; the repair for a crash between a job finishing
        and its batch step. Raises `BatchNotFound`."""

    @abstractmethod
    async def cancel_batch(self, batch_id: str, terminal_event: bytes) -> BatchRecord:
        """Cancel every unfinished item: a queued one finishes cancelled at once (error
        "cancelled", kind CANCELLED, `terminal_event` closing its event log, counted in the
        batch), so no orchestrator ever starts it; a running one is flagged (`request_cancel`)
        and its orchestrator stops it before its next step. Finished items stay as they are
        (one that finished uncounted is counted, as `reconcile_batch` would). Idempotent;
        returns the record as it is then. Raises `BatchNotFound`."""

    @abstractmethod
    async def open_batch_items(self) -> int:
        """Items of every batch that is not done and that have not finished (queued or
        running), over the whole store: what the service's `max_queued_batch_items` bounds.
        Concurrent `create_batch` calls are not serialised against it."""


def validate_write(search_id: str, generation: int, data: bytes) -> None:
    check_search_id(search_id)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise ValueError(f"generation must be an int >= 1, got {generation!r}")
    if not isinstance(data, bytes):
        raise TypeError(f"checkpoint data must be bytes, got {type(data).__name__}")


def validate_lease(owner: str, lease_s: float) -> None:
    if not owner:
        raise ValueError("owner must be a non-empty orchestrator id")
    if not lease_s > 0:
        raise ValueError("lease_s must be > 0")


def check_lease_name(name: str) -> str:
    if not name or any(c in name for c in "{} "):
        raise ValueError(f"lease name must be non-empty, without braces or spaces: {name!r}")
    return name


def validate_batch(
    batch_id: str, specs: Sequence[JobSpec], initial: Sequence[bytes] | None = None
) -> None:
    """Refuse a batch whose items do not name it, in order, with distinct valid search ids (the
    finish step trusts `batch_index` and the search id to find an item), or whose initial
    checkpoints are not one per item."""
    check_search_id(batch_id)
    if not specs:
        raise ValueError(f"batch {batch_id!r} has no items")
    if initial is not None and len(initial) != len(specs):
        raise ValueError(f"{len(initial)} initial checkpoints for {len(specs)} items")
    for data in initial or ():
        check_data(data)
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        check_search_id(spec.search_id)
        if spec.batch_id != batch_id or spec.batch_index != i:
            raise ValueError(
                f"item {i} of batch {batch_id!r} must have batch_id={batch_id!r} and "
                f"batch_index={i}, got {spec.batch_id!r} and {spec.batch_index!r}"
            )
        if spec.search_id in seen:
            raise ValueError(f"search id {spec.search_id!r} appears twice in batch {batch_id!r}")
        seen.add(spec.search_id)


def check_data(data: bytes | None) -> None:
    """Checkpoint data is bytes (None: no checkpoint)."""
    if data is not None and not isinstance(data, bytes):
        raise TypeError(f"checkpoint data must be bytes, got {type(data).__name__}")


def check_single_job(spec: JobSpec, initial: bytes | None = None) -> None:
    """`create_job` is for lone searches: a batch item made outside `create_batch` would be
    counted by a batch that never listed it."""
    check_search_id(spec.search_id)
    check_data(initial)
    if spec.batch_id is not None:
        raise ValueError(
            f"search {spec.search_id!r} names batch {spec.batch_id!r}: use create_batch"
        )


def validate_read(after: int, limit: int, wait_s: float) -> None:
    if after < 0 or limit < 1 or wait_s < 0:
        raise ValueError("need after >= 0, limit >= 1 and wait_s >= 0")
