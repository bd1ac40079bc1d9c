"""The search-state store: one specification, run on the memory backend and on a real Redis.

The Redis tests start a private redis-server (tests/redis_server.py); without the binary they
fail with a message saying how to install it, never skip.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from lodestar.orchestrator.state_store import (
    InvalidTransition,
    JobExists,
    JobNotFound,
    JobSpec,
    JobStatus,
    LeaseLost,
    MemoryStateStore,
    StaleWriter,
    StateStore,
    StateStoreUnavailable,
    StreamClosed,
    open_state_store,
)
from lodestar.orchestrator.state_store.redis_keys import SearchKeys
from lodestar.orchestrator.state_store.redis_store import (
    DANGLING_AFTER_S,
    RedisStateStore,
    RedisStoreConfig,
)
from lodestar.services.local_redis import LocalRedis, RedisServerMissing
from tests.redis_server import new_redis_server
from tests.store_backends import Backend


def spec(search_id: str, **overrides: Any) -> JobSpec:
    fields: dict[str, Any] = dict(
        search_id=search_id,
        algorithm="pf",
        params={"n_particles": 4, "temperature": 0.8},
        problem=[{"role": "user", "content": "2+2?"}],
        seed=7,
        budget={"max_generated_tokens": 1000},
    )
    return JobSpec(**(fields | overrides))


async def finished_job(store: StateStore, search_id: str) -> None:
    await store.create_job(spec(search_id))
    await store.claim_job(search_id, "orch-a", 30)
    await store.update_job(search_id, status=JobStatus.SUCCEEDED, result='{"answer": "4"}')


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_generations_start_at_one_and_advance_by_one(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.load_checkpoint("s1") is None
        with pytest.raises(StaleWriter, match="stored generation is 0"):
            await store.save_checkpoint("s1", 2, b"skipped one")
        await store.save_checkpoint("s1", 1, b"first")
        assert await store.load_checkpoint("s1") == (1, b"first")
        with pytest.raises(StaleWriter):
            await store.save_checkpoint("s1", 1, b"replayed")
        await store.save_checkpoint("s1", 2, b"second")
        generation, data = await store.load_checkpoint("s1")
        assert (generation, data) == (2, b"second")
        with pytest.raises(ValueError):
            await store.save_checkpoint("s1", 0, b"")

    backend.run(body)


def test_concurrent_writers_with_the_same_generation_exactly_one_wins(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        for generation in (1, 2, 3):
            payloads = [f"writer {i} gen {generation}".encode() for i in range(40)]
            outcomes = await asyncio.gather(
                *(store.save_checkpoint("race", generation, p) for p in payloads),
                return_exceptions=True,
            )
            winners = [p for p, o in zip(payloads, outcomes, strict=True) if o is None]
            assert len(winners) == 1
            assert all(isinstance(o, StaleWriter) for o in outcomes if o is not None)
            assert await store.load_checkpoint("race") == (generation, winners[0])

    backend.run(body)


def test_record_step_writes_checkpoint_and_event_together_and_reports_cancel(
    backend: Backend,
) -> None:
    async def body(store: StateStore) -> None:
        await store.create_job(spec("step"))
        assert await store.record_step("step", 1, b"s1", b"e1") is False
        with pytest.raises(StaleWriter):
            await store.record_step("step", 1, b"replayed", b"lost")
        await store.request_cancel("step")
        assert await store.record_step("step", 2, b"s2", b"e2") is True
        assert await store.load_checkpoint("step") == (2, b"s2")
        events = await store.read_events("step")
        assert [(e.offset, e.data, e.terminal) for e in events] == [
            (1, b"e1", False),
            (2, b"e2", False),
        ]  # the refused write left no event

    backend.run(body)


def test_a_job_is_created_with_its_generation_0_checkpoint_and_steps_go_on_from_it(
    backend: Backend,
) -> None:
    """What submit stores: the job and the initial state together; the first step is 1."""

    async def body(store: StateStore) -> None:
        await store.create_job(spec("g0"), b"initial")
        assert await store.load_checkpoint("g0") == (0, b"initial")
        with pytest.raises(StaleWriter, match="stored generation is 0"):
            await store.record_step("g0", 2, b"skipped one", b"lost")
        assert await store.record_step("g0", 1, b"s1", b"e1") is False
        assert await store.load_checkpoint("g0") == (1, b"s1")
        with pytest.raises(JobExists):
            await store.create_job(spec("g0"), b"again")
        assert await store.load_checkpoint("g0") == (1, b"s1")  # the refused create wrote nothing
        with pytest.raises(TypeError):
            await store.create_job(spec("g0-bad"), "not bytes")  # type: ignore[arg-type]
        assert await store.get_job("g0-bad") is None
        await store.create_job(spec("no-g0"))  # as older versions stored jobs
        assert await store.load_checkpoint("no-g0") is None

    backend.run(body)


def test_a_queued_job_cancelled_before_its_first_step_takes_its_checkpoint_with_it(
    backend: Backend,
) -> None:
    async def body(store: StateStore) -> None:
        await store.create_job(spec("q"), b"initial")
        await store.update_job("q", status=JobStatus.CANCELLED, error="cancelled")
        with pytest.raises(StaleWriter, match="job is cancelled"):
            await store.save_checkpoint("q", 1, b"zombie")
        assert await store.load_checkpoint("q") == (0, b"initial")
        await asyncio.sleep(0.6)
        assert await store.load_checkpoint("q") is None

    backend.run(body, finished_ttl_s=0.4)


def test_checkpoint_of_a_finished_job_is_rejected(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.save_checkpoint("done", 1, b"state")
        await finished_job(store, "done")
        with pytest.raises(StaleWriter, match="job is succeeded"):
            await store.save_checkpoint("done", 2, b"zombie")
        assert await store.load_checkpoint("done") == (1, b"state")

    backend.run(body)


# -- jobs -------------------------------------------------------------------------------------


def test_job_lifecycle_records_times_owner_spend_and_result(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        before = time.time()
        created = await store.create_job(spec("j1"))
        assert created.status is JobStatus.QUEUED and created.owner is None
        assert before - 1 <= created.created_at <= time.time() + 1
        with pytest.raises(JobExists):
            await store.create_job(spec("j1"))

        running = await store.claim_job("j1", "orch-a", lease_s=30)
        assert running is not None and running.status is JobStatus.RUNNING
        assert running.owner == "orch-a" and running.started_at is not None
        assert running.lease_expires_at is not None and running.lease_expires_at > time.time()

        spend = {"generated_tokens": 120, "prm_passes": 8, "wall_s": 0.25}
        await store.update_job("j1", spend=spend)
        done = await store.update_job("j1", status=JobStatus.SUCCEEDED, result='{"answer": "4"}')
        assert done.status is JobStatus.SUCCEEDED and done.spend == spend
        assert done.result == '{"answer": "4"}' and done.error is None
        assert done.finished_at is not None and done.finished_at >= done.started_at
        assert done.lease_expires_at is None and done.owner == "orch-a"
        assert await store.get_job("j1") == done
        assert done.spec == spec("j1")
        assert await store.get_job("nobody") is None

    backend.run(body)


def test_status_transitions_are_validated_and_finished_jobs_are_immutable(
    backend: Backend,
) -> None:
    async def body(store: StateStore) -> None:
        await store.create_job(spec("t1", budget=None))
        with pytest.raises(InvalidTransition, match="queued -> succeeded"):
            await store.update_job("t1", status=JobStatus.SUCCEEDED)
        failed = await store.update_job("t1", status=JobStatus.FAILED, error="worker lost")
        assert failed.error == "worker lost" and failed.spec.budget is None
        for change in ({"status": JobStatus.RUNNING}, {"result": "{}"}, {"spend": {}}):
            with pytest.raises(InvalidTransition, match="finished"):
                await store.update_job("t1", **change)
        with pytest.raises(JobNotFound):
            await store.update_job("ghost", status=JobStatus.RUNNING)
        with pytest.raises(JobNotFound):
            await store.claim_job("ghost", "orch-a", 1)

    backend.run(body)


def test_list_unfinished_returns_queued_and_running_jobs_oldest_first(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        for search_id in ("u1", "u2", "u3", "u4"):
            await store.create_job(spec(search_id))
        await store.claim_job("u2", "orch-a", 30)
        await store.update_job("u3", status=JobStatus.CANCELLED)
        unfinished = await store.list_unfinished()
        assert [job.search_id for job in unfinished] == ["u1", "u2", "u4"]
        assert [job.status for job in unfinished][:2] == [JobStatus.QUEUED, JobStatus.RUNNING]

    backend.run(body)


def test_orphans_are_claimed_exactly_once_after_their_owner_stops_renewing(
    backend: Backend,
) -> None:
    async def body(store: StateStore) -> None:
        for search_id in ("lapsed", "alive", "never-claimed"):
            await store.create_job(spec(search_id))
        await store.claim_job("lapsed", "orch-a", lease_s=0.2)
        await store.claim_job("alive", "orch-a", lease_s=30)
        await asyncio.sleep(0.3)

        claims = await asyncio.gather(*(store.claim_orphans(f"new-{i}", 30) for i in range(4)))
        claimed = [job.search_id for batch in claims for job in batch]
        assert sorted(claimed) == ["lapsed", "never-claimed"]
        assert all(job.status is JobStatus.RUNNING for batch in claims for job in batch)
        assert await store.claim_orphans("late", 30) == []

        new_owner = (await store.get_job("lapsed")).owner
        assert new_owner is not None and new_owner.startswith("new-")
        with pytest.raises(LeaseLost, match="owned by"):
            await store.renew_lease("lapsed", "orch-a", 30)
        assert await store.claim_job("alive", "orch-b", 30) is None
        old = (await store.get_job("alive")).lease_expires_at
        assert await store.renew_lease("alive", "orch-a", 60) > old
        await store.update_job("alive", status=JobStatus.SUCCEEDED)
        with pytest.raises(LeaseLost, match="succeeded"):
            await store.renew_lease("alive", "orch-a", 60)

    backend.run(body)


def test_a_named_lease_has_one_holder_until_it_lapses_or_is_given_back(backend: Backend) -> None:
    """What a fleet's keepers rely on: of many gateways trying at once exactly one holds
    `fleet:<name>:owner`, it renews it, and another takes it once it lapses or is released."""
    name = "fleet:demo:owner"

    async def body(store: StateStore) -> None:
        tries = await asyncio.gather(*(store.hold_lease(name, f"gw-{i}", 0.3) for i in range(8)))
        assert tries.count(True) == 1
        holder = f"gw-{tries.index(True)}"
        assert await store.hold_lease(name, holder, 0.3)  # renewed
        assert not await store.hold_lease(name, "gw-late", 30)
        await asyncio.sleep(0.4)  # lapsed: not renewed for longer than the lease
        assert await store.hold_lease(name, "gw-late", 30)
        assert not await store.hold_lease(name, holder, 30)
        await store.release_lease(name, holder)  # not the holder: nothing happens
        assert not await store.hold_lease(name, "gw-other", 30)
        await store.release_lease(name, "gw-late")
        assert await store.hold_lease(name, "gw-other", 30)
        assert await store.hold_lease("fleet:other:owner", "gw-late", 30)  # leases are per name
        with pytest.raises(ValueError):
            await store.hold_lease("fleet:{x}:owner", "gw-late", 30)

    backend.run(body)


def test_jobs_created_during_orphan_scans_are_never_lost(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        ids = [f"new-{i}" for i in range(20)]

        async def scan() -> None:
            for _ in range(20):
                await store.list_unfinished()
                await store.claim_orphans("scanner", 0.001, limit=2)

        await asyncio.gather(scan(), *(store.create_job(spec(i)) for i in ids), scan())
        await asyncio.sleep(0.01)  # let the scanners' tiny leases lapse
        listed = {job.search_id for job in await store.list_unfinished()}
        orphans = {job.search_id for job in await store.claim_orphans("final", 30, limit=100)}
        assert listed == orphans == set(ids)

    backend.run(body)


# -- progress events --------------------------------------------------------------------------


def test_events_are_ordered_and_readable_from_any_offset(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.read_events("ev") == []
        offsets = [await store.append_event("ev", f"step {i}".encode()) for i in range(1, 6)]
        assert offsets == [1, 2, 3, 4, 5]
        events = await store.read_events("ev")
        assert [e.data for e in events] == [f"step {i}".encode() for i in range(1, 6)]
        assert [e.offset for e in await store.read_events("ev", after=3)] == [4, 5]
        assert [e.offset for e in await store.read_events("ev", after=1, limit=2)] == [2, 3]
        assert await store.read_events("ev", after=5) == []

    backend.run(body)


def test_blocking_read_wakes_on_the_next_event_and_times_out_empty(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        started = time.monotonic()
        assert await store.read_events("wait", wait_s=0.2) == []
        assert 0.15 <= time.monotonic() - started < 1.0

        async def publish_later() -> None:
            await asyncio.sleep(0.15)
            await store.append_event("wait", b"hello")

        started = time.monotonic()
        events, _ = await asyncio.gather(store.read_events("wait", wait_s=5), publish_later())
        assert [e.data for e in events] == [b"hello"]
        assert time.monotonic() - started < 1.0

    backend.run(body)


def test_terminal_event_ends_the_log_and_follow(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        async def publish() -> None:
            for i in range(3):
                await asyncio.sleep(0.02)
                await store.append_event("f", f"{i}".encode())
            await store.append_event("f", b"done", terminal=True)

        async def collect() -> list[tuple[int, bytes, bool]]:
            return [(e.offset, e.data, e.terminal) async for e in store.follow("f", wait_s=1)]

        seen, _ = await asyncio.gather(collect(), publish())
        assert seen == [(1, b"0", False), (2, b"1", False), (3, b"2", False), (4, b"done", True)]
        with pytest.raises(StreamClosed):
            await store.append_event("f", b"after the end")
        assert [e.offset async for e in store.follow("f", after=2)] == [3, 4]

    backend.run(body)


def test_event_log_keeps_the_newest_maxlen_events(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        for i in range(1, 8):
            await store.append_event("trim", f"{i}".encode())
        assert [e.offset for e in await store.read_events("trim")] == [5, 6, 7]
        assert await store.append_event("trim", b"8") == 8

    backend.run(body, events_maxlen=3)


# -- cancellation and expiry ------------------------------------------------------------------


def test_cancellation_flag_is_per_search(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        assert not await store.is_cancelled("c1")
        await store.request_cancel("c1")
        assert await store.is_cancelled("c1") and not await store.is_cancelled("c2")

    backend.run(body)


def test_every_key_of_a_finished_search_expires_after_the_ttl(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        for search_id in ("fin", "live"):
            await store.create_job(spec(search_id))
            await store.save_checkpoint(search_id, 1, b"state")
            await store.append_event(search_id, b"step")
        await finished_job_from_queued(store, "fin")
        await store.append_event("fin", b"end", terminal=True)  # written after finishing
        await store.request_cancel("fin")
        assert (await store.get_job("fin")).status is JobStatus.SUCCEEDED
        await asyncio.sleep(0.6)
        assert await store.get_job("fin") is None
        assert await store.load_checkpoint("fin") is None
        assert await store.read_events("fin") == []
        assert not await store.is_cancelled("fin")
        assert await store.load_checkpoint("live") == (1, b"state")
        assert [job.search_id for job in await store.list_unfinished()] == ["live"]

    backend.run(body, finished_ttl_s=0.4)


async def finished_job_from_queued(store: StateStore, search_id: str) -> None:
    await store.claim_job(search_id, "orch-a", 30)
    await store.update_job(search_id, status=JobStatus.SUCCEEDED)


def test_search_ids_that_would_break_the_key_layout_are_refused(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        for bad in ("a{b}", "", "has space", "x" * 129):
            with pytest.raises(ValueError):
                await store.load_checkpoint(bad)
            with pytest.raises(ValueError):
                await store.create_job(spec(bad))

    backend.run(body)


# -- Redis only -------------------------------------------------------------------------------


def redis_config(server: LocalRedis, **overrides: Any) -> RedisStoreConfig:
    timeouts = dict(socket_timeout_s=0.5, connect_timeout_s=0.5, pool_timeout_s=0.5)
    return RedisStoreConfig(url=server.url, **(timeouts | {"op_timeout_s": 1.5} | overrides))


def test_redis_keys_of_one_search_share_a_slot_and_all_get_the_ttl(
    redis_server: LocalRedis,
) -> None:
    async def main() -> None:
        async with RedisStateStore(redis_config(redis_server, finished_ttl_s=60)) as store:
            await store.create_job(spec("slot"))
            await store.save_checkpoint("slot", 1, b"state")
            await store.append_event("slot", b"step")
            await store.request_cancel("slot")
            await finished_job_from_queued(store, "slot")

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        asyncio.run(main())
        keys = SearchKeys.of("lodestar", "slot").all()
        assert sorted(k.decode() for k in client.keys("lodestar:{slot}:*")) == sorted(keys)
        assert len({key_slot(k.encode()) for k in keys}) == 1
        assert all(0 < client.pttl(k) <= 60_000 for k in keys)
        assert client.zrange("lodestar:jobs:unfinished", 0, -1) == []


def test_redis_create_job_writes_generation_0_in_the_job_slot_without_a_stray_ttl(
    redis_server: LocalRedis,
) -> None:
    """A leftover checkpoint key of an expiring search of the same id must not take the new
    job's generation 0 down with its TTL."""
    keys = SearchKeys.of("lodestar", "g0")

    async def main() -> None:
        async with RedisStateStore(redis_config(redis_server)) as store:
            await store.create_job(spec("g0"), b"initial")
            assert await store.load_checkpoint("g0") == (0, b"initial")

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        client.hset(keys.checkpoint, mapping={"g": "7", "d": "stray"})
        client.pexpire(keys.checkpoint, 60_000)
        asyncio.run(main())
        assert client.hgetall(keys.checkpoint) == {b"g": b"0", b"d": b"initial"}
        assert client.pttl(keys.checkpoint) == -1


def test_redis_index_drops_only_old_dangling_ids(redis_server: LocalRedis) -> None:
    """A young id without a job hash may be a job mid-creation; an old one is a crash's leftover."""

    async def main() -> list[str]:
        async with RedisStateStore(redis_config(redis_server)) as store:
            await store.create_job(spec("real"))
            return [job.search_id for job in await store.list_unfinished()]

    index = "lodestar:jobs:unfinished"
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        client.zadd(index, {"crashed": time.time() - DANGLING_AFTER_S - 1, "young": time.time()})
        assert asyncio.run(main()) == ["real"]
        assert sorted(client.zrange(index, 0, -1)) == [b"real", b"young"]


@pytest.mark.integration
def test_redis_password_comes_from_config_not_the_url() -> None:
    """The Helm chart passes the password from a Secret (LODESTAR_REDIS_PASSWORD), not a URL."""

    async def main(server: LocalRedis) -> None:
        async with RedisStateStore(redis_config(server, password="s3cret")) as store:
            await store.create_job(spec("p"))
            assert (await store.get_job("p")).search_id == "p"
        async with RedisStateStore(redis_config(server)) as anonymous:
            with pytest.raises(StateStoreUnavailable, match=r"(?i)auth"):
                await anonymous.get_job("p")

    server = LocalRedis(password="s3cret")
    server.start()
    try:
        asyncio.run(main(server))
    finally:
        server.close()


@pytest.mark.integration
def test_redis_outage_raises_unavailable_quickly_and_the_same_store_recovers() -> None:
    calls: dict[str, Callable[[StateStore], Awaitable[object]]] = {
        "ping": lambda s: s.ping(),
        "save_checkpoint": lambda s: s.save_checkpoint("o", 2, b"x"),
        "load_checkpoint": lambda s: s.load_checkpoint("o"),
        "create_job": lambda s: s.create_job(spec("o2")),
        "get_job": lambda s: s.get_job("o"),
        "update_job": lambda s: s.update_job("o", spend={"steps": 1}),
        "list_unfinished": lambda s: s.list_unfinished(),
        "claim_job": lambda s: s.claim_job("o", "orch-b", 30),
        "claim_orphans": lambda s: s.claim_orphans("orch-b", 30),
        "renew_lease": lambda s: s.renew_lease("o", "orch-a", 30),
        "append_event": lambda s: s.append_event("o", b"e"),
        "read_events": lambda s: s.read_events("o", wait_s=1.0),
        "request_cancel": lambda s: s.request_cancel("o"),
        "is_cancelled": lambda s: s.is_cancelled("o"),
    }

    async def main(server: LocalRedis) -> None:
        async with RedisStateStore(RedisStoreConfig(url=server.url)) as store:  # defaults
            await store.create_job(spec("o"))
            await store.claim_job("o", "orch-a", 30)
            await store.save_checkpoint("o", 1, b"before")
            server.stop()
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(StateStoreUnavailable, match=r"^state store unavailable: "):
                    await call(store)
                assert time.monotonic() - started < 3.0, name
            server.start()  # same port, empty: no persistence
            await store.ping()
            await store.create_job(spec("o"))  # scripts are re-sent after NOSCRIPT
            await store.save_checkpoint("o", 1, b"after")
            assert await store.load_checkpoint("o") == (1, b"after")

    with new_redis_server() as server:
        asyncio.run(main(server))


@pytest.mark.integration
def test_redis_hung_server_fails_within_the_bound_then_recovers() -> None:
    async def main(server: LocalRedis) -> None:
        async with RedisStateStore(RedisStoreConfig(url=server.url)) as store:  # defaults
            await store.save_checkpoint("h", 1, b"state")
            server.pause()
            try:
                started = time.monotonic()
                with pytest.raises(StateStoreUnavailable):
                    await store.save_checkpoint("h", 2, b"state")
                assert time.monotonic() - started < 3.0
            finally:
                server.resume()
            # The write may have reached Redis before the reply timed out: either way the
            # generation counter says what happened.
            stored = (await store.load_checkpoint("h")).generation
            await store.save_checkpoint("h", stored + 1, b"state")

    with new_redis_server() as server:
        asyncio.run(main(server))


def test_redis_blocking_readers_neither_starve_writers_nor_count_as_outages(
    redis_server: LocalRedis,
) -> None:
    config = redis_config(
        redis_server, socket_timeout_s=0.3, max_connections=1, max_stream_readers=1
    )

    async def main() -> None:
        async with RedisStateStore(config) as store:
            reader = asyncio.create_task(store.read_events("quiet", wait_s=0.8))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await store.save_checkpoint("busy", 1, b"state")
            assert time.monotonic() - started < 0.2
            assert await reader == []  # waited past the socket timeout without an error

    asyncio.run(main())


def test_redis_followers_of_500_searches_share_two_blocking_connections(
    redis_server: LocalRedis,
) -> None:
    """Every follower gets every event in order, though the store has two blocking connections
    and four others: waits share them. A tenth of the searches have a second, later follower
    (after=1) on the same stream; the server never sees more connections than the pools hold."""
    searches, rounds = 500, 3
    config = redis_config(redis_server, max_connections=4, max_stream_readers=2, pool_timeout_s=1.0)

    async def follow(store: StateStore, search_id: str, after: int = 0) -> list[int]:
        return [e.offset async for e in store.follow(search_id, after, wait_s=5.0)]

    async def main(client: redis.Redis) -> tuple[list[list[int]], list[list[int]], int]:
        async with RedisStateStore(config) as store:
            first = []
            for start in range(0, searches, 100):  # arriving over 0.25 s, as clients would
                ids = range(start, start + 100)
                first += [asyncio.create_task(follow(store, f"many-{i}")) for i in ids]
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # every follower parked, waiting for its first event
            early = [task for task in first if task.done()]
            assert not early, [task.exception() for task in early[:3]]
            peak = int(client.info("clients")["connected_clients"])
            second = []
            for r in range(1, rounds + 1):
                for i in range(searches):
                    await store.append_event(f"many-{i}", b"step", terminal=r == rounds)
                if r == 1:
                    tail = [f"many-{i}" for i in range(0, searches, 10)]
                    second = [asyncio.create_task(follow(store, s, after=1)) for s in tail]
                await asyncio.sleep(0.2)
                peak = max(peak, int(client.info("clients")["connected_clients"]))
            async with asyncio.timeout(10):
                return await asyncio.gather(*first), await asyncio.gather(*second), peak

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        started = time.monotonic()
        first, second, peak = asyncio.run(main(client))
        elapsed = time.monotonic() - started
    assert first == [[1, 2, 3]] * searches
    assert second == [[2, 3]] * (searches // 10)
    assert peak <= config.max_connections + config.max_stream_readers + 1  # + this client
    print(f"\n{searches} followers, {rounds} events each: {elapsed:.2f} s, peak {peak} clients")


@pytest.mark.integration
@pytest.mark.parametrize("outage", ["stopped", "paused"])
def test_redis_parked_waiters_hear_of_an_outage_within_the_bound_and_the_store_recovers(
    outage: str,
) -> None:
    """Waits parked in the shared readers fail as unavailable when Redis goes away (connection
    refused) or hangs (socket timeout), long before their own wait ends; then new waits work."""

    async def main(server: LocalRedis) -> tuple[list[BaseException | list[Any]], float]:
        async with RedisStateStore(RedisStoreConfig(url=server.url, max_stream_readers=2)) as store:
            waits = [asyncio.create_task(store.read_events(f"o{i}", wait_s=20)) for i in range(50)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            server.stop() if outage == "stopped" else server.pause()
            try:
                results = await asyncio.gather(*waits, return_exceptions=True)
                elapsed = time.monotonic() - started
            finally:
                server.start() if outage == "stopped" else server.resume()
            later = asyncio.create_task(store.read_events("o1", wait_s=5))
            await asyncio.sleep(0.1)
            await store.append_event("o1", b"back")
            assert [e.data for e in await later] == [b"back"]
            return results, elapsed

    with new_redis_server() as server:
        results, elapsed = asyncio.run(main(server))
    assert all(isinstance(r, StateStoreUnavailable) for r in results), results[:3]
    assert elapsed < 3.0


def test_open_state_store_picks_the_backend_from_the_url(redis_server: LocalRedis) -> None:
    assert isinstance(open_state_store("memory://"), MemoryStateStore)
    store = open_state_store(redis_server.url, finished_ttl_s=5)
    assert isinstance(store, RedisStateStore) and store.config.finished_ttl_s == 5
    asyncio.run(store.close())
    with pytest.raises(ValueError, match="unsupported"):
        open_state_store("postgres://x")


@pytest.mark.integration
def test_missing_redis_server_binary_is_a_failure_with_instructions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RedisServerMissing, match="apt-get install -y redis-server"):
        LocalRedis()


def test_redis_save_checkpoint_latency_on_loopback(redis_server: LocalRedis) -> None:
    """Printed for the record (run with -s), not asserted: timing is the machine's business."""
    data = bytes(4096)

    async def main() -> list[float]:
        async with RedisStateStore(redis_config(redis_server)) as store:
            samples = []
            for generation in range(1, 1001):
                started = time.perf_counter()
                await store.save_checkpoint("latency", generation, data)
                samples.append(time.perf_counter() - started)
            return samples

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    samples = sorted(asyncio.run(main()))
    p50, p99 = samples[len(samples) // 2], samples[int(len(samples) * 0.99)]
    print(
        f"\nsave_checkpoint (4 KiB, loopback): mean {statistics.fmean(samples) * 1e6:.0f} µs, "
        f"p50 {p50 * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs"
    )


def test_a_shared_read_never_serves_a_waiter_that_asked_for_earlier_entries() -> None:
    """Pure logic of the shared reader's hand-out: an XREAD sent from offset 1 (a key lingering
    there) returns entry 2; a waiter that joined meanwhile asking for everything after 0 (a
    follower whose previous wait timed out just as entry 1 was served) must not get [2], which
    would skip entry 1 (the 1,000-stream test saw such streams end with no progress event): it
    waits for the next round, read from its own offset. A waiter at 1 is served."""
    from lodestar.orchestrator.state_store.redis_stream_reader import (
        SharedStreamReader,
        _Shard,
        _Waiter,
    )

    async def main() -> tuple[bool, list[Any]]:
        reader = SharedStreamReader(None, None, prefix="t", shards=1, block_s=1, call_timeout_s=1)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        behind, current = _Waiter(0, 10, loop.create_future()), _Waiter(1, 10, loop.create_future())
        shard = _Shard("wake", waiting={"k": {behind, current}})
        served = reader._serve(shard, "k", [(b"0-2", {})], read_from=1)
        return served and not behind.served.done(), await current.served

    left_waiting, got = asyncio.run(main())
    assert left_waiting and got == [(b"0-2", {})]
