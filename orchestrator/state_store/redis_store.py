"""Redis backend: the store shared by every orchestrator and service replica.

Writes that check state run as Lua scripts (`redis_scripts`); keys follow `redis_keys`. Two
bounded pools: one for ordinary commands, one for blocking stream reads, so streaming clients can
never starve checkpoint writes; waits for stream entries (`read_events`, `read_batch_results` with
`wait_s`), however many, share the blocking pool's connections (`redis_stream_reader`). Socket,
pool and per-call timeouts bound every method, and any connection failure surfaces as
`StateStoreUnavailable`; connections are re-made on the next call, so the same store object
works again once Redis is back.

Job hash fields: algorithm, params (JSON), problem (JSON), seed, budget (JSON), batch_id,
batch_index, status, created_at, started_at, finished_at, owner, lease_expires_at, spend (JSON),
result, error. Optional fields are absent when unset, so older records stay readable.

A batch and its items live in different slots, so finishing an item is two scripts: UPDATE_JOB on
the job, then FINISH_BATCH_ITEM on the batch. A crash (or outage) between them leaves the batch one
count short: a retried `update_job` repairs it (the finished job's InvalidTransition path re-runs
the idempotent batch step), and so does `reconcile_batch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lodestar.orchestrator.state_store import redis_scripts
from lodestar.orchestrator.state_store.base import (
    ALLOWED_FROM,
    BATCH_COUNTED,
    JSON,
    BatchExists,
    BatchNotFound,
    BatchRecord,
    BatchResult,
    Checkpoint,
    InvalidTransition,
    JobExists,
    JobNotFound,
    JobRecord,
    JobSpec,
    JobStatus,
    LeaseLost,
    ProgressEvent,
    StaleWriter,
    StateStore,
    StateStoreUnavailable,
    StoreConfig,
    StreamClosed,
    batch_counts,
    check_lease_name,
    check_search_id,
    check_single_job,
    validate_batch,
    validate_lease,
    validate_read,
    validate_write,
)
from lodestar.orchestrator.state_store.redis_keys import (
    BatchKeys,
    SearchKeys,
    lease_key,
    open_batches,
    unfinished_index,
)
from lodestar.orchestrator.state_store.redis_stream_reader import (
    Entry,
    SharedStreamReader,
    entry_offset,
)
from lodestar.workers.messages import ErrorKind

T = TypeVar("T")

_OUTAGE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, TimeoutError, OSError)

DANGLING_AFTER_S = 300.0
"""An index entry whose job hash is missing is dropped only once it is this old: `create_job`
writes the index before the hash, so a young entry may belong to a job being created."""

BATCH_CHUNK = 500
"""Batch items per pipelined round trip: 10,000 items take 20, and no one reply is big enough to
near the socket timeout."""

BATCH_ITEM_S = 0.002
"""Time allowed per item on top of `op_timeout_s` for the whole-batch calls (create, reconcile)."""

BATCH_HOLD_S = 30.0
"""While `create_batch` writes its jobs they sit in the unfinished index scored this far past the
call's own time bound, so `claim_orphans` cannot start an item that a rollback would delete; if
the creator crashes, the items become claimable once the hold passes."""


@dataclass(frozen=True)
class RedisStoreConfig(StoreConfig):
    """With the defaults a refused connection fails at once and a hung server in about 1 s."""

    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    """Used when the url carries none: keeps the secret out of URLs, argv and logs."""
    key_prefix: str = "lodestar"
    max_connections: int = 64
    max_stream_readers: int = 64
    """Connections for blocking stream waits (`read_events`, `read_batch_results`), shared by
    every waiter: each runs one XREAD over a shard of the waited-on streams."""
    pool_timeout_s: float = 1.0
    socket_timeout_s: float = 1.0
    connect_timeout_s: float = 1.0
    op_timeout_s: float = 2.5
    """Hard cap on one method call (plus `wait_s` for blocking reads), whatever Redis does."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.max_connections, self.max_stream_readers) < 1:
            raise ValueError("pools need at least one connection")
        timeouts = (self.pool_timeout_s, self.socket_timeout_s, self.connect_timeout_s)
        if min(timeouts) <= 0 or self.op_timeout_s < self.socket_timeout_s:
            raise ValueError("timeouts must be > 0 and op_timeout_s >= socket_timeout_s")
        if not self.key_prefix or "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError("key_prefix must be non-empty and free of braces")


class RedisStateStore(StateStore):
    def __init__(self, config: RedisStoreConfig | None = None) -> None:
        self.config = config = config or RedisStoreConfig()
        # Blocking reads wait in slices this long: a hung Redis shows within slice + timeout.
        self._max_block_s = max(0.01, config.socket_timeout_s / 2)
        self._redis = Redis(connection_pool=self._pool(config.max_connections))
        # A blocking read's reply is due a slice after it is sent; the socket timeout runs from
        # there, so a busy event loop is no likelier to time out a stream reader than a write.
        readers = self._pool(config.max_stream_readers, self._max_block_s)
        self._streams = Redis(connection_pool=readers)
        self._index = unfinished_index(config.key_prefix)
        self._open_batches = open_batches(config.key_prefix)
        self._waits = SharedStreamReader(
            self._streams,
            self._redis,
            prefix=config.key_prefix,
            shards=config.max_stream_readers,
            block_s=self._max_block_s,
            call_timeout_s=config.op_timeout_s + self._max_block_s,
        )
        register = self._redis.register_script
        self._create = register(redis_scripts.CREATE_JOB)
        self._update = register(redis_scripts.UPDATE_JOB)
        self._claim = register(redis_scripts.CLAIM_JOB)
        self._renew = register(redis_scripts.RENEW_LEASE)
        self._save = register(redis_scripts.SAVE_CHECKPOINT)
        self._record = register(redis_scripts.RECORD_STEP)
        self._append = register(redis_scripts.APPEND_EVENT)
        self._cancel = register(redis_scripts.REQUEST_CANCEL)
        self._create_batch = register(redis_scripts.CREATE_BATCH)
        self._finish_item = register(redis_scripts.FINISH_BATCH_ITEM)
        self._hold = register(redis_scripts.HOLD_LEASE)
        self._release = register(redis_scripts.RELEASE_LEASE)

    def _pool(self, size: int, block_s: float = 0.0) -> BlockingConnectionPool:
        c = self.config
        return BlockingConnectionPool.from_url(
            c.url,
            password=c.password,
            max_connections=size,
            timeout=c.pool_timeout_s,
            socket_timeout=c.socket_timeout_s + block_s,
            socket_connect_timeout=c.connect_timeout_s,
            # No retries: a retried script whose first run landed would report a false StaleWriter
            # or publish an event twice. Dropped connections are re-dialled at checkout anyway.
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )

    @contextlib.asynccontextmanager
    async def _guard(self, what: str, extra_s: float = 0.0) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.config.op_timeout_s + extra_s):
                yield
        except _OUTAGE as exc:
            detail = str(exc) or type(exc).__name__
            raise StateStoreUnavailable(f"{what}: {detail}") from exc

    def _keys(self, search_id: str) -> list[str]:
        return SearchKeys.of(self.config.key_prefix, check_search_id(search_id)).all()

    def _batch_keys(self, batch_id: str) -> list[str]:
        return BatchKeys.of(self.config.key_prefix, check_search_id(batch_id)).all()

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.config.finished_ttl_s * 1000))

    async def _chunked(
        self,
        items: Sequence[T],
        queue: Callable[[Pipeline, Sequence[T]], Awaitable[None]],
        skip: int = 0,
    ) -> list[Any]:
        """Replies of the commands `queue` adds per chunk of `items`, one round trip a chunk,
        less the first `skip` replies of each chunk."""
        replies: list[Any] = []
        for start in range(0, len(items), BATCH_CHUNK):
            async with self._redis.pipeline(transaction=False) as pipe:
                await queue(pipe, items[start : start + BATCH_CHUNK])
                replies += (await pipe.execute())[skip:]
        return replies

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        await self._waits.close()
        await self._redis.aclose(close_connection_pool=True)
        await self._streams.aclose(close_connection_pool=True)

    # -- checkpoints ----------------------------------------------------------------------------

    async def save_checkpoint(self, search_id: str, generation: int, data: bytes) -> None:
        validate_write(search_id, generation, data)
        async with self._guard("save_checkpoint"):
            reply = await self._save(keys=self._keys(search_id), args=[generation, data])
        if reply[0] != 1:
            reason = f"job is {_text(reply[2])}" if len(reply) > 2 else ""
            raise StaleWriter(search_id, generation, int(reply[1]), reason)

    async def record_step(self, search_id: str, generation: int, data: bytes, event: bytes) -> bool:
        validate_write(search_id, generation, data)
        if not isinstance(event, bytes):
            raise TypeError(f"event data must be bytes, got {type(event).__name__}")
        args = [generation, data, self.config.events_maxlen, event]
        async with self._guard("record_step"):
            reply = await self._record(keys=self._keys(search_id), args=args)
        if reply[0] != 1:
            reason = f"job is {_text(reply[2])}" if len(reply) > 2 else ""
            raise StaleWriter(search_id, generation, int(reply[1]), reason)
        return bool(reply[2])

    async def load_checkpoint(self, search_id: str) -> Checkpoint | None:
        keys = self._keys(search_id)
        async with self._guard("load_checkpoint"):
            generation, data = await self._redis.hmget(keys[1], ["g", "d"])
        return None if generation is None else Checkpoint(int(generation), data)

    # -- jobs -----------------------------------------------------------------------------------

    async def create_job(self, spec: JobSpec, initial: bytes | None = None) -> JobRecord:
        check_single_job(spec, initial)
        keys = self._keys(spec.search_id)
        fields = _create_args(spec, initial)
        async with self._guard("create_job"):
            # Index first, scored by creation time: a crash between the two leaves an id the index
            # later drops (DANGLING_AFTER_S), never a job that no orchestrator can find.
            await self._redis.zadd(self._index, {spec.search_id: time.time()}, nx=True)
            created = await self._create(keys=keys, args=fields)
        if created is None:
            raise JobExists(spec.search_id)
        return JobRecord(spec=spec, status=JobStatus.QUEUED, created_at=float(created))

    async def get_job(self, search_id: str) -> JobRecord | None:
        keys = self._keys(search_id)
        async with self._guard("get_job"):
            fields = await self._redis.hgetall(keys[0])
        return _job_from_hash(search_id, fields) if fields else None

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
        """`update_job` without its batch step: the job's own script and index upkeep."""
        keys = self._keys(search_id)
        target = JobStatus(status) if status is not None else None
        allowed = ",".join(ALLOWED_FROM[target]) if target else ""
        ttl_ms = self._ttl_ms
        fields: list[str] = []
        if spend is not None:
            fields += ["spend", json.dumps(dict(spend))]
        if result is not None:
            fields += ["result", result]
        if error is not None:
            fields += ["error", error]
        if error_kind is not None:
            fields += ["error_kind", ErrorKind(error_kind).value]
        async with self._guard("update_job"):
            reply = await self._update(keys=keys, args=[target or "", allowed, ttl_ms, *fields])
            verdict = _text(reply[0])
            if verdict == "ok" and target is not None and target.finished:
                await self._redis.zrem(self._index, search_id)
        if verdict == "missing":
            raise JobNotFound(search_id)
        if verdict == "finished":
            raise InvalidTransition(f"job {search_id!r} is finished ({_text(reply[1])})")
        if verdict == "invalid":
            raise InvalidTransition(f"job {search_id!r}: {_text(reply[1])} -> {target}")
        return _job_from_hash(search_id, _pairs(reply[1]))

    async def list_unfinished(self) -> list[JobRecord]:
        async with self._guard("list_unfinished"):
            entries = await self._redis.zrange(self._index, 0, -1, withscores=True)
            ids = [_text(i) for i, _ in entries]
            async with self._redis.pipeline(transaction=False) as pipe:
                for search_id in ids:
                    pipe.hgetall(self._keys(search_id)[0])
                hashes = await pipe.execute()
            jobs = [_job_from_hash(i, h) for i, h in zip(ids, hashes, strict=True) if h]
            dangling = time.time() - DANGLING_AFTER_S
            scores = [score for _, score in entries]
            gone = {
                search_id
                for search_id, score, h in zip(ids, scores, hashes, strict=True)
                if not h and score < dangling
            }
            gone |= {job.search_id for job in jobs if job.status.finished}
            if gone:
                await self._redis.zrem(self._index, *gone)
        unfinished = [job for job in jobs if not job.status.finished]
        return sorted(unfinished, key=lambda job: (job.created_at, job.search_id))

    async def claim_job(self, search_id: str, owner: str, lease_s: float) -> JobRecord | None:
        validate_lease(owner, lease_s)
        async with self._guard("claim_job"):
            verdict, job = await self._claim_one(search_id, owner, lease_s, orphans_only=False)
        if verdict == "missing":
            raise JobNotFound(search_id)
        return job

    async def claim_orphans(self, owner: str, lease_s: float, limit: int = 16) -> list[JobRecord]:
        validate_lease(owner, lease_s)
        claimed: list[JobRecord] = []
        async with self._guard("claim_orphans"):
            seconds, micros = await self._redis.time()
            now = seconds + micros / 1e6
            entries = await self._redis.zrangebyscore(
                self._index, "-inf", now, start=0, num=limit, withscores=True
            )
            for search_id, score in entries:
                search_id = _text(search_id)
                verdict, job = await self._claim_one(search_id, owner, lease_s, orphans_only=True)
                if job is not None:
                    claimed.append(job)
                elif verdict == "missing" and score < time.time() - DANGLING_AFTER_S:
                    await self._redis.zrem(self._index, search_id)
        return claimed

    async def _claim_one(
        self, search_id: str, owner: str, lease_s: float, *, orphans_only: bool
    ) -> tuple[str, JobRecord | None]:
        """Run the claim script; keep the index in step with what it found, so stale entries
        heal as they are met (a missing job is the caller's call: see DANGLING_AFTER_S)."""
        args = [owner, repr(float(lease_s)), "1" if orphans_only else "0"]
        reply = await self._claim(keys=self._keys(search_id), args=args)
        verdict = _text(reply[0])
        if verdict == "ok":
            job = _job_from_hash(search_id, _pairs(reply[1]))
            await self._redis.zadd(self._index, {search_id: job.lease_expires_at or 0.0})
            return verdict, job
        if verdict == "held":
            await self._redis.zadd(self._index, {search_id: float(reply[1])})
        elif verdict == "finished":
            await self._redis.zrem(self._index, search_id)
        return verdict, None

    async def renew_lease(self, search_id: str, owner: str, lease_s: float) -> float:
        validate_lease(owner, lease_s)
        keys = self._keys(search_id)
        async with self._guard("renew_lease"):
            reply = await self._renew(keys=keys, args=[owner, repr(float(lease_s))])
            verdict = _text(reply[0])
            if verdict == "ok":
                expires = float(reply[1])
                await self._redis.zadd(self._index, {search_id: expires})
                return expires
        if verdict == "missing":
            raise JobNotFound(search_id)
        if verdict == "finished":
            raise LeaseLost(f"job {search_id!r} is {_text(reply[1])}")
        raise LeaseLost(f"job {search_id!r} is owned by {_text(reply[1]) or None!r}")

    # -- named leases ---------------------------------------------------------------------------

    async def hold_lease(self, name: str, owner: str, lease_s: float) -> bool:
        validate_lease(owner, lease_s)
        key = lease_key(self.config.key_prefix, check_lease_name(name))
        async with self._guard("hold_lease"):
            return bool(await self._hold(keys=[key], args=[owner, max(1, round(lease_s * 1000))]))

    async def release_lease(self, name: str, owner: str) -> None:
        key = lease_key(self.config.key_prefix, check_lease_name(name))
        async with self._guard("release_lease"):
            await self._release(keys=[key], args=[owner])

    # -- progress events ------------------------------------------------------------------------

    async def append_event(self, search_id: str, data: bytes, *, terminal: bool = False) -> int:
        keys = self._keys(search_id)
        if not isinstance(data, bytes):
            raise TypeError(f"event data must be bytes, got {type(data).__name__}")
        args = [self.config.events_maxlen, "1" if terminal else "0", data]
        async with self._guard("append_event"):
            stream_id = await self._append(keys=keys, args=args)
        if stream_id is None:
            raise StreamClosed(f"search {search_id!r} already published its terminal event")
        return _offset(stream_id)

    async def read_events(
        self, search_id: str, after: int = 0, *, limit: int = 100, wait_s: float = 0.0
    ) -> list[ProgressEvent]:
        validate_read(after, limit, wait_s)
        key = self._keys(search_id)[2]
        deadline = asyncio.get_running_loop().time() + wait_s
        async with self._guard("read_events", extra_s=wait_s):
            entries: list[Entry] = []
            if not (wait_s > 0 and self._waits.reading(key)):
                reply = await self._redis.xread({key: f"0-{after}"}, count=limit)
                entries = [entry for _, found in reply or [] for entry in found]
            if not entries and wait_s > 0:
                entries = await self._wait(key, after, limit, deadline)
        return [_event(i, f) for i, f in entries]

    async def _wait(self, key: str, after: int, limit: int, deadline: float) -> list[Entry]:
        """The entries of stream `key` after `after` once one arrives, or [] at `deadline`
        (loop time); the wait holds no connection of its own (see `redis_stream_reader`)."""
        try:
            async with asyncio.timeout_at(deadline) as timeout:
                return await self._waits.wait(key, after, limit)
        except TimeoutError:
            if timeout.expired():
                return []
            raise

    # -- batches --------------------------------------------------------------------------------

    async def create_batch(
        self,
        batch_id: str,
        settings: JSON,
        specs: Sequence[JobSpec],
        initial: Sequence[bytes] | None = None,
    ) -> BatchRecord:
        """Check every id, reserve the batch record, then write items, index entries and jobs
        (each CREATE_JOB with its checkpoint) in pipelined chunks; a job id taken in between rolls
        all of it back.

        A crash part-way leaves a partial batch (record without some jobs) that never finishes;
        the caller saw no success, and the items it did write run as ordinary jobs."""
        specs = list(specs)
        validate_batch(batch_id, specs, initial)
        data = {s.search_id: initial[i] for i, s in enumerate(specs)} if initial else {}
        settings_json = json.dumps(settings)
        batch_keys = self._batch_keys(batch_id)
        ids = [spec.search_id for spec in specs]
        bound_s = len(specs) * BATCH_ITEM_S
        async with self._guard("create_batch", extra_s=bound_s):

            async def exists(pipe: Pipeline, chunk: Sequence[str]) -> None:
                for search_id in chunk:
                    pipe.exists(self._keys(search_id)[0])

            if await self._redis.exists(batch_keys[0]):
                raise BatchExists(batch_id)
            taken = await self._chunked(ids, exists)
            if any(taken):
                raise JobExists(next(i for i, t in zip(ids, taken, strict=True) if t))
            created_at = await self._create_batch(keys=batch_keys, args=[len(specs), settings_json])
            if created_at is None:
                raise BatchExists(batch_id)
            hold = time.time() + self.config.op_timeout_s + bound_s + BATCH_HOLD_S

            async def write(pipe: Pipeline, chunk: Sequence[JobSpec]) -> None:
                # Index before hash, as in create_job; two replies to skip.
                pipe.rpush(batch_keys[1], *(spec.search_id for spec in chunk))
                pipe.zadd(self._index, {spec.search_id: hold for spec in chunk}, nx=True)
                for spec in chunk:
                    keys = self._keys(spec.search_id)
                    args = _create_args(spec, data.get(spec.search_id))
                    await self._create(keys=keys, args=args, client=pipe)

            replies = await self._chunked(specs, write, skip=2)
            made = {i: float(c) for i, c in zip(ids, replies, strict=True) if c is not None}
            if len(made) < len(ids):
                await self._roll_back_batch(batch_keys, ids, made)
                raise JobExists(next(i for i in ids if i not in made))

            async def release(pipe: Pipeline, chunk: Sequence[str]) -> None:
                pipe.zadd(self._index, {i: made[i] for i in chunk}, xx=True)

            await self._chunked(ids, release)
            # Last, so a batch cut short by a crash never counts against the open-items limit.
            await self._redis.sadd(self._open_batches, batch_id)
        return BatchRecord(batch_id, len(specs), settings, float(created_at), batch_counts())

    async def _roll_back_batch(
        self, batch_keys: list[str], ids: list[str], made: Mapping[str, float]
    ) -> None:
        """Undo a `create_batch` that met a job created under it: delete the jobs it made and its
        record; the other creator's index entries lose the hold (lower score only)."""
        now = time.time()

        async def undo(pipe: Pipeline, chunk: Sequence[str]) -> None:
            for search_id in chunk:
                if search_id in made:
                    pipe.delete(*self._keys(search_id)[:2])  # job and checkpoint
                    pipe.zrem(self._index, search_id)
                else:
                    pipe.zadd(self._index, {search_id: now}, xx=True, lt=True)

        await self._chunked(ids, undo)
        await self._redis.delete(*batch_keys)

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        keys = self._batch_keys(batch_id)
        async with self._guard("get_batch"):
            fields = await self._redis.hgetall(keys[0])
        return _batch_from_hash(batch_id, fields) if fields else None

    async def read_batch_results(
        self, batch_id: str, after: int = 0, *, limit: int = 100, wait_s: float = 0.0
    ) -> list[BatchResult]:
        validate_read(after, limit, wait_s)
        keys = self._batch_keys(batch_id)
        deadline = asyncio.get_running_loop().time() + wait_s
        async with self._guard("read_batch_results", extra_s=wait_s):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.exists(keys[0])
                pipe.xread({keys[3]: f"0-{after}"}, count=limit)
                found, reply = await pipe.execute()
            if not found:
                raise BatchNotFound(batch_id)
            entries = [entry for _, got in reply or [] for entry in got]
            if not entries and wait_s > 0:
                entries = await self._wait(keys[3], after, limit, deadline)
        return [_batch_result(i, f) for i, f in entries]

    async def _uncounted(self, batch_id: str, what: str) -> tuple[list[str], list[str]]:
        """(every item's search id in batch order, those not yet counted as finished)."""
        keys = self._batch_keys(batch_id)
        async with self._guard(what), self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys[0])
            pipe.lrange(keys[1], 0, -1)
            pipe.smembers(keys[2])
            found, items, counted = await pipe.execute()
        if not found:
            raise BatchNotFound(batch_id)
        counted_ids = {_text(i) for i in counted}
        ids = [_text(i) for i in items]
        return ids, [i for i in ids if i not in counted_ids]

    async def reconcile_batch(self, batch_id: str) -> BatchRecord:
        keys = self._batch_keys(batch_id)
        _, pending = await self._uncounted(batch_id, "reconcile_batch")
        async with self._guard("reconcile_batch", extra_s=len(pending) * BATCH_ITEM_S):

            async def read(pipe: Pipeline, chunk: Sequence[str]) -> None:
                for search_id in chunk:
                    pipe.hgetall(self._keys(search_id)[0])

            hashes = await self._chunked(pending, read)
            jobs = [_job_from_hash(i, h) for i, h in zip(pending, hashes, strict=True) if h]
            missed = [j for j in jobs if j.status.finished and j.spec.batch_id == batch_id]

            async def finish(pipe: Pipeline, chunk: Sequence[JobRecord]) -> None:
                for job in chunk:
                    await self._finish_item(keys=keys, args=self._finish_args(job), client=pipe)

            await self._chunked(missed, finish)
            fields = await self._redis.hgetall(keys[0])
        if not fields:  # it was done and has expired since
            raise BatchNotFound(batch_id)
        return _batch_from_hash(batch_id, fields)

    async def cancel_batch(self, batch_id: str, terminal_event: bytes) -> BatchRecord:
        """Two pipelined passes over the uncounted items, a round trip per chunk each: first
        UPDATE_JOB (queued -> cancelled) on every one, then, by what it found, the batch count,
        index removal and terminal event (cancelled now), the count alone (finished before,
        uncounted) or the cancel flag (running). Flags follow the update, so no flag key is
        left behind for a job that does not exist."""
        if not isinstance(terminal_event, bytes):
            raise TypeError(f"event data must be bytes, got {type(terminal_event).__name__}")
        keys = self._batch_keys(batch_id)
        items, pending = await self._uncounted(batch_id, "cancel_batch")
        index_of = {search_id: i for i, search_id in enumerate(items)}
        ttl_ms = self._ttl_ms
        fields = ["error", "cancelled", "error_kind", ErrorKind.CANCELLED.value]
        update_args = [JobStatus.CANCELLED.value, JobStatus.QUEUED.value, ttl_ms, *fields]
        async with self._guard("cancel_batch", extra_s=2 * len(pending) * BATCH_ITEM_S):

            async def cancel_queued(pipe: Pipeline, chunk: Sequence[str]) -> None:
                for search_id in chunk:
                    await self._update(keys=self._keys(search_id), args=update_args, client=pipe)

            replies = await self._chunked(pending, cancel_queued)
            found_now = [  # (id, verdict, status it was in when not cancelled now)
                (search_id, _text(reply[0]), _text(reply[1]) if reply[0] != b"ok" else "")
                for search_id, reply in zip(pending, replies, strict=True)
                if len(reply) > 1  # "missing": expired, or never written (a crashed create)
            ]

            async def settle(pipe: Pipeline, chunk: Sequence[tuple[str, str, str]]) -> None:
                for search_id, verdict, status in chunk:
                    search_keys = self._keys(search_id)
                    if verdict == "invalid":  # running: its orchestrator stops it
                        await self._cancel(keys=search_keys, args=[], client=pipe)
                        continue
                    if verdict == "ok":
                        status = JobStatus.CANCELLED.value
                        pipe.zrem(self._index, search_id)
                        event_args = [self.config.events_maxlen, "1", terminal_event]
                        await self._append(keys=search_keys, args=event_args, client=pipe)
                    args = [search_id, index_of[search_id], status, ttl_ms]
                    await self._finish_item(keys=keys, args=args, client=pipe)

            await self._chunked(found_now, settle)
            meta = await self._redis.hgetall(keys[0])
        if not meta:  # it was done and has expired since
            raise BatchNotFound(batch_id)
        return _batch_from_hash(batch_id, meta)

    async def open_batch_items(self) -> int:
        async with self._guard("open_batch_items"):
            ids = sorted(map(_text, await self._redis.smembers(self._open_batches)))
            counted = [status.value for status in BATCH_COUNTED]

            async def read(pipe: Pipeline, chunk: Sequence[str]) -> None:
                for batch_id in chunk:
                    pipe.hmget(self._batch_keys(batch_id)[0], ["size", *counted])

            rows = await self._chunked(ids, read)
            open_items, closed = 0, []
            for batch_id, (size, *finished) in zip(ids, rows, strict=True):
                left = 0 if size is None else int(size) - sum(int(n or 0) for n in finished)
                if left > 0:
                    open_items += left
                else:  # done, or expired after it was done
                    closed.append(batch_id)
            if closed:
                await self._redis.srem(self._open_batches, *closed)
        return open_items

    async def _finish_batch_item(self, job: JobRecord) -> bool:
        """The batch half of finishing an item (its own script, the batch's slot); idempotent.
        True if this call counted the item."""
        if job.spec.batch_id is None or not job.status.finished:
            return False
        keys = self._batch_keys(job.spec.batch_id)
        async with self._guard("update_job (batch)"):
            reply = await self._finish_item(keys=keys, args=self._finish_args(job))
        return _text(reply[0]) == "ok"

    def _finish_args(self, job: JobRecord) -> list[Any]:
        return [job.search_id, job.spec.batch_index, job.status.value, self._ttl_ms]

    # -- cancellation ---------------------------------------------------------------------------

    async def request_cancel(self, search_id: str) -> None:
        keys = self._keys(search_id)
        async with self._guard("request_cancel"):
            await self._cancel(keys=keys, args=[])

    async def is_cancelled(self, search_id: str) -> bool:
        keys = self._keys(search_id)
        async with self._guard("is_cancelled"):
            return bool(await self._redis.exists(keys[3]))


# -- encoding ---------------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_offset = entry_offset


def _event(stream_id: bytes, fields: Mapping[bytes, bytes]) -> ProgressEvent:
    return ProgressEvent(_offset(stream_id), fields[b"d"], fields[b"t"] == b"1")


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _batch_result(stream_id: bytes, fields: Mapping[bytes, bytes]) -> BatchResult:
    return BatchResult(
        offset=_offset(stream_id),
        search_id=_text(fields[b"s"]),
        index=int(fields[b"i"]),
        status=JobStatus(_text(fields[b"st"])),
    )


def _batch_from_hash(batch_id: str, raw: Mapping[bytes, bytes]) -> BatchRecord:
    h = {_text(k): _text(v) for k, v in raw.items()}
    return BatchRecord(
        batch_id=batch_id,
        size=int(h["size"]),
        settings=json.loads(h["settings"]),
        created_at=float(h["created_at"]),
        counts={status.value: int(h.get(status.value, 0)) for status in BATCH_COUNTED},
    )


def _create_args(spec: JobSpec, initial: bytes | None) -> list[str | bytes]:
    """CREATE_JOB's ARGV: whether to write a generation-0 checkpoint, its data, the spec."""
    fields: list[str | bytes] = ["0", b""] if initial is None else ["1", initial]
    fields += [
        "algorithm",
        spec.algorithm,
        "params",
        json.dumps(spec.params),
        "problem",
        json.dumps(spec.problem),
        "seed",
        str(int(spec.seed)),
    ]
    if spec.budget is not None:
        fields += ["budget", json.dumps(spec.budget)]
    if spec.batch_id is not None:
        fields += ["batch_id", spec.batch_id, "batch_index", str(spec.batch_index)]
    return fields


def _job_from_hash(search_id: str, raw: Mapping[bytes, bytes]) -> JobRecord:
    h = {_text(k): _text(v) for k, v in raw.items()}

    def when(name: str) -> float | None:
        return float(h[name]) if name in h else None

    def loaded(name: str) -> Any:
        return json.loads(h[name]) if name in h else None

    spec = JobSpec(
        search_id=search_id,
        algorithm=h["algorithm"],
        params=json.loads(h["params"]),
        problem=json.loads(h["problem"]),
        seed=int(h["seed"]),
        budget=loaded("budget"),
        batch_id=h.get("batch_id"),
        batch_index=int(h["batch_index"]) if "batch_index" in h else None,
    )
    return JobRecord(
        spec=spec,
        status=JobStatus(h["status"]),
        created_at=float(h["created_at"]),
        started_at=when("started_at"),
        finished_at=when("finished_at"),
        owner=h.get("owner"),
        lease_expires_at=when("lease_expires_at"),
        spend=loaded("spend") or {},
        result=h.get("result"),
        error=h.get("error"),
        error_kind=ErrorKind(h["error_kind"]) if "error_kind" in h else None,
    )
