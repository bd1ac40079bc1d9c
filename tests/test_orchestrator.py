"""The orchestrator in one process: the shipped policy and the verifier as workers, the memory
state store (the Redis backend and Ray actors are exercised in test_distributed.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from lodestar.orchestrator import driver
from lodestar.orchestrator.algorithms.registry import ParamError
from lodestar.orchestrator.driver import (
    Orchestrator,
    OrchestratorConfig,
    Overloaded,
)
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import JobSpec, JobStatus, MemoryStateStore, StateStore
from tests.runtime_parts import (
    Paced,
    comparable,
    problem_specs,
    shipped_workers,
    solve_alone,
)
from tests.store_backends import Backend


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return shipped_workers()


def reference(models: tuple[Any, Any], specs: list[JobSpec]) -> list[dict[str, Any]]:
    """Each search run alone in process, the same seeds."""
    return solve_alone(models, specs)


def run(
    body: Callable[[Orchestrator, StateStore], Awaitable[Any]],
    workers: Callable[[], LocalWorkers],
    **config: Any,
) -> Any:
    async def main() -> Any:
        store = MemoryStateStore()
        orch = Orchestrator(store, workers(), OrchestratorConfig(**config))
        await orch.start()
        try:
            return await body(orch, store)
        finally:
            await orch.close()

    return asyncio.run(main())


async def events_of(store: StateStore, search_id: str) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in await store.read_events(search_id, limit=1000)]


async def first_progress(store: StateStore, search_id: str) -> None:
    assert await store.read_events(search_id, wait_s=30.0), "no progress within 30 s"


def test_searches_through_the_orchestrator_equal_their_in_process_runs(models) -> None:
    specs = problem_specs(6, "basic")

    async def body(orch: Orchestrator, store: StateStore) -> list[Any]:
        records = await asyncio.gather(*(orch.solve(s) for s in specs))
        return [(r, await events_of(store, r.search_id)) for r in records]

    out = run(body, lambda: LocalWorkers(*models))
    assert [comparable(r.result) for r, _ in out] == reference(models, specs)
    for record, events in out:
        assert record.status is JobStatus.SUCCEEDED
        progress, terminal = events[:-1], events[-1]
        assert [e["generation"] for e in progress] == list(range(1, len(progress) + 1))
        assert progress[-1]["done"] and not any(e["done"] for e in progress[:-1])
        assert terminal["status"] == "succeeded"
        assert terminal["final_answer"] == json.loads(record.result)["final_answer"]
        assert record.spend == json.loads(record.result)["spend"]


def test_submit_beyond_live_plus_queued_fails_fast_and_stores_nothing(models) -> None:
    a, b, c = problem_specs(3, "admit")

    async def body(orch: Orchestrator, store: StateStore) -> None:
        await orch.submit(a)
        await orch.submit(b)  # waits for the one live slot
        with pytest.raises(Overloaded, match="overloaded: 2 searches"):
            await orch.submit(c)
        assert await store.get_job(c.search_id) is None
        assert (await orch.wait(a.search_id)).status is JobStatus.SUCCEEDED
        assert (await orch.wait(b.search_id)).status is JobStatus.SUCCEEDED
        assert (await orch.solve(c)).status is JobStatus.SUCCEEDED  # room again

    run(body, lambda: LocalWorkers(Paced(models[0], 0.05), models[1]), max_live=1, max_queued=1)


def test_invalid_parameters_are_rejected_before_anything_is_stored(models) -> None:
    bad = JobSpec("bad-0", "pf", {"n": 0}, "3+4", seed=0)
    unknown = JobSpec("bad-1", "pf", {"particles": 4}, "3+4", seed=0)

    async def body(orch: Orchestrator, store: StateStore) -> None:
        for spec, field in ((bad, "n"), (unknown, "particles")):
            with pytest.raises(ParamError) as info:
                await orch.submit(spec)
            assert info.value.field.endswith(field)
            assert await store.get_job(spec.search_id) is None

    run(body, lambda: LocalWorkers(*models))


def test_cancel_stops_a_running_search_at_the_next_step_and_frees_its_caches(models) -> None:
    (spec,) = problem_specs(1, "cancel", ops=3, params={"n": 8})
    policy = Paced(models[0], 0.3)

    async def body(orch: Orchestrator, store: StateStore) -> None:
        await orch.submit(spec)
        await first_progress(store, spec.search_id)
        await orch.cancel(spec.search_id)
        record = await orch.wait(spec.search_id)
        assert record.status is JobStatus.CANCELLED and record.result is None
        events = await events_of(store, spec.search_id)
        assert events[-1]["status"] == "cancelled"
        checkpoint = await store.load_checkpoint(spec.search_id)
        assert checkpoint is not None and checkpoint.generation <= 2
        assert policy.release_prefix(f"{spec.search_id}/") == 0  # already released

    run(body, lambda: LocalWorkers(policy, models[1]))


def test_a_queued_search_cancelled_before_its_turn_never_starts(models) -> None:
    first, second = problem_specs(2, "cancel-queued")

    async def body(orch: Orchestrator, store: StateStore) -> None:
        await orch.submit(first)
        await orch.submit(second)
        await orch.cancel(second.search_id)
        assert (await orch.wait(second.search_id)).status is JobStatus.CANCELLED
        assert (await store.load_checkpoint(second.search_id)).generation == 0  # submit's only
        assert (await orch.wait(first.search_id)).status is JobStatus.SUCCEEDED

    run(body, lambda: LocalWorkers(Paced(models[0], 0.05), models[1]), max_live=1)


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The search ids whose initial state the driver builds from their spec, from now on."""
    built: list[str] = []
    real = driver._initial_checkpoint

    def counted(spec: JobSpec) -> bytes:
        built.append(spec.search_id)
        return real(spec)

    monkeypatch.setattr(driver, "_initial_checkpoint", counted)
    return built


def test_submit_stores_generation_0_and_the_search_starts_from_it_without_rebuilding(
    models, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state `check` built is the job's first checkpoint, in the store before any step runs
    (the second search waits queued behind the first); `_drive` loads it, never the spec."""
    specs = problem_specs(2, "gen0", params={"n": 8})
    built = count_builds(monkeypatch)

    async def body(store: StateStore) -> tuple[list[Any], list[Any]]:
        workers = LocalWorkers(Paced(models[0], 0.05), models[1])
        orch = Orchestrator(store, workers, OrchestratorConfig(max_live=1))
        await orch.start()
        try:
            for s in specs:
                await orch.submit(s)
            stored = [await store.load_checkpoint(s.search_id) for s in specs]
            return stored, [await orch.wait(s.search_id) for s in specs]
        finally:
            await orch.close()

    out: list[Any] = []
    backend.run(lambda store: _keep(out, body(store)))
    (queued_at, records), ids = out[0], [s.search_id for s in specs]
    assert built == ids  # once each, at submit
    assert queued_at[1].generation == 0  # queued: no step has run
    assert queued_at[1].data == driver._initial_checkpoint(specs[1])
    assert all(r.status is JobStatus.SUCCEEDED for r in records)
    assert [comparable(r.result) for r in records] == reference(models, specs)


def test_a_job_stored_without_a_checkpoint_by_older_code_still_runs(
    models, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs an older version left in a user's Redis have no generation 0: the driver builds it
    from the spec (the fallback) and the search ends as it would have."""
    (spec,) = problem_specs(1, "old-job")
    built = count_builds(monkeypatch)

    async def body(store: StateStore) -> Any:
        await store.create_job(spec)  # what submit stored before generation 0 came with it
        assert await store.load_checkpoint(spec.search_id) is None
        config = OrchestratorConfig(lease_s=0.5, scan_interval_s=0.1)
        orch = Orchestrator(store, LocalWorkers(*models), config)
        await orch.start()  # claims it as an orphan; wait follows it through the store
        try:
            return await asyncio.wait_for(orch.wait(spec.search_id), 60)
        finally:
            await orch.close()

    out: list[Any] = []
    backend.run(lambda store: _keep(out, body(store)))
    assert built == [spec.search_id]
    assert out[0].status is JobStatus.SUCCEEDED
    assert [comparable(out[0].result)] == reference(models, [spec])


async def _keep(out: list[Any], body: Awaitable[Any]) -> None:
    out.append(await body)


def test_an_orphaned_search_resumes_from_its_checkpoint_with_the_same_result(models) -> None:
    """Orchestrator A stops after the first step without finishing (as if it died); B, with
    empty worker caches, claims the job once A's lease lapses and finishes it."""
    specs = problem_specs(3, "orphan", ops=3, params={"n": 6})
    lease = dict(lease_s=0.5, scan_interval_s=0.1)

    async def main() -> list[Any]:
        store = MemoryStateStore()
        a_workers = LocalWorkers(Paced(models[0], 0.2), models[1])
        a = Orchestrator(store, a_workers, OrchestratorConfig(resume_orphans=False, **lease))
        await a.start()
        for s in specs:
            await a.submit(s)
        for s in specs:
            await first_progress(store, s.search_id)
        await a.close()
        stopped_at = [(await store.load_checkpoint(s.search_id)).generation for s in specs]
        b = Orchestrator(store, LocalWorkers(*shipped_workers()), OrchestratorConfig(**lease))
        await b.start()
        try:
            records = [await asyncio.wait_for(b.wait(s.search_id), 60) for s in specs]
        finally:
            await b.close()
        events = [await events_of(store, s.search_id) for s in specs]
        return [records, stopped_at, events, b.owner]

    records, stopped_at, events, b_owner = asyncio.run(main())
    assert [comparable(r.result) for r in records] == reference(models, specs)
    for record, generation, log in zip(records, stopped_at, events, strict=True):
        assert record.status is JobStatus.SUCCEEDED and record.owner == b_owner
        progress = [e["generation"] for e in log[:-1]]
        assert generation >= 1 and progress == list(range(1, len(progress) + 1))


def test_lease_renewal_ignores_a_search_that_just_finished_but_stops_a_taken_one(
    models, caplog: pytest.LogCaptureFixture
) -> None:
    """A search is marked finished in the store a moment before its task leaves the running set;
    a renewal in that window must not report a lost lease. A job another owner claimed must."""
    done, taken = problem_specs(2, "renew", params={"n": 2})

    async def main() -> set[str]:
        store = MemoryStateStore()
        config = OrchestratorConfig(lease_s=0.2, scan_interval_s=0.1)
        orch = Orchestrator(store, LocalWorkers(*models), config)
        for spec in (done, taken):
            await store.create_job(spec)
            await store.claim_job(spec.search_id, orch.owner, 0.2)
            orch._running.add(spec.search_id)
        await store.update_job(done.search_id, status=JobStatus.SUCCEEDED, result="{}")
        await asyncio.sleep(0.3)  # the other job's lease lapses; someone else takes it
        assert await store.claim_job(taken.search_id, "orch-other", 30) is not None
        await orch._renew_leases()
        return orch._lost

    with caplog.at_level("WARNING", logger="lodestar.orchestrator.driver"):
        lost = asyncio.run(main())
    assert lost == {"renew-1"}
    assert [r.getMessage() for r in caplog.records] == ["search renew-1: lease lost, stopping here"]
