"""Batch records in the search-state store: one specification, run on both backends.

A batch is many searches submitted together and followed as one unit: its record counts finished
items by status and logs them in finish order. Like tests/test_state_store.py, the Redis runs use
a private redis-server and fail (never skip) without one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from lodestar.orchestrator.state_store import (
    BatchExists,
    BatchNotFound,
    BatchRecord,
    BatchResult,
    InvalidTransition,
    JobExists,
    JobSpec,
    JobStatus,
    StateStore,
    StateStoreUnavailable,
)
from lodestar.orchestrator.state_store.redis_keys import BatchKeys
from lodestar.orchestrator.state_store.redis_store import RedisStateStore, RedisStoreConfig
from lodestar.services.local_redis import LocalRedis
from lodestar.workers.messages import ErrorKind
from tests.redis_server import new_redis_server
from tests.store_backends import Backend
from tests.test_state_store import redis_config, spec

SETTINGS = {"algorithm": "pf", "params": {"n_particles": 4}, "tags": ["gsm8k", 2]}
ZERO = {"succeeded": 0, "failed": 0, "cancelled": 0}


def items(batch_id: str, n: int, **overrides: Any) -> list[JobSpec]:
    """The specs of a batch's items, as the service would build them from a JSONL file."""
    return [
        spec(f"{batch_id}-{i}", batch_id=batch_id, batch_index=i, **overrides) for i in range(n)
    ]


async def finish(store: StateStore, search_id: str, status: JobStatus) -> None:
    """Finish the way an orchestrator does: succeeded needs a running job, the others don't."""
    if status is JobStatus.SUCCEEDED:
        await store.claim_job(search_id, "orch-a", 30)
    await store.update_job(search_id, status=status)


def triples(results: list[BatchResult]) -> list[tuple[int, str, int, JobStatus]]:
    return [(r.offset, r.search_id, r.index, r.status) for r in results]


# -- creation ---------------------------------------------------------------------------------


def test_create_batch_makes_a_record_and_one_queued_job_per_item(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        before = time.time()
        created = await store.create_batch("b1", SETTINGS, items("b1", 3))
        assert isinstance(created, BatchRecord)
        assert (created.batch_id, created.size, created.settings) == ("b1", 3, SETTINGS)
        assert created.counts == ZERO and created.finished == 0 and not created.done
        assert before - 1 <= created.created_at <= time.time() + 1
        assert await store.get_batch("b1") == created
        assert await store.get_batch("nobody") is None

        for i, item in enumerate(items("b1", 3)):
            job = await store.get_job(f"b1-{i}")
            assert job is not None and job.status is JobStatus.QUEUED and job.owner is None
            assert job.spec == item and (job.spec.batch_id, job.spec.batch_index) == ("b1", i)
        await store.create_job(spec("lone"))  # lone jobs keep working beside batch items
        assert (await store.get_job("lone")).spec.batch_id is None
        listed = [job.search_id for job in await store.list_unfinished()]
        assert sorted(listed) == ["b1-0", "b1-1", "b1-2", "lone"]
        claimed = {job.search_id for job in await store.claim_orphans("orch-a", 30, limit=10)}
        assert claimed == {"b1-0", "b1-1", "b1-2", "lone"}
        assert await store.read_batch_results("b1") == []

    backend.run(body)


def test_taken_batch_or_search_ids_leave_nothing_behind(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create_batch("b1", SETTINGS, items("b1", 2))
        renamed = [spec(f"other-{i}", batch_id="b1", batch_index=i) for i in range(2)]
        with pytest.raises(BatchExists, match="'b1'"):
            await store.create_batch("b1", {"changed": True}, renamed)
        assert (await store.get_batch("b1")).settings == SETTINGS
        assert [await store.get_job(f"other-{i}") for i in range(2)] == [None, None]

        await store.create_job(spec("taken"))
        specs = [*items("b2", 3), spec("taken", batch_id="b2", batch_index=3)]
        with pytest.raises(JobExists, match="'taken'"):
            await store.create_batch("b2", SETTINGS, specs)
        assert await store.get_batch("b2") is None
        with pytest.raises(BatchNotFound):
            await store.read_batch_results("b2")
        assert [await store.get_job(f"b2-{i}") for i in range(3)] == [None, None, None]
        assert (await store.get_job("taken")).spec.batch_id is None
        listed = {job.search_id for job in await store.list_unfinished()}
        assert listed == {"b1-0", "b1-1", "taken"}
        # The refused ids are free again: the same batch goes through once "taken" is not in it.
        assert (await store.create_batch("b2", SETTINGS, items("b2", 3))).size == 3

    backend.run(body)


def test_every_item_is_created_with_its_own_generation_0_checkpoint(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        initial = [f"initial {i}".encode() for i in range(3)]
        with pytest.raises(ValueError, match="2 initial checkpoints for 3 items"):
            await store.create_batch("g0", SETTINGS, items("g0", 3), initial[:2])
        with pytest.raises(TypeError):
            await store.create_batch("g0", SETTINGS, items("g0", 3), [*initial[:2], "text"])
        assert await store.get_batch("g0") is None and await store.get_job("g0-0") is None
        await store.create_batch("g0", SETTINGS, items("g0", 3), initial)
        stored = [await store.load_checkpoint(f"g0-{i}") for i in range(3)]
        assert stored == [(0, data) for data in initial]
        await store.record_step("g0-1", 1, b"s1", b"e1")
        assert await store.load_checkpoint("g0-1") == (1, b"s1")

    backend.run(body)


def test_items_must_name_their_batch_in_order(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        swapped = items("b", 3)
        swapped[1], swapped[2] = swapped[2], swapped[1]
        foreign = [*items("b", 2), spec("b-2", batch_id="elsewhere", batch_index=2)]
        twice = [*items("b", 2), spec("b-0", batch_id="b", batch_index=2)]
        for bad in (swapped, foreign, twice, []):
            with pytest.raises(ValueError):
                await store.create_batch("b", SETTINGS, bad)
        with pytest.raises(ValueError):
            await store.create_batch("b{x}", SETTINGS, items("b{x}", 1))
        assert await store.get_batch("b") is None and await store.get_job("b-0") is None
        with pytest.raises(ValueError, match="create_batch"):
            await store.create_job(spec("x", batch_id="b", batch_index=0))
        with pytest.raises(ValueError, match="both"):
            spec("x", batch_id="b")
        with pytest.raises(ValueError, match="batch_index"):
            spec("x", batch_id="b", batch_index=-1)

    backend.run(body)


# -- finishing items --------------------------------------------------------------------------


def test_finished_items_are_counted_and_logged_in_finish_order(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create_batch("fin", SETTINGS, items("fin", 4))
        await store.claim_job("fin-1", "orch-a", 30)
        await store.update_job("fin-1", spend={"steps": 3})  # not finished: not counted
        assert (await store.get_batch("fin")).finished == 0

        order = [
            ("fin-2", JobStatus.SUCCEEDED),
            ("fin-0", JobStatus.FAILED),
            ("fin-3", JobStatus.CANCELLED),
            ("fin-1", JobStatus.SUCCEEDED),
        ]
        for n, (search_id, status) in enumerate(order, start=1):
            await finish(store, search_id, status)
            record = await store.get_batch("fin")
            assert record.finished == n and record.done == (n == 4)
        assert record.counts == {"succeeded": 2, "failed": 1, "cancelled": 1}
        assert triples(await store.read_batch_results("fin")) == [
            (1, "fin-2", 2, JobStatus.SUCCEEDED),
            (2, "fin-0", 0, JobStatus.FAILED),
            (3, "fin-3", 3, JobStatus.CANCELLED),
            (4, "fin-1", 1, JobStatus.SUCCEEDED),
        ]

    backend.run(body)


def test_a_retried_finish_counts_the_item_once(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create_batch("r", SETTINGS, items("r", 2))
        await finish(store, "r-0", JobStatus.SUCCEEDED)
        with pytest.raises(InvalidTransition, match="finished"):
            await store.update_job("r-0", status=JobStatus.SUCCEEDED)  # the retry
        job = await store.get_job("r-0")
        assert await store._finish_batch_item(job) is False  # type: ignore[attr-defined]
        assert await store._finish_batch_item(job) is False  # type: ignore[attr-defined]
        assert (await store.get_batch("r")).counts == ZERO | {"succeeded": 1}
        assert [r.search_id for r in await store.read_batch_results("r")] == ["r-0"]

        # The crash window: the job finished but its batch step never ran (the reply was lost).
        # The caller's retry meets a finished job and completes the batch step before refusing.
        await store._update_job_only("r-1", status=JobStatus.FAILED)  # type: ignore[attr-defined]
        assert (await store.get_batch("r")).finished == 1
        with pytest.raises(InvalidTransition):
            await store.update_job("r-1", status=JobStatus.FAILED)
        record = await store.get_batch("r")
        assert record.counts == {"succeeded": 1, "failed": 1, "cancelled": 0} and record.done
        with pytest.raises(InvalidTransition):
            await store.update_job("r-1", status=JobStatus.FAILED)
        assert (await store.get_batch("r")).finished == 2
        assert [r.offset for r in await store.read_batch_results("r")] == [1, 2]

    backend.run(body)


def test_reconcile_batch_counts_items_whose_batch_step_was_lost(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create_batch("rc", SETTINGS, items("rc", 4))
        await finish(store, "rc-3", JobStatus.CANCELLED)
        await store.claim_job("rc-0", "orch-a", 30)
        await store._update_job_only("rc-0", status=JobStatus.SUCCEEDED)  # type: ignore[attr-defined]
        await store._update_job_only("rc-2", status=JobStatus.FAILED)  # type: ignore[attr-defined]
        assert (await store.get_batch("rc")).counts == ZERO | {"cancelled": 1}

        repaired = await store.reconcile_batch("rc")
        assert repaired.counts == {"succeeded": 1, "failed": 1, "cancelled": 1}
        assert repaired == await store.get_batch("rc") and not repaired.done
        results = await store.read_batch_results("rc")
        assert [r.offset for r in results] == [1, 2, 3]
        assert sorted(triples(results)[1:]) == [
            (2, "rc-0", 0, JobStatus.SUCCEEDED),
            (3, "rc-2", 2, JobStatus.FAILED),
        ]
        assert await store.reconcile_batch("rc") == repaired  # idempotent
        assert len(await store.read_batch_results("rc")) == 3
        with pytest.raises(BatchNotFound, match="no batch 'ghost'"):
            await store.reconcile_batch("ghost")

    backend.run(body)


# -- cancelling, and what is left open ---------------------------------------------------------

EVENT = b'{"status": "cancelled"}'
"""The terminal event a cancelled item's log ends with (the orchestrator's, opaque here)."""


def test_cancel_batch_finishes_queued_items_and_flags_running_ones(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create_batch("cx", SETTINGS, items("cx", 5))
        await store.claim_job("cx-1", "orch-a", 30)  # running on some orchestrator
        await finish(store, "cx-2", JobStatus.SUCCEEDED)
        await store.claim_job("cx-4", "orch-a", 30)
        await store._update_job_only("cx-4", status=JobStatus.FAILED)  # type: ignore[attr-defined]
        await store.create_job(spec("lone"))

        record = await store.cancel_batch("cx", EVENT)
        assert record == await store.get_batch("cx")
        assert record.counts == {"succeeded": 1, "failed": 1, "cancelled": 2} and not record.done
        for i in (0, 3):  # queued: finished now, so no orchestrator ever starts them
            job = await store.get_job(f"cx-{i}")
            assert job.status is JobStatus.CANCELLED and job.owner is None
            assert (job.error, job.error_kind) == ("cancelled", ErrorKind.CANCELLED)
            events = await store.read_events(f"cx-{i}")
            assert [(e.offset, e.data, e.terminal) for e in events] == [(1, EVENT, True)]
        running = await store.get_job("cx-1")
        assert running.status is JobStatus.RUNNING and await store.is_cancelled("cx-1")
        assert (await store.get_job("cx-2")).status is JobStatus.SUCCEEDED
        assert not await store.is_cancelled("cx-2") and not await store.is_cancelled("lone")
        assert [job.search_id for job in await store.list_unfinished()] == ["cx-1", "lone"]
        assert [job.search_id for job in await store.claim_orphans("orch-b", 30)] == ["lone"]

        assert await store.cancel_batch("cx", EVENT) == record  # idempotent
        assert len(await store.read_events("cx-0")) == 1
        await store.update_job("cx-1", status=JobStatus.CANCELLED)  # its orchestrator stops it
        done = await store.get_batch("cx")
        assert done.done and done.counts == {"succeeded": 1, "failed": 1, "cancelled": 3}
        results = sorted((r.index, r.status) for r in await store.read_batch_results("cx"))
        C, S, F = JobStatus.CANCELLED, JobStatus.SUCCEEDED, JobStatus.FAILED
        assert results == [(0, C), (1, C), (2, S), (3, C), (4, F)]
        with pytest.raises(BatchNotFound, match="'ghost'"):
            await store.cancel_batch("ghost", EVENT)

    backend.run(body)


def test_open_batch_items_count_the_unfinished_items_of_every_batch(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.open_batch_items() == 0
        await store.create_batch("oa", SETTINGS, items("oa", 3))
        await store.create_batch("ob", SETTINGS, items("ob", 2))
        await store.create_job(spec("lone"))  # not a batch item
        assert await store.open_batch_items() == 5
        await store.claim_job("oa-0", "orch-a", 30)  # running still counts
        assert await store.open_batch_items() == 5
        await finish(store, "oa-1", JobStatus.SUCCEEDED)
        assert await store.open_batch_items() == 4
        await store.cancel_batch("ob", EVENT)
        assert await store.open_batch_items() == 2
        taken = [*items("oc", 2), spec("lone", batch_id="oc", batch_index=2)]
        with pytest.raises(JobExists):
            await store.create_batch("oc", SETTINGS, taken)
        assert await store.open_batch_items() == 2  # a refused batch adds nothing
        for search_id in ("oa-0", "oa-2"):
            await finish(store, search_id, JobStatus.FAILED)
        assert await store.open_batch_items() == 0

    backend.run(body)


# -- reading results --------------------------------------------------------------------------


def test_batch_results_read_from_any_offset_with_a_limit(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create_batch("rd", SETTINGS, items("rd", 5))
        for i in (4, 1, 3, 0, 2):
            await finish(store, f"rd-{i}", JobStatus.FAILED)
        assert [r.index for r in await store.read_batch_results("rd")] == [4, 1, 3, 0, 2]
        assert [r.offset for r in await store.read_batch_results("rd", after=3)] == [4, 5]
        page = await store.read_batch_results("rd", after=1, limit=2)
        assert [(r.offset, r.index) for r in page] == [(2, 1), (3, 3)]
        assert await store.read_batch_results("rd", after=5) == []
        with pytest.raises(ValueError):
            await store.read_batch_results("rd", after=-1)
        with pytest.raises(BatchNotFound):
            await store.read_batch_results("ghost", wait_s=0.1)

    backend.run(body)


def test_blocking_batch_read_wakes_when_an_item_finishes(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create_batch("w", SETTINGS, items("w", 2))
        started = time.monotonic()
        assert await store.read_batch_results("w", wait_s=0.2) == []
        assert 0.15 <= time.monotonic() - started < 1.0

        async def finish_later() -> None:
            await asyncio.sleep(0.15)
            await finish(store, "w-1", JobStatus.SUCCEEDED)

        started = time.monotonic()
        results, _ = await asyncio.gather(store.read_batch_results("w", wait_s=5), finish_later())
        assert triples(results) == [(1, "w-1", 1, JobStatus.SUCCEEDED)]
        assert time.monotonic() - started < 1.0

    backend.run(body)


# -- expiry -----------------------------------------------------------------------------------


def test_a_done_batch_expires_after_the_ttl_and_an_open_one_does_not(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create_batch("closed", SETTINGS, items("closed", 2))
        await store.create_batch("open", SETTINGS, items("open", 2))
        for search_id in ("closed-0", "closed-1", "open-0"):
            await finish(store, search_id, JobStatus.CANCELLED)
        assert (await store.get_batch("closed")).done
        await asyncio.sleep(0.6)
        assert await store.get_batch("closed") is None
        with pytest.raises(BatchNotFound):
            await store.read_batch_results("closed")
        still = await store.get_batch("open")  # its finished item's job has expired meanwhile
        assert still is not None and still.counts == ZERO | {"cancelled": 1}
        assert await store.get_job("open-0") is None
        assert len(await store.read_batch_results("open")) == 1
        await finish(store, "open-1", JobStatus.FAILED)
        assert (await store.reconcile_batch("open")).done

    backend.run(body, finished_ttl_s=0.4)


# -- Redis only -------------------------------------------------------------------------------


def test_redis_batch_keys_share_a_slot_and_get_the_ttl_once_done(
    redis_server: LocalRedis,
) -> None:
    keys = BatchKeys.of("lodestar", "slot").all()

    async def main(client: redis.Redis) -> None:
        async with RedisStateStore(redis_config(redis_server, finished_ttl_s=60)) as store:
            await store.create_batch("slot", SETTINGS, items("slot", 2))
            await finish(store, "slot-0", JobStatus.SUCCEEDED)
            assert all(client.pttl(k) == -1 for k in keys)  # one item left: no TTL yet
            await finish(store, "slot-1", JobStatus.FAILED)

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        asyncio.run(main(client))
        assert sorted(k.decode() for k in client.keys("lodestar:batch:*")) == sorted(keys)
        assert len({key_slot(k.encode()) for k in keys}) == 1
        assert all(0 < client.pttl(k) <= 60_000 for k in keys)


def test_redis_creates_a_thousand_item_batch_in_pipelined_chunks(
    redis_server: LocalRedis,
) -> None:
    """Printed for the record (run with -s), not asserted: timing is the machine's business.
    Each item carries a generation-0 checkpoint the size of a PF n=8 one (~700 B + problem)."""
    specs = items("big", 1000, problem={"question": "x" * 200})
    initial = [b"s" * 900] * len(specs)

    async def main() -> float:
        async with RedisStateStore(redis_config(redis_server)) as store:
            started = time.perf_counter()
            record = await store.create_batch("big", SETTINGS, specs, initial)
            elapsed = time.perf_counter() - started
            assert record.size == 1000 and record.counts == ZERO
            unfinished = await store.list_unfinished()
            by_id = {job.search_id: job.spec for job in unfinished}
            assert by_id == {item.search_id: item for item in specs}
            assert len(await store.claim_orphans("orch-a", 30, limit=1000)) == 1000
            for i in (0, 999):
                await store.update_job(f"big-{i}", status=JobStatus.SUCCEEDED)
            assert (await store.reconcile_batch("big")).finished == 2
            return elapsed

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        elapsed = asyncio.run(main())
        assert client.llen("lodestar:batch:{big}:items") == 1000
        assert client.hget("lodestar:{big-500}:checkpoint", "g") == b"0"
    print(f"\ncreate_batch (1,000 items, loopback): {elapsed * 1e3:.0f} ms")


def test_redis_cancels_a_thousand_item_batch_and_every_cancelled_key_expires(
    redis_server: LocalRedis,
) -> None:
    """Pipelined like create_batch (printed for the record, -s); the queued items' keys all get
    the finished TTL and only the running items get a cancel flag: nothing is left behind."""
    specs = items("huge", 1000)

    async def main() -> float:
        async with RedisStateStore(redis_config(redis_server, finished_ttl_s=60)) as store:
            await store.create_batch("huge", SETTINGS, specs, [b"initial"] * len(specs))
            for i in range(10):
                await store.claim_job(f"huge-{i}", "orch-a", 30)
            assert await store.open_batch_items() == 1000
            started = time.perf_counter()
            record = await store.cancel_batch("huge", EVENT)
            elapsed = time.perf_counter() - started
            assert record.counts == ZERO | {"cancelled": 990} and not record.done
            assert await store.open_batch_items() == 10
            assert len(await store.read_batch_results("huge", limit=1000)) == 990
            assert sorted(j.search_id for j in await store.list_unfinished()) == sorted(
                f"huge-{i}" for i in range(10)
            )
            return elapsed

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        elapsed = asyncio.run(main())
        flags = sorted(k.decode() for k in client.keys("lodestar:{huge-*}:cancel"))
        assert flags == sorted(f"lodestar:{{huge-{i}}}:cancel" for i in range(10))
        for i in (10, 500, 999):  # a cancelled queued item: job, generation 0 and event log
            keys = [f"lodestar:{{huge-{i}}}:{k}" for k in ("job", "checkpoint", "events")]
            assert all(0 < client.pttl(k) <= 60_000 for k in keys), i
    print(f"\ncancel_batch (1,000 items, 990 queued, loopback): {elapsed * 1e3:.0f} ms")


def test_redis_create_batch_rolls_back_when_a_job_appears_under_it(
    redis_server: LocalRedis,
) -> None:
    """A search id taken after the up-front check: the jobs already written are deleted, and
    until then they were held back from `claim_orphans`, so no orchestrator started one."""

    async def main() -> None:
        async with RedisStateStore(redis_config(redis_server)) as store:
            reserve, roll_back = store._create_batch, store._roll_back_batch
            claimed_before_rollback: list[str] = []

            async def reserve_then_race(**kwargs: Any) -> Any:
                reply = await reserve(**kwargs)
                await store.create_job(spec("race-700"))  # another creator, just in time
                return reply

            async def claim_then_roll_back(*args: Any) -> None:
                orphans = await store.claim_orphans("orch-a", 30, limit=2000)
                claimed_before_rollback.extend(job.search_id for job in orphans)
                await roll_back(*args)

            store._create_batch = reserve_then_race  # type: ignore[method-assign]
            store._roll_back_batch = claim_then_roll_back  # type: ignore[method-assign]
            with pytest.raises(JobExists, match="race-700"):
                initial = [b"initial"] * 1000  # rolled back with the jobs (keys checked below)
                await store.create_batch("race", SETTINGS, items("race", 1000), initial)
            assert claimed_before_rollback == ["race-700"]  # 999 batch jobs existed, held
            assert await store.get_batch("race") is None
            assert [job.search_id for job in await store.list_unfinished()] == ["race-700"]
            assert (await store.get_job("race-700")).spec.batch_id is None

    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        asyncio.run(main())
        assert client.keys("lodestar:batch:*") == []
        assert client.keys("lodestar:{race-*") == [b"lodestar:{race-700}:job"]


@pytest.mark.integration
def test_redis_batch_calls_raise_unavailable_in_an_outage() -> None:
    async def main(server: LocalRedis) -> None:
        async with RedisStateStore(RedisStoreConfig(url=server.url)) as store:  # defaults
            await store.create_batch("o", SETTINGS, items("o", 2))
            server.stop()
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "create_batch": lambda: store.create_batch("o2", SETTINGS, items("o2", 2)),
                "get_batch": lambda: store.get_batch("o"),
                "read_batch_results": lambda: store.read_batch_results("o", wait_s=1.0),
                "reconcile_batch": lambda: store.reconcile_batch("o"),
                "cancel_batch": lambda: store.cancel_batch("o", EVENT),
                "open_batch_items": lambda: store.open_batch_items(),
                "update_job": lambda: store.update_job("o-0", status=JobStatus.CANCELLED),
            }
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(StateStoreUnavailable, match=r"^state store unavailable: "):
                    await call()
                assert time.monotonic() - started < 3.0, name
            server.start()
            await store.create_batch("o", SETTINGS, items("o", 2))  # empty server, works again

    with new_redis_server() as server:
        asyncio.run(main(server))
