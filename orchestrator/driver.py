"""The orchestrator: runs the searches of a state store on a set of workers, one step at a time.

Every accepted search is a job in the store and an asyncio task here. `submit` validates the
spec by building the algorithm's initial state and stores it with the job as generation 0, so a
task claims its job (a lease) and loads the latest checkpoint, never rebuilding it, then loops:
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

Shutdown is `drain`: nothing new is accepted or claimed, live searches stop after their current
step and their leases are handed back, so another orchestrator resumes them from the newest
checkpoint at its next scan; `close` then stops what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lodestar.orchestrator.algorithms.base import SearchAlgorithm
from lodestar.orchestrator.algorithms.registry import (
    ParamError,
    algorithm_for_checkpoint,
    start_search,
)
from lodestar.orchestrator.algorithms.state import BudgetExhausted, SearchResult
from lodestar.orchestrator.batching import Workers
from lodestar.orchestrator.errors import DeadlineExceeded, SearchError, client_message
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
from lodestar.workers.intake import ProblemIntake, ProblemRefused
from lodestar.workers.messages import ErrorKind, Prompt, prompt_from_json

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The orchestrator's queue is full; nothing was stored. Retry later or elsewhere."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"overloaded: {limit} searches already accepted and unfinished")
        self.limit = limit


class ShuttingDown(SearchError):
    """This orchestrator is draining (its server is stopping): it takes no new work, and a live
    search stops after its current step, checkpointed, for another orchestrator to resume. The
    service answers UNAVAILABLE: retry on another server, where an accepted search goes on."""

    kind = ErrorKind.UNAVAILABLE


DRAINED_MESSAGE = (
    "the server is shutting down: the search stopped at its last checkpoint and another "
    "server resumes it (follow it there with GetSearch)"
)
HAND_BACK_S = 0.001
"""Lease left on a search drained here: it expires at once, so another orchestrator claims the
search at its next scan instead of `lease_s` later."""
DRAIN_BOUND_S = 1.0
"""What a drain may take beyond its timeout: for steps cut at the timeout to unwind, and again
for the leases to be handed back (each bounded, so an unreachable store cannot stretch it)."""


class ItemsRefused(ParamError):
    """Batch items that cannot be served, all of them at once as (field, message), so a client
    can drop them and resubmit the rest; nothing was stored."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        first, message = violations[0]
        more = f" (and {len(violations) - 1} more items)" if len(violations) > 1 else ""
        super().__init__(first, message + more)
        self.violations = violations


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


def _initial_checkpoint(spec: JobSpec, problem: Prompt | None = None) -> bytes:
    """Validate a job's spec in full by building the algorithm's initial state (on `problem`
    when given, else the spec's); returns it serialised, the job's generation-0 checkpoint."""
    try:
        problem = prompt_from_json(spec.problem) if problem is None else problem
    except ValueError as e:
        raise ParamError("problem", str(e)) from None
    algorithm, state = start_search(spec.algorithm, problem, spec.params, spec.seed, spec.budget)
    return algorithm.dumps(state)


INTERNAL_MESSAGE = "the search failed on the server; its log has the detail under the search id"
"""What a client reads for a failure that is not its own (no traceback, host or path)."""


def failure_of(error: BaseException) -> tuple[ErrorKind, str]:
    """The kind and client-safe message a job records for an exception that ended it."""
    if isinstance(error, SearchError):
        return error.kind, error.message
    if isinstance(error, BudgetExhausted):
        return ErrorKind.RESOURCE_EXHAUSTED, client_message(str(error))
    return ErrorKind.INTERNAL, INTERNAL_MESSAGE


def being_cancelled() -> bool:
    """True while the current task has a cancel pending (one an except clause may have eaten)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def terminal_event(
    status: JobStatus, final_answer: str | None, error: str | None, kind: ErrorKind | None
) -> bytes:
    """The last event of a search's stream: how it ended (what a follower waits for)."""
    doc = {"status": str(status), "final_answer": final_answer, "error": error, "error_kind": kind}
    return json.dumps(doc).encode()


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
        intake: ProblemIntake | None = None,
    ) -> None:
        self.store = store
        self.workers = workers
        self.config = config or OrchestratorConfig()
        self.observer = observer
        self.intake = intake
        """Checks each problem against the served models at submit (None: only the spec)."""
        self._deadlines: dict[str, float] = {}
        """Loop-clock deadlines of searches submitted here with one."""
        self._interrupts: dict[str, asyncio.Event] = {}
        """Set to stop a live search's current step at once (cancel), not after it."""
        self._slots = asyncio.Semaphore(self.config.max_live)
        self._tasks: dict[str, asyncio.Task[JobRecord]] = {}
        self._running: set[str] = set()
        self._lost: set[str] = set()
        """Live searches whose lease another orchestrator took; they stop at the next step."""
        self._wake = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None
        self._draining = False
        self._parked: set[str] = set()
        """Searches a drain stopped here unfinished: their leases are handed back."""

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

    @property
    def draining(self) -> bool:
        """True from the start of `drain`: the server is stopping, not the clients leaving."""
        return self._draining

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

    async def drain(self, timeout_s: float) -> list[str]:
        """Stop for a shutdown, leaving nothing half-done: from now on no search is accepted
        (`ShuttingDown`) or claimed here; each live search stops after its current step, so the
        store holds its newest checkpoint (a step still running after `timeout_s` is cut: the
        step before it is the checkpoint); its waiters get `ShuttingDown`. The leases of the
        searches left unfinished are then handed back, so another orchestrator resumes them at
        its next scan. Returns within `timeout_s` + 2 * DRAIN_BOUND_S with their ids."""
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._tasks and (remaining := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._tasks.values()), timeout=remaining)
        late = list(self._tasks.values())
        for task in late:  # mid-step at the deadline
            self._parked.add(task.get_name().removeprefix("search-"))
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=DRAIN_BOUND_S)
        if self._maintainer is not None:  # it renewed the leases until now; it must not after
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
            self._maintainer = None
        parked = sorted(self._parked)
        await self._hand_back(parked)
        log.info("orchestrator %s drained: %d searches left to resume", self.owner, len(parked))
        return parked

    async def _hand_back(self, search_ids: Sequence[str]) -> None:
        """Shorten this owner's leases of `search_ids` to expire now (one it no longer holds is
        left alone); bounded by DRAIN_BOUND_S in all."""

        async def one(search_id: str) -> None:
            with contextlib.suppress(LeaseLost, JobNotFound):
                await self.store.renew_lease(search_id, self.owner, HAND_BACK_S)

        try:
            async with asyncio.timeout(DRAIN_BOUND_S):
                await asyncio.gather(*(one(s) for s in search_ids), return_exceptions=True)
        except TimeoutError:
            log.warning("orchestrator %s: leases not all handed back in time", self.owner)

    # -- the API ---------------------------------------------------------------------------------

    def check(self, spec: JobSpec) -> bytes:
        """Everything that can be checked before a search is stored: the spec (parameters,
        budget, seed) and the problem against the served models. Raises `ParamError`. Returns
        the generation-0 checkpoint the check built, which submit stores with the job.

        The checkpoint's problem is the one the intake admits, which for the shipped arithmetic
        models is the canonical expression (`what is 2 + 3?` is searched as `2+3`); the job's
        spec keeps the client's own text, which is all the API reports back."""
        initial = _initial_checkpoint(spec)
        if self.intake is not None:
            sent = prompt_from_json(spec.problem)
            try:
                admitted = self.intake.admit(sent)
            except ProblemRefused as e:
                raise ParamError(e.field, e.message) from None
            if admitted != sent:
                initial = _initial_checkpoint(spec, admitted)
        return initial

    async def submit(self, spec: JobSpec, timeout_s: float | None = None) -> JobRecord:
        """Validate, store and schedule a search. Raises `ParamError` (bad request, nothing
        stored), `Overloaded`, `JobExists` or `StateStoreUnavailable`. With `timeout_s`, a
        search still running then stops at once: CANCELLED, kind DEADLINE_EXCEEDED."""
        if self._draining:
            raise ShuttingDown("the server is shutting down: submit to another server")
        initial = self.check(spec)
        limit = self.config.max_live + self.config.max_queued
        if self.accepted >= limit:
            raise Overloaded(limit)
        record = await self.store.create_job(spec, initial)
        log.info(
            "search %s accepted (%s)",
            spec.search_id,
            spec.algorithm,
            extra={"search_id": spec.search_id},
        )
        if timeout_s is not None:
            self._deadlines[spec.search_id] = asyncio.get_running_loop().time() + timeout_s
        self._spawn(spec.search_id)
        return record

    async def submit_batch(
        self, batch_id: str, settings: Any, specs: Sequence[JobSpec]
    ) -> BatchRecord:
        """Validate every item, then store the batch and its queued jobs, each with its
        generation-0 checkpoint, in one go. Items are not admitted here: every orchestrator of
        the store claims them as it has free slots. Raises `ItemsRefused` (every bad item's
        `items[i].problem`), `ParamError` (a shared field), `BatchExists`, `JobExists`."""
        if self._draining:
            raise ShuttingDown("the server is shutting down: submit to another server")
        refused: list[tuple[str, str]] = []
        initial: list[bytes] = []
        for i, spec in enumerate(specs):
            try:
                initial.append(self.check(spec))
            except ParamError as e:  # the item's own fields get its index; shared ones do not
                if e.field.split(".")[0] not in ("problem", "seed"):
                    raise
                refused.append((f"items[{i}].{e.field}", e.message))
        if refused:
            raise ItemsRefused(refused)
        record = await self.store.create_batch(batch_id, settings, specs, initial)
        log.info("batch %s accepted (%d items)", batch_id, len(specs), extra={"batch_id": batch_id})
        self._wake.set()
        return record

    async def cancel(self, search_id: str) -> JobRecord:
        """Flag the search; it stops before its next step (a queued one never starts). Returns
        the job as it is now (raises `JobNotFound`)."""
        await self.store.request_cancel(search_id)
        if (interrupt := self._interrupts.get(search_id)) is not None:
            interrupt.set()  # running here: its requests leave the workers' queues now
        record = await self.store.get_job(search_id)
        if record is None:
            raise JobNotFound(search_id)
        return record

    async def cancel_batch(self, batch_id: str) -> BatchRecord:
        """Cancel every unfinished item of a batch, wherever it runs: a queued item finishes
        cancelled now and never starts, a running one stops before its next step (as `cancel`
        flags it). Returns the batch as it is now (raises `BatchNotFound`)."""
        event = terminal_event(JobStatus.CANCELLED, None, "cancelled", ErrorKind.CANCELLED)
        record = await self.store.cancel_batch(batch_id, event)
        log.info("batch %s cancelled", batch_id, extra={"batch_id": batch_id})
        return record

    async def wait(self, search_id: str) -> JobRecord:
        """The job once finished. Follows a search run elsewhere through its progress events."""
        task = self._tasks.get(search_id)
        if task is not None:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled() and self._draining and not being_cancelled():
                    raise ShuttingDown(DRAINED_MESSAGE) from None  # cut mid-step by the drain
                raise
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
        self._deadlines.pop(search_id, None)
        self._wake.set()  # a slot is free: claim queued work now
        error = None if task.cancelled() else task.exception()  # retrieved: waiters re-raise
        if error is not None and not isinstance(error, ShuttingDown):  # a drain logs its own
            log.warning("search %s: %s", search_id, error, extra={"search_id": search_id})

    async def _run(self, search_id: str) -> JobRecord:
        async with self._slots:
            if self._draining:  # never claimed here (claim_orphans' claims are handed back)
                self._parked.add(search_id)
                raise ShuttingDown(DRAINED_MESSAGE)
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
            except ShuttingDown:
                self._parked.add(search_id)
                raise
            finally:
                self._running.discard(search_id)
                with contextlib.suppress(Exception):
                    await self.workers.release(search_id)

    async def _drive(self, record: JobRecord) -> JobRecord:
        sid = record.search_id
        if await self.store.is_cancelled(sid):
            return await self._cancelled(sid)
        checkpoint = await self.store.load_checkpoint(sid)
        # None only for a job an older version stored, before submit wrote generation 0 with it
        generation, data = checkpoint or (0, _initial_checkpoint(record.spec))
        algorithm = algorithm_for_checkpoint(data)
        state = algorithm.loads(data)
        scope = self.workers.scope(sid)
        cancelled = False  # checked above; then the flag comes back with each step's write
        interrupt = self._interrupts[sid] = asyncio.Event()
        try:
            while not algorithm.is_done(state):
                if being_cancelled():  # see _maintain
                    raise asyncio.CancelledError
                if sid in self._lost:
                    raise LeaseLost(f"search {sid!r} was claimed by another orchestrator")
                if cancelled or interrupt.is_set():
                    return await self._cancelled(sid)
                if self._draining:  # the newest checkpoint is in the store: resumable elsewhere
                    raise ShuttingDown(DRAINED_MESSAGE)
                before = dataclasses.asdict(algorithm.common(state).spend)
                started = time.perf_counter()
                stepped = await self._step(sid, algorithm, state, scope, interrupt)
                if stepped is None:  # cancelled mid-step: the last checkpoint stays
                    return await self._cancelled(sid)
                state = stepped
                generation += 1
                event = progress_event(algorithm, state, generation)
                if self.observer is not None:
                    spent = {k: v - before[k] for k, v in event["spend"].items()}
                    self.observer.step(time.perf_counter() - started, spent)
                cancelled = await self.store.record_step(
                    sid, generation, algorithm.dumps(state), json.dumps(event).encode()
                )
        except (StateStoreUnavailable, StaleWriter, LeaseLost, InvalidTransition, ShuttingDown):
            raise
        except DeadlineExceeded as e:  # stopped like a cancel, the checkpoint kept
            log.info("search %s: deadline passed", sid, extra={"search_id": sid})
            return await self._finish(
                sid, JobStatus.CANCELLED, error=e.message, error_kind=ErrorKind.DEADLINE_EXCEEDED
            )
        except Exception as e:  # a worker gave up, a request was refused, a model misbehaved
            kind, message = failure_of(e)
            if kind is ErrorKind.INTERNAL:
                log.exception("search %s failed", sid, extra={"search_id": sid})
            else:
                log.info("search %s failed: %s", sid, e, extra={"search_id": sid})
            return await self._finish(sid, JobStatus.FAILED, error=message, error_kind=kind)
        finally:
            self._interrupts.pop(sid, None)
        result = algorithm.result(state)
        return await self._finish(
            sid,
            JobStatus.SUCCEEDED,
            result=result_to_json(result),
            spend=dataclasses.asdict(result.spend),
            final_answer=result.final_answer,
        )

    async def _step(
        self,
        sid: str,
        algorithm: SearchAlgorithm[Any, Any],
        state: Any,
        scope: Any,
        interrupt: asyncio.Event,
    ) -> Any | None:
        """One `advance`, stopped at once by a cancel (None) or the search's deadline
        (`DeadlineExceeded`: the search ends CANCELLED with that kind): stopping it cancels its
        pending worker requests, which leave the batchers' queues unsent."""
        step = asyncio.ensure_future(algorithm.advance(state, scope, scope))
        stop = asyncio.ensure_future(interrupt.wait())
        deadline = self._deadlines.get(sid)
        timeout = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait({step, stop}, timeout=timeout, return_when=FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await step
        if step.cancelled():
            if interrupt.is_set():
                return None
            if not being_cancelled():
                raise DeadlineExceeded("the search's deadline passed")
            raise asyncio.CancelledError
        return step.result()

    async def _cancelled(self, sid: str) -> JobRecord:
        return await self._finish(
            sid, JobStatus.CANCELLED, error="cancelled", error_kind=ErrorKind.CANCELLED
        )

    async def _finish(
        self,
        sid: str,
        status: JobStatus,
        *,
        result: str | None = None,
        error: str | None = None,
        error_kind: ErrorKind | None = None,
        spend: dict[str, float] | None = None,
        final_answer: str | None = None,
    ) -> JobRecord:
        record = await self.store.update_job(
            sid, status=status, result=result, error=error, error_kind=error_kind, spend=spend
        )
        if self.observer is not None:
            self.observer.search_finished(status)
        log.info("search %s %s", sid, status, extra={"search_id": sid, "status": str(status)})
        event = terminal_event(status, final_answer, error, error_kind)
        with contextlib.suppress(StreamClosed):
            await self.store.append_event(sid, event, terminal=True)
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
        if free <= 0 or self._draining:
            return
        for record in await self.store.claim_orphans(self.owner, self.config.lease_s, free):
            if record.search_id not in self._tasks:
                log.info(
                    "resuming orphaned search %s",
                    record.search_id,
                    extra={"search_id": record.search_id},
                )
                self._spawn(record.search_id)
