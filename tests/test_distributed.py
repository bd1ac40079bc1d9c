"""The distributed runtime with real parts: a local Ray, model actors holding the shipped models,
a private redis-server, and the failures the runtime promises to survive."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lodestar.orchestrator.driver import Orchestrator, OrchestratorConfig
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import (
    JobSpec,
    JobStatus,
    StateStoreUnavailable,
    open_state_store,
)
from lodestar.orchestrator.worker_pool import PoolConfig, RayWorkerPool
from lodestar.services.local_redis import LocalRedis
from lodestar.workers.factory import ModelConfig
from lodestar.workers.messages import ErrorKind
from tests.orchestrator_process import LEASE
from tests.runtime_parts import (
    Paced,
    assert_same_results,
    comparable,
    problem_specs,
    shipped_workers,
    solve_alone,
    stepped,
)

REPO = Path(__file__).resolve().parents[1]


def reference(specs: list[JobSpec], reward: str = "verifier") -> list[dict[str, Any]]:
    """Each search run alone, in process, on its own workers: the undisturbed result."""
    return solve_alone(shipped_workers(reward), specs)


async def wait_for_checkpoints(store: Any, specs: list[JobSpec], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    for s in specs:
        while not await stepped(store, s.search_id):
            assert time.monotonic() < deadline, f"{s.search_id} made no progress"
            await asyncio.sleep(0.05)


def test_half_gpu_actors_share_one_gpu_and_searches_spread_across_them(ray_cluster) -> None:
    config = PoolConfig(combined=True, policy_workers=2, num_gpus=0.5, threads=1)

    async def main() -> tuple[list[dict[str, Any]], list[int], JobStatus]:
        pool = RayWorkerPool(config)
        try:
            infos = await pool.ready()
            scopes = [pool.scope(f"spread-{i}") for i in range(4)]
            live = [m.live for m in pool.members]
            for i in range(4):
                await pool.release(f"spread-{i}")
            assert len(scopes) == 4 and pool.live_searches == 0
            async with open_state_store("memory://") as store:
                orch = Orchestrator(store, pool)
                (spec,) = problem_specs(1, "placed")
                status = (await orch.solve(spec)).status
                await orch.close()
            return infos, live, status
        finally:
            pool.shutdown()

    infos, live, status = asyncio.run(main())
    assert [i["gpu_ids"] for i in infos] == [["0"], ["0"]]
    assert len({i["pid"] for i in infos}) == 2
    assert all(i["roles"] == ["policy", "reward"] and i["torch_threads"] == 1 for i in infos)
    assert all(i["device"] == "cpu" for i in infos)  # logical GPU, no CUDA: the CPU path
    assert live == [2, 2]
    assert status is JobStatus.SUCCEEDED


def kill_policy_actor_mid_search(
    config: PoolConfig, specs: list[JobSpec], timeout_s: float
) -> list[Any]:
    """Run `specs` on a fresh pool, SIGKILL its policy actor once the first search has a
    checkpoint (with restarts allowed, check it came back as a new process) and return the
    final job records."""

    async def main() -> list[Any]:
        pool = RayWorkerPool(config)
        try:
            victim = pool.policy_members[0].handle
            pid = (await victim.info.remote())["pid"]
            async with open_state_store("memory://") as store:
                orch = Orchestrator(store, pool)
                try:
                    for s in specs:
                        await orch.submit(s)
                    await wait_for_checkpoints(store, specs[:1])
                    os.kill(pid, signal.SIGKILL)
                    waits = [asyncio.wait_for(orch.wait(s.search_id), timeout_s) for s in specs]
                    records = [await w for w in waits]
                finally:
                    await orch.close()
            if config.max_restarts > 0:
                assert (await victim.info.remote())["pid"] != pid  # really died, restarted
            return records
        finally:
            pool.shutdown()

    return asyncio.run(main())


def test_a_killed_policy_actor_comes_back_and_searches_end_as_if_undisturbed(ray_cluster) -> None:
    specs = problem_specs(4, "kill-worker", ops=3, params={"n": 16})
    records = kill_policy_actor_mid_search(PoolConfig(threads=1), specs, 120)
    assert all(r.status is JobStatus.SUCCEEDED for r in records)
    assert [comparable(r.result) for r in records] == reference(specs)


def test_a_killed_orchestrator_is_resumed_by_another_with_identical_results(
    ray_cluster, redis_server: LocalRedis, tmp_path: Path
) -> None:
    """The first orchestrator runs in its own process on in-process workers and is SIGKILLed
    mid-search; a second one, on Ray actors, claims the jobs once their leases lapse."""
    redis_server.restart()
    specs = problem_specs(4, "kill-orch", ops=3, params={"n": 6})
    spec_file = tmp_path / "specs.json"
    spec_file.write_text(json.dumps([dataclasses.asdict(s) for s in specs]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.orchestrator_process", redis_server.url, str(spec_file)],
        cwd=REPO,
    )

    async def main() -> tuple[list[Any], list[int], list[list[dict[str, Any]]]]:
        async with open_state_store(redis_server.url) as store:
            try:
                await wait_for_checkpoints(store, specs)
            finally:
                proc.kill()
                proc.wait()
            at_kill = [(await store.get_job(s.search_id)).status for s in specs]
            assert JobStatus.RUNNING in at_kill, "everything finished before the kill"
            stopped_at = [(await store.load_checkpoint(s.search_id)).generation for s in specs]
            pool = RayWorkerPool(PoolConfig(threads=1))
            try:
                await pool.ready()
                orch = Orchestrator(store, pool, OrchestratorConfig(**LEASE))
                await orch.start()
                try:
                    records = [await asyncio.wait_for(orch.wait(s.search_id), 120) for s in specs]
                finally:
                    await orch.close()
            finally:
                pool.shutdown()
            events = []
            for s in specs:
                log = await store.read_events(s.search_id, limit=1000)
                events.append([json.loads(e.data) for e in log])
            return records, stopped_at, events

    records, stopped_at, events = asyncio.run(main())
    assert all(r.status is JobStatus.SUCCEEDED and r.owner != "doomed" for r in records)
    assert [comparable(r.result) for r in records] == reference(specs)
    for generation, log in zip(stopped_at, events, strict=True):
        progress = [e["generation"] for e in log[:-1]]
        assert generation >= 1 and progress == list(range(1, len(progress) + 1))
        assert log[-1]["status"] == "succeeded"


def test_a_redis_outage_fails_searches_in_flight_quickly_and_new_ones_work_after(
    redis_server: LocalRedis,
) -> None:
    redis_server.restart()
    specs = problem_specs(3, "outage", ops=3, params={"n": 8})
    policy, reward = shipped_workers()

    async def main() -> tuple[list[Any], float, JobStatus]:
        async with open_state_store(redis_server.url) as store:
            orch = Orchestrator(store, LocalWorkers(Paced(policy, 0.2), reward))
            await orch.start()
            for s in specs:
                await orch.submit(s)
            await wait_for_checkpoints(store, specs[:1])
            redis_server.stop()
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(asyncio.wait_for(orch.wait(s.search_id), 30) for s in specs),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
            redis_server.start()
            (after,) = problem_specs(1, "after-outage")
            status = (await asyncio.wait_for(orch.solve(after), 60)).status
            await orch.close()
            return outcomes, elapsed, status

    outcomes, elapsed, status = asyncio.run(main())
    assert all(isinstance(o, StateStoreUnavailable) for o in outcomes), outcomes
    assert all("state store unavailable" in str(o) for o in outcomes)
    assert elapsed < 10.0
    assert status is JobStatus.SUCCEEDED


def test_200_concurrent_searches_all_finish_once_with_their_sequential_results(
    ray_cluster, redis_server: LocalRedis
) -> None:
    redis_server.restart()
    specs = problem_specs(200, "many")
    config = PoolConfig(models=ModelConfig(reward="prm"), threads=1)

    async def main() -> tuple[list[Any], list[list[Any]], int]:
        pool = RayWorkerPool(config)
        try:
            await pool.ready()
            async with open_state_store(redis_server.url) as store:
                orch = Orchestrator(store, pool, OrchestratorConfig(max_live=200))
                await orch.start()
                try:
                    await asyncio.gather(*(orch.submit(s) for s in specs))
                    records = await asyncio.gather(*(orch.wait(s.search_id) for s in specs))
                finally:
                    await orch.close()
                events = [await store.read_events(s.search_id, limit=1000) for s in specs]
                unfinished = len(await store.list_unfinished())
            return list(records), events, unfinished
        finally:
            pool.shutdown()

    records, events, unfinished = asyncio.run(main())
    assert unfinished == 0
    assert [r.search_id for r in records] == [s.search_id for s in specs]
    assert all(r.status is JobStatus.SUCCEEDED for r in records)
    for log in events:  # exactly one terminal event, after contiguous progress
        assert [e.terminal for e in log].count(True) == 1 and log[-1].terminal
        generations = [json.loads(e.data)["generation"] for e in log[:-1]]
        assert generations == list(range(1, len(generations) + 1))
    assert_same_results([comparable(r.result) for r in records], reference(specs, reward="prm"))


def test_a_worker_that_stays_dead_fails_its_searches_as_workers_unavailable(ray_cluster) -> None:
    specs = problem_specs(2, "dead-worker", ops=3, params={"n": 16})
    config = PoolConfig(threads=1, max_restarts=0, max_task_retries=0)
    records = kill_policy_actor_mid_search(config, specs, 60)
    for record in records:
        assert record.status is JobStatus.FAILED
        assert record.error_kind is ErrorKind.UNAVAILABLE
        assert record.error == "policy worker unavailable"  # no actor id, host or traceback


def test_health_follows_the_workers_and_their_probe_never_waits_behind_a_batch(
    ray_cluster,
) -> None:
    """A real server, real actors and a real gRPC health client: the watchdog's `info()` probe
    answers while the actor runs a long batch (its own concurrency group), and once the only
    actor is killed for good readiness turns NOT_SERVING within a probe or two and liveness
    `dead_after_s` later."""
    import grpc
    import ray
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lodestar.services.server import LIVENESS, LodestarServer, ServerConfig
    from lodestar.services.watchdog import WatchConfig, watch_workers
    from lodestar.workers.messages import ExtendRequest

    S = health_pb2.HealthCheckResponse
    watch = WatchConfig(interval_s=0.2, timeout_s=2.0, dead_after_s=1.5)

    async def status(stub: Any, name: str) -> int:
        return (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status

    async def turned(stub: Any, name: str, want: int, since: float) -> float:
        while await status(stub, name) != want:
            assert time.monotonic() - since < 20, f"{name!r} never turned {want}"
            await asyncio.sleep(0.05)
        return time.monotonic() - since

    async def main() -> tuple[bool, float, float, tuple[int, int]]:
        pool = RayWorkerPool(PoolConfig(combined=True, threads=1, max_restarts=0))
        try:
            await pool.ready()
            actor = pool.members[0].handle
            batch = [ExtendRequest(f"busy-{i}", None, "(9+8)*7-6*5", (), i) for i in range(1024)]
            busy = actor.extend.remote(batch)
            await actor.info.remote()  # ~15 ms, the batch ~2 s here
            answered_while_busy = busy in ray.wait([busy], timeout=0)[1]
            await busy
            async with open_state_store("memory://") as store:
                orchestrator = Orchestrator(store, pool)
                server = LodestarServer(orchestrator, ServerConfig(address="127.0.0.1:0"))
                port = await server.start()
                await server.set_serving()
                task = asyncio.create_task(watch_workers(pool, server, watch))
                try:
                    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                        stub = health_pb2_grpc.HealthStub(channel)
                        await asyncio.sleep(3 * watch.interval_s)  # healthy rounds
                        before = (await status(stub, ""), await status(stub, LIVENESS))
                        killed = time.monotonic()
                        ray.kill(actor, no_restart=True)
                        not_ready = await turned(stub, "", S.NOT_SERVING, killed)
                        not_live = await turned(stub, LIVENESS, S.NOT_SERVING, killed)
                finally:
                    task.cancel()
                    await server.stop()
                    await orchestrator.close()
            return answered_while_busy, not_ready, not_live, before
        finally:
            pool.shutdown()

    answered_while_busy, not_ready, not_live, before = asyncio.run(main())
    assert answered_while_busy
    assert before == (S.SERVING, S.SERVING)
    assert not_ready < watch.interval_s + watch.timeout_s + 2.0  # the next probe or two
    assert not_live >= not_ready + watch.dead_after_s - watch.interval_s


def test_readiness_follows_the_state_store_and_liveness_does_not(ray_cluster) -> None:
    """A real server on a real private Redis, real actors, a real gRPC health client. Redis
    paused (SIGSTOP): readiness NOT_SERVING within a probe interval + its timeout; resumed:
    SERVING again. Killed, then restarted on the same port: the same. Liveness stays SERVING
    throughout, though the store is down far longer than `dead_after_s` (restarting the gateway
    would not bring Redis back)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lodestar.services.server import LIVENESS, SERVICE, LodestarServer, ServerConfig
    from lodestar.services.watchdog import WatchConfig, watch_workers
    from tests.redis_server import new_redis_server

    S = health_pb2.HealthCheckResponse
    watch = WatchConfig(interval_s=0.2, timeout_s=1.0, dead_after_s=0.5)

    async def readiness(stub: Any) -> int:
        """Both readiness names agree (read again while the watchdog is between setting one and
        the other); liveness is SERVING whenever asked."""
        ask = [health_pb2.HealthCheckRequest(service=name) for name in ("", SERVICE, LIVENESS)]
        for _ in range(20):
            overall, service, live = [(await stub.Check(r, timeout=5)).status for r in ask]
            assert live == S.SERVING, "liveness followed the store"
            if overall == service:
                return overall
            await asyncio.sleep(0.01)
        raise AssertionError(f"readiness names disagree: {overall} vs {service}")

    async def turned(stub: Any, want: int) -> float:
        since = time.monotonic()
        while await readiness(stub) != want:
            assert time.monotonic() - since < 20, f"readiness never turned {want}"
            await asyncio.sleep(0.05)
        return time.monotonic() - since

    async def main(redis: LocalRedis) -> dict[str, float]:
        pool = RayWorkerPool(PoolConfig(combined=True, threads=1))
        try:
            await pool.ready()
            async with open_state_store(redis.url) as store:
                orchestrator = Orchestrator(store, pool)
                server = LodestarServer(orchestrator, ServerConfig(address="127.0.0.1:0"))
                port = await server.start()
                await server.set_serving()
                task = asyncio.create_task(watch_workers(pool, server, watch, store=store))
                took: dict[str, float] = {}
                try:
                    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                        stub = health_pb2_grpc.HealthStub(channel)
                        await asyncio.sleep(3 * watch.interval_s)  # healthy rounds
                        assert await readiness(stub) == S.SERVING
                        redis.pause()
                        took["paused"] = await turned(stub, S.NOT_SERVING)
                        await asyncio.sleep(4 * watch.dead_after_s)  # still down; still live
                        assert await readiness(stub) == S.NOT_SERVING
                        redis.resume()
                        took["resumed"] = await turned(stub, S.SERVING)
                        redis.stop()
                        took["stopped"] = await turned(stub, S.NOT_SERVING)
                        await asyncio.sleep(4 * watch.dead_after_s)
                        redis.start()  # same port, empty
                        took["restarted"] = await turned(stub, S.SERVING)
                finally:
                    task.cancel()
                    await server.stop()
                    await orchestrator.close()
            return took
        finally:
            pool.shutdown()

    with new_redis_server() as redis:
        took = asyncio.run(main(redis))
    bound = watch.interval_s + watch.timeout_s + 1.0  # the next probe, its timeout, slack
    assert all(seconds < bound for seconds in took.values()), took
    print(f"\nreadiness turned after {took}")


def test_on_ray_actors_a_bad_request_fails_only_its_own_search(ray_cluster) -> None:
    """The verifier's per-request outcome crosses the actor boundary: one search whose problem
    is not arithmetic (no submit-time check here) shares the actors' batches with good ones."""
    specs = problem_specs(8, "ray-good")
    bad = JobSpec("ray-bad", "pf", {"n": 4}, "hello world SECRET-OF-TENANT-B", seed=0)

    async def main() -> list[Any]:
        pool = RayWorkerPool(PoolConfig(threads=1, max_wait_s=0.02))
        try:
            await pool.ready()
            async with open_state_store("memory://") as store:
                orch = Orchestrator(store, pool)
                for spec in [*specs[:4], bad, *specs[4:]]:
                    await orch.submit(spec)
                records = [await orch.wait(s.search_id) for s in [*specs, bad]]
                await orch.close()
            return records
        finally:
            pool.shutdown()

    *good, failed = asyncio.run(main())
    assert_same_results([comparable(r.result) for r in good], reference(specs))
    assert failed.status is JobStatus.FAILED and failed.error_kind is ErrorKind.INVALID_INPUT
    assert "SECRET" not in failed.error and "ray-good" not in failed.error


def test_releasing_caches_and_closing_never_wait_behind_a_busy_actor(ray_cluster) -> None:
    """The cause of a slow shutdown: an actor runs model calls one at a time, so a cache drop
    sent while it is busy runs only after that call. Nothing waits for it: with the only actor
    held by a 4096-request call (seconds), releasing a search and closing an orchestrator whose
    search is stuck behind the call both return at once, the search left resumable."""
    import ray

    from lodestar.workers.messages import ExtendRequest

    async def main() -> tuple[float, float, bool, Any]:
        pool = RayWorkerPool(PoolConfig(combined=True, threads=1))
        try:
            await pool.ready()
            actor = pool.members[0].handle
            async with open_state_store("memory://") as store:
                orch = Orchestrator(store, pool)
                (spec,) = problem_specs(1, "behind", ops=3, params={"n": 8})
                await orch.submit(spec)
                await wait_for_checkpoints(store, [spec])
                prompt = "(9+8)*7-6*5"
                batch = [ExtendRequest(f"busy-{i}", None, prompt, (), i) for i in range(4096)]
                busy = actor.extend.remote(batch)
                await asyncio.sleep(0.5)  # the search's next call is queued behind it now
                pool.scope("held")
                started = time.monotonic()
                await pool.release("held")
                release_s = time.monotonic() - started
                started = time.monotonic()
                await orch.close()
                close_s = time.monotonic() - started
                still_busy = not ray.wait([busy], timeout=0)[0]
                record = await store.get_job(spec.search_id)
            return release_s, close_s, still_busy, record
        finally:
            pool.shutdown()

    release_s, close_s, still_busy, record = asyncio.run(main())
    assert release_s < 0.5 and close_s < 2.0, (release_s, close_s)
    assert still_busy, "the busy call ended first: make it longer"
    assert record.status is JobStatus.RUNNING and record.owner is not None
