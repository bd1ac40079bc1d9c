"""The gRPC service with a real grpc.aio server on a free loopback port and a real client; the
orchestrator runs the shipped policy and the verifier in process (the distributed parts are
tested in test_distributed.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lodestar.orchestrator.driver import Orchestrator, OrchestratorConfig
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import JobSpec, JobStatus, StateStore, open_state_store
from lodestar.services.logs import JsonFormatter
from lodestar.services.metrics import Metrics
from lodestar.services.server import LIVENESS, SERVICE, LodestarServer, ServerConfig
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc
from tests.runtime_parts import (
    Paced,
    assert_same_results,
    comparable,
    shipped_workers,
    solve_alone,
    stepped,
)

Code = grpc.StatusCode
Client = Callable[[pb_grpc.SearchServiceStub, grpc.aio.Channel, LodestarServer], Awaitable[Any]]


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return shipped_workers()


def serve(
    models: tuple[Any, Any],
    client: Client,
    *,
    delay_s: float = 0.0,
    store_url: str = "memory://",
    orchestrator: dict[str, Any] | None = None,
    serving: bool = True,
    metrics: Metrics | None = None,
    **config: Any,
) -> Any:
    """Start a server on 127.0.0.1:0, run `client` against it, stop it."""
    policy = Paced(models[0], delay_s) if delay_s else models[0]

    async def main() -> Any:
        store = open_state_store(store_url)
        orch = Orchestrator(
            store, LocalWorkers(policy, models[1]), OrchestratorConfig(**(orchestrator or {}))
        )
        if metrics is not None:
            metrics.watch(orch)
        await orch.start()
        server = LodestarServer(orch, ServerConfig(address="127.0.0.1:0", **config))
        port = await server.start()
        if serving:
            await server.set_serving()
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=server.config.channel_options
        )
        try:
            return await client(pb_grpc.SearchServiceStub(channel), channel, server)
        finally:
            await channel.close()
            await server.stop()
            await orch.close()
            await store.close()

    return asyncio.run(main())


def pf_request(
    problem: str = "(7+5)*3-4", seed: int = 0, n: int = 4, **kw: Any
) -> pb.SearchRequest:
    return pb.SearchRequest(
        problem=pb.Problem(text=problem),
        params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=n)),
        seed=seed,
        **kw,
    )


async def status_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    return error.code(), error.details()


def test_search_returns_the_result_with_its_spend(models) -> None:
    async def client(stub, channel, server) -> pb.SearchResult:
        return await stub.Search(pf_request(search_id="unary-1"))

    result = serve(models, client)
    (alone,) = solve_alone(models, [JobSpec("alone", "pf", {"n": 4}, "(7+5)*3-4", 0)])
    assert result.search_id == "unary-1" and result.algorithm == "pf"
    assert result.HasField("final_answer") and result.final_answer == alone["final_answer"]
    assert result.answer == alone["answer"]
    assert 0 <= result.chosen < len(result.candidates) == 4
    assert result.candidates[result.chosen].text == result.answer
    assert result.spend.generated_tokens > 0 and result.spend.steps >= 2
    assert result.spend.wall_time_s > 0


def test_stream_search_sends_every_step_in_order_then_the_same_result_as_search(models) -> None:
    async def client(stub, channel, server) -> tuple[list[pb.SearchEvent], pb.SearchResult]:
        events = [e async for e in stub.StreamSearch(pf_request(seed=3, search_id="stream-1"))]
        unary = await stub.Search(pf_request(seed=3, search_id="stream-2"))
        return events, unary

    events, unary = serve(models, client)
    progress, last = events[:-1], events[-1]
    assert [e.WhichOneof("kind") for e in progress] == ["progress"] * len(progress)
    assert [e.progress.step for e in progress] == list(range(1, len(progress) + 1))
    assert last.WhichOneof("kind") == "result" and last.search_id == "stream-1"
    assert progress[-1].progress.spend.generated_tokens == last.result.spend.generated_tokens
    assert progress[-1].progress.best_partial == last.result.answer
    for field in ("answer", "final_answer", "candidates", "stop_reason"):
        assert getattr(last.result, field) == getattr(unary, field)


def test_get_search_and_unknown_ids(models) -> None:
    async def client(stub, channel, server) -> list[Any]:
        await stub.Search(pf_request(search_id="get-1"))
        found = await stub.GetSearch(pb.GetSearchRequest(search_id="get-1"))
        errors = []
        for rpc, request in (
            (stub.GetSearch, pb.GetSearchRequest(search_id="nope")),
            (stub.CancelSearch, pb.CancelSearchRequest(search_id="nope")),
            (stub.GetSearch, pb.GetSearchRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc(request)
            errors.append(info.value.code())
        return [found, errors]

    found, errors = serve(models, client)
    assert found.state == pb.SEARCH_STATE_SUCCEEDED and found.result.HasField("final_answer")
    assert found.finished_at >= found.created_at > 0
    assert errors == [Code.NOT_FOUND, Code.NOT_FOUND, Code.INVALID_ARGUMENT]


def test_cancel_mid_stream_ends_the_stream_cancelled(models) -> None:
    async def client(stub, channel, server) -> list[Any]:
        request = pf_request("(9*8-7)*6+5", search_id="cancel-1", n=8)
        call = stub.StreamSearch(request)
        first = await call.read()
        status = await stub.CancelSearch(pb.CancelSearchRequest(search_id="cancel-1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await call.read() is not grpc.aio.EOF:
                pass
        after = await stub.GetSearch(pb.GetSearchRequest(search_id="cancel-1"))
        return [first, status, info.value.code(), after.state]

    first, status, code, state = serve(models, client, delay_s=0.3)
    assert first.progress.step == 1
    assert status.state in (pb.SEARCH_STATE_RUNNING, pb.SEARCH_STATE_CANCELLED)
    assert code is Code.CANCELLED and state == pb.SEARCH_STATE_CANCELLED


def test_1000_concurrent_streams_on_redis_all_end_with_their_result(models, redis_server) -> None:
    """A stream follows its search's events through the store's shared stream readers, not a
    blocking connection of its own: 1,000 StreamSearch calls at once on Redis (max_live 64, so
    most wait queued, their followers parked) all end with their result, none UNAVAILABLE. With
    a connection per follower (64 of them) 683 of these 1,000 were UNAVAILABLE."""
    import redis

    from lodestar.tasks.arithmetic import Difficulty, generate_problems

    streams, channels = 1000, 8  # 125 concurrent streams per channel
    texts = [p.expression for p in generate_problems("test", 50, Difficulty(ops=2), seed=5)]
    greedy = pb.AlgorithmParams(greedy=pb.GreedyParams(max_steps=1, max_step_tokens=4))

    async def client(stub, channel, server) -> tuple[list[Any], dict[str, int], float]:
        orchestrator = server.service.orchestrator
        peak = {"accepted": 0, "redis_clients": 0}

        async def sample(info: redis.Redis) -> None:
            while True:
                peak["accepted"] = max(peak["accepted"], orchestrator.accepted)
                clients = int(info.info("clients")["connected_clients"])
                peak["redis_clients"] = max(peak["redis_clients"], clients)
                await asyncio.sleep(0.05)

        async def one(stub: pb_grpc.SearchServiceStub, i: int) -> list[pb.SearchEvent] | str:
            request = pb.SearchRequest(
                problem=pb.Problem(text=texts[i % len(texts)]), params=greedy, seed=i
            )
            try:
                return [e async for e in stub.StreamSearch(request, timeout=120)]
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name}: {e.details()}"

        address, options = f"127.0.0.1:{server.port}", server.config.channel_options
        opened = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
        stubs = [pb_grpc.SearchServiceStub(c) for c in opened]
        with redis.Redis.from_url(redis_server.url) as info:
            sampler = asyncio.create_task(sample(info))
            try:
                started = time.monotonic()
                calls = (one(stubs[i % channels], i) for i in range(streams))
                outcomes = await asyncio.gather(*calls)
                elapsed = time.monotonic() - started
            finally:
                sampler.cancel()
                for c in opened:
                    await c.close()
        return outcomes, peak, elapsed

    outcomes, peak, elapsed = serve(models, client, store_url=redis_server.url)
    failed = [o for o in outcomes if not isinstance(o, list)]
    assert failed == [], f"{len(failed)} streams failed, e.g. {failed[:3]}"
    for events in outcomes:
        kinds = [e.WhichOneof("kind") for e in events]
        assert kinds == ["progress"] * (len(kinds) - 1) + ["result"] and len(kinds) >= 2
    assert peak["accepted"] >= 256, peak  # hundreds of followers waiting at once, not 64
    assert peak["redis_clients"] <= 64 + 64 + 1, peak  # the two pools' defaults + the sampler
    print(f"\n{streams} streams: {elapsed:.1f} s, peak {peak}")


async def wait_until_finished(store: StateStore, search_id: str) -> JobStatus:
    for _ in range(200):
        record = await store.get_job(search_id)
        if record is not None and record.status.finished:
            return record.status
        await asyncio.sleep(0.05)
    raise AssertionError(f"{search_id} never finished")


def test_a_client_that_goes_away_or_runs_out_of_time_cancels_its_search(models) -> None:
    async def client(stub, channel, server) -> list[Any]:
        store = server.service.store
        call = stub.StreamSearch(pf_request("(9*8-7)*6+5", search_id="gone-1", n=8))
        await call.read()
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Search(pf_request("(9*8-7)*6+5", search_id="late-1", n=8), timeout=0.5)
        return [
            await wait_until_finished(store, "gone-1"),
            info.value.code(),
            await wait_until_finished(store, "late-1"),
        ]

    gone, code, late = serve(models, client, delay_s=0.3)
    assert gone is JobStatus.CANCELLED
    assert code is Code.DEADLINE_EXCEEDED and late is JobStatus.CANCELLED


BAD_REQUESTS = [
    (pf_request(""), Code.INVALID_ARGUMENT, "problem"),
    (pb.SearchRequest(problem=pb.Problem(text="1+2")), Code.INVALID_ARGUMENT, "params"),
    (pf_request(n=0), Code.INVALID_ARGUMENT, "params.pf.n"),
    (
        pb.SearchRequest(
            problem=pb.Problem(text="1+2"),
            params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(resampling="roulette")),
        ),
        Code.INVALID_ARGUMENT,
        "params.pf.resampling",
    ),
    (
        pb.SearchRequest(
            problem=pb.Problem(text="1+2"),
            params=pb.AlgorithmParams(
                early_rejection=pb.EarlyRejectionParams(pf=pb.ParticleFilterParams(n=0))
            ),
        ),
        Code.INVALID_ARGUMENT,
        "params.early_rejection.pf.n",
    ),
    (
        pf_request(budget=pb.Budget(max_generated_tokens=10**9)),
        Code.INVALID_ARGUMENT,
        "budget.max_generated_tokens",
    ),
    (
        pf_request(budget=pb.Budget(max_prm_passes=0)),
        Code.INVALID_ARGUMENT,
        "budget.max_prm_passes",
    ),
    (pf_request(seed=2**63), Code.INVALID_ARGUMENT, "seed"),
    (pf_request(search_id="has space"), Code.INVALID_ARGUMENT, "search_id"),
    (pf_request(policy_model="gpt-9"), Code.INVALID_ARGUMENT, "policy_model"),
    (
        pb.SearchRequest(problem=pb.Problem(chat=pb.ChatMessages())),
        Code.INVALID_ARGUMENT,
        "problem",
    ),
]


def test_every_bad_request_gets_its_status_code_naming_the_field(models) -> None:
    async def client(stub, channel, server) -> list[tuple[Any, str]]:
        out = []
        for request, _, _ in BAD_REQUESTS:
            for rpc in (stub.Search, stub.StreamSearch):
                try:
                    call = rpc(request)
                    if rpc is stub.StreamSearch:
                        [e async for e in call]
                    else:
                        await call
                    out.append((Code.OK, ""))
                except grpc.aio.AioRpcError as e:
                    out.append((e.code(), e.details()))
        await stub.Search(pf_request(search_id="dup-1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Search(pf_request(search_id="dup-1"))
        out.append((info.value.code(), info.value.details()))
        stored = await server.service.store.list_unfinished()
        return [out, len(stored)]

    out, unfinished = serve(models, client)
    expected = [(code, field) for _, code, field in BAD_REQUESTS for _ in range(2)]
    expected.append((Code.ALREADY_EXISTS, "dup-1"))
    assert len(out) == len(expected)
    for (code, details), (want_code, field) in zip(out, expected, strict=True):
        assert code is want_code, (details, field)
        assert details.startswith(field) or field in details, (details, field)
    assert unfinished == 0  # nothing invalid was stored or left running


def test_admission_full_is_resource_exhausted(models) -> None:
    async def client(stub, channel, server) -> grpc.StatusCode:
        first = asyncio.ensure_future(stub.Search(pf_request("(9*8-7)*6+5", n=8)))
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Search(pf_request())
        await first
        return info.value.code()

    limits = {"max_live": 1, "max_queued": 0}
    assert serve(models, client, delay_s=0.2, orchestrator=limits) is Code.RESOURCE_EXHAUSTED


def test_a_state_store_outage_is_unavailable(models, redis_server) -> None:
    redis_server.stop()

    async def client(stub, channel, server) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Search(pf_request())
        return info.value.code()

    try:
        assert serve(models, client, store_url=redis_server.url) is Code.UNAVAILABLE
    finally:
        redis_server.start()


def test_bearer_token_guards_the_service_but_not_health_or_reflection(models) -> None:
    async def client(stub, channel, server) -> list[Any]:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Search(pf_request())
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.Search(pf_request(), metadata=[("authorization", "Bearer nope")])
        with pytest.raises(grpc.aio.AioRpcError) as streaming:
            [e async for e in stub.StreamSearch(pf_request())]
        ok = await stub.Search(pf_request(), metadata=[("authorization", "Bearer s3cret")])
        health = health_pb2_grpc.HealthStub(channel)
        probe = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        return [missing.value.code(), wrong.value.code(), streaming.value.code(), ok, probe]

    missing, wrong, streaming, ok, probe = serve(models, client, auth_token="s3cret")
    assert missing is wrong is streaming is Code.UNAUTHENTICATED
    assert ok.HasField("final_answer")
    assert probe.status == health_pb2.HealthCheckResponse.SERVING


def test_health_goes_serving_when_ready_and_not_serving_on_stop(models) -> None:
    async def client(stub, channel, server) -> list[int]:
        health = health_pb2_grpc.HealthStub(channel)

        async def check(service: str) -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            return reply.status

        seen = [await check(""), await check(SERVICE), await check(LIVENESS)]
        await server.set_serving()
        seen += [await check(""), await check(LIVENESS)]
        await server.stop()
        for service in (SERVICE, LIVENESS):
            reply = await server.health.Check(health_pb2.HealthCheckRequest(service=service), None)
            seen.append(reply.status)
        return seen

    S = health_pb2.HealthCheckResponse
    seen = serve(models, client, serving=False)
    # Readiness ("" and the service) waits for the models; liveness is up from the start.
    assert seen[:5] == [S.NOT_SERVING, S.NOT_SERVING, S.SERVING, S.SERVING, S.SERVING]
    assert seen[5:] == [S.NOT_SERVING, S.NOT_SERVING]


def test_reflection_lists_the_service(models) -> None:
    async def client(stub, channel, server) -> list[str]:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in reflect.ServerReflectionInfo(iter([request])):
            return [s.name for s in reply.list_services_response.service]
        return []

    assert SERVICE in serve(models, client)


def sample(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not exported")


def test_metrics_count_searches_steps_batches_tokens_and_cache_hits(models) -> None:
    metrics = Metrics()

    async def client(stub, channel, server) -> list[pb.SearchResult]:
        return [await stub.Search(pf_request(seed=s)) for s in range(2)]

    results = serve(models, client, metrics=metrics)
    metrics.record_worker_stats([{"pid": 1, "stats": {"policy": models[0].stats()}}])
    text = metrics.text()
    assert sample(text, "lodestar_searches_finished_total", '{state="succeeded"}') == 2
    assert sample(text, "lodestar_step_seconds_count") == sum(r.spend.steps for r in results)
    tokens = sum(r.spend.generated_tokens for r in results)
    assert sample(text, "lodestar_generated_tokens_total") == tokens
    assert sample(text, "lodestar_worker_batch_size_count", '{role="policy"}') >= 2
    assert (
        sample(text, "lodestar_kv_cache_hits_total", '{role="policy"}') == models[0].stats()["hits"]
    )
    assert sample(text, "lodestar_searches_live") == 0


def test_json_logs_carry_the_search_id(models) -> None:
    import json
    import logging

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lodestar")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    async def client(stub, channel, server) -> None:
        await stub.Search(pf_request(search_id="logged-1"))

    try:
        serve(models, client)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    docs = [json.loads(line) for line in lines]
    mine = [d for d in docs if d.get("search_id") == "logged-1"]
    assert [d["msg"] for d in mine] == [
        "search logged-1 accepted (pf)",
        "search logged-1 succeeded",
    ]
    assert all({"ts", "level", "logger"} <= d.keys() for d in mine)


def batch_request(problems: list[str], batch_id: str = "", **kw: Any) -> pb.SubmitBatchRequest:
    items = [pb.BatchItem(problem=pb.Problem(text=p), key=f"k{i}") for i, p in enumerate(problems)]
    return pb.SubmitBatchRequest(
        items=items,
        params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=2)),
        batch_id=batch_id,
        **kw,
    )


def test_batch_round_trip_with_resumable_results(models) -> None:
    problems = ["1+2", "(3+4)*5", "9-8", "7*6-5", "2*(3+4)"]

    async def client(stub, channel, server) -> list[Any]:
        submitted = await stub.SubmitBatch(batch_request(problems, "batch-1", seed=5))
        stream = stub.StreamBatchResults(pb.StreamBatchResultsRequest(batch_id="batch-1"))
        items = [r async for r in stream]
        final = await stub.GetBatch(pb.GetBatchRequest(batch_id="batch-1"))
        rest = stub.StreamBatchResults(pb.StreamBatchResultsRequest(batch_id="batch-1", after=3))
        tail = [r async for r in rest]
        alone = await stub.Search(pf_request("7*6-5", seed=8, n=2))
        return [submitted, items, final, tail, alone]

    submitted, items, final, tail, alone = serve(models, client)
    assert submitted.batch_id == "batch-1" and submitted.size == 5 and not submitted.done
    assert [r.offset for r in items] == [1, 2, 3, 4, 5]
    assert sorted(r.index for r in items) == [0, 1, 2, 3, 4]
    assert all(r.key == f"k{r.index}" for r in items)
    assert all(r.status.state == pb.SEARCH_STATE_SUCCEEDED for r in items)
    assert final.done and final.succeeded == 5 and final.failed == final.cancelled == 0
    assert [r.offset for r in tail] == [4, 5] and tail == items[3:]
    item3 = next(r for r in items if r.index == 3)  # seed 5 + 3, the same search run alone
    assert item3.status.result.answer == alone.answer


def test_a_batch_item_finished_but_never_counted_still_reaches_the_stream(
    models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server killed between finishing a job and counting it in its batch: the stream waits,
    recounts the batch from the jobs, and delivers the item instead of waiting forever."""
    import lodestar.services.server as server_module

    monkeypatch.setattr(server_module, "RECONCILE_AFTER_S", 0.5)
    specs = [
        JobSpec(f"lost.{i}", "greedy", {}, p, 0, batch_id="lost", batch_index=i)
        for i, p in enumerate(["1+2", "3*4"])
    ]

    async def client(stub, channel, server) -> list[Any]:
        store = server.service.store
        await store.create_batch("lost", {"keys": ["a", "b"]}, specs)
        for spec in specs:
            await store.claim_job(spec.search_id, "dead-server", 30)
        await store.update_job("lost.0", status=JobStatus.FAILED, error="boom")
        await store._update_job_only("lost.1", status=JobStatus.FAILED, error="boom")
        assert (await store.get_batch("lost")).finished == 1  # the crash window
        stream = stub.StreamBatchResults(pb.StreamBatchResultsRequest(batch_id="lost"))
        items = await asyncio.wait_for(_collect(stream), 20)
        return [items, await stub.GetBatch(pb.GetBatchRequest(batch_id="lost"))]

    items, batch = serve(models, client, orchestrator={"resume_orphans": False})
    assert sorted((r.index, r.key) for r in items) == [(0, "a"), (1, "b")]
    assert all(r.status.state == pb.SEARCH_STATE_FAILED for r in items)
    assert batch.done and batch.failed == 2


async def _collect(stream: Any) -> list[Any]:
    return [r async for r in stream]


def test_bad_batches_get_their_status_codes(models) -> None:
    async def client(stub, channel, server) -> list[tuple[grpc.StatusCode, str]]:
        out = []
        await stub.SubmitBatch(batch_request(["1+1"], "taken"))
        calls = [
            stub.SubmitBatch(pb.SubmitBatchRequest(params=batch_request([]).params)),
            stub.SubmitBatch(batch_request(["1+1", ""])),
            stub.SubmitBatch(batch_request(["1+1"], "bad id")),
            stub.SubmitBatch(batch_request(["1+1"], "taken")),
            stub.GetBatch(pb.GetBatchRequest(batch_id="missing")),
        ]
        for call in calls:
            try:
                await call
                out.append((Code.OK, ""))
            except grpc.aio.AioRpcError as e:
                out.append((e.code(), e.details()))
        try:
            stream = stub.StreamBatchResults(pb.StreamBatchResultsRequest(batch_id="missing"))
            [r async for r in stream]
        except grpc.aio.AioRpcError as e:
            out.append((e.code(), e.details()))
        return out

    out = serve(models, client)
    assert [code for code, _ in out] == [
        Code.INVALID_ARGUMENT,
        Code.INVALID_ARGUMENT,
        Code.INVALID_ARGUMENT,
        Code.ALREADY_EXISTS,
        Code.NOT_FOUND,
        Code.NOT_FOUND,
    ]
    assert out[0][1].startswith("items") and out[1][1].startswith("items[1].problem")
    assert out[2][1].startswith("batch_id")


class GoneWorker:
    """A policy whose worker has died for good (what the Ray pool raises once restarts and
    retries run out, see test_distributed.py); here only the status-code mapping is under test."""

    concurrent = False

    def extend(self, requests: Any) -> Any:
        from lodestar.orchestrator.batching import WorkersUnavailable

        raise WorkersUnavailable("policy worker unavailable: the actor died")

    def release_prefix(self, prefix: str) -> int:
        return 0


def test_searches_whose_workers_are_gone_are_unavailable(models) -> None:
    async def client(stub, channel, server) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Search(pf_request())
        return info.value.code(), info.value.details()

    code, details = serve((GoneWorker(), models[1]), client)
    assert code is Code.UNAVAILABLE and "policy worker unavailable" in details


# -- shutdown, batch admission and cancelling ---------------------------------------------------


async def checkpointed(store: StateStore, search_ids: list[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    for search_id in search_ids:
        while not await stepped(store, search_id):
            assert time.monotonic() < deadline, f"{search_id} made no progress"
            await asyncio.sleep(0.02)


async def outcome(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return Code.OK, ""


def undisturbed(models: tuple[Any, Any], specs: list[JobSpec]) -> list[dict[str, Any]]:
    """Each search run alone, in process, start to end."""
    return solve_alone(models, specs)


def test_stop_drains_live_steps_refuses_new_work_and_leaves_every_search_resumable(models) -> None:
    """What SIGTERM does, in process: readiness NOT_SERVING and new work UNAVAILABLE at once,
    reads still answered; live searches stop after their step (well inside the grace), not
    cancelled, checkpointed, their leases handed back; a second orchestrator on the same store
    then finishes every search with the result of an undisturbed run."""
    lone = [pf_request("(9*8-7)*6+5", seed=i, search_id=f"drain-{i}") for i in range(2)]
    ids = ["drain-0", "drain-1", *(f"drain-b.{i:06d}" for i in range(3))]

    async def client(stub, channel, server) -> dict[str, Any]:
        store = server.service.store
        calls = [asyncio.ensure_future(stub.Search(r)) for r in lone]
        await checkpointed(store, ids[:2])
        await stub.SubmitBatch(batch_request(["(3+4)*5", "9-8*7", "7*6-5"], "drain-b", seed=2))
        started = time.monotonic()
        stopping = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0.05)
        health = health_pb2_grpc.HealthStub(channel)
        during = {
            "health": (await health.Check(health_pb2.HealthCheckRequest())).status,
            "get": (await stub.GetSearch(pb.GetSearchRequest(search_id="drain-0"))).state,
            "search": await outcome(stub.Search(pf_request(search_id="late"))),
            "batch": await outcome(stub.SubmitBatch(batch_request(["1+1"], "late-b"))),
        }
        await stopping
        stop_s = time.monotonic() - started
        answers = [await outcome(c) for c in calls]
        jobs = [await store.get_job(i) for i in ids]
        flags = [await store.is_cancelled(i) for i in ids]
        checkpoints = [await store.load_checkpoint(i) for i in ids]
        handed_back_by = time.time()
        resumed = Orchestrator(
            store, LocalWorkers(*models), OrchestratorConfig(lease_s=2, scan_interval_s=0.1)
        )
        await resumed.start()
        try:
            finished = [await asyncio.wait_for(resumed.wait(i), 60) for i in ids]
        finally:
            await resumed.close()
        return dict(
            during=during,
            stop_s=stop_s,
            answers=answers,
            jobs=jobs,
            flags=flags,
            checkpoints=checkpoints,
            handed_back_by=handed_back_by,
            finished=finished,
        )

    seen = serve(
        models, client, delay_s=0.4, orchestrator={"max_live": 2}, grace_s=30, serving=True
    )
    during = seen["during"]
    assert during["health"] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert during["get"] == pb.SEARCH_STATE_RUNNING
    for code, details in (during["search"], during["batch"]):
        assert code is Code.UNAVAILABLE and "shutting down" in details
    assert seen["stop_s"] < 5.0  # a step (0.4 s paced) and the hand-back, not the 30 s grace
    for code, details in seen["answers"]:
        assert code is Code.UNAVAILABLE and "another server resumes it" in details
    lone_jobs, items = seen["jobs"][:2], seen["jobs"][2:]
    assert all(j.status is JobStatus.RUNNING for j in lone_jobs)
    assert all(j.lease_expires_at < seen["handed_back_by"] + 1 for j in lone_jobs)  # not +15 s
    assert all(c is not None for c in seen["checkpoints"][:2])
    assert all(j.status is JobStatus.QUEUED for j in items)  # never made live: no slot
    assert [c.generation for c in seen["checkpoints"][2:]] == [0, 0, 0]  # as submitted
    assert not any(seen["flags"])
    assert all(r.status is JobStatus.SUCCEEDED for r in seen["finished"])
    got = [comparable(r.result) for r in seen["finished"]]
    assert_same_results(got, undisturbed(models, [j.spec for j in seen["jobs"]]))


def test_batch_items_start_only_as_slots_free_and_queued_items_are_bounded(models) -> None:
    problems = ["(3+4)*5", "9-8*7", "7*6-5", "2*(3+4)", "8+7*6", "(5-4)*3", "6*6-6", "1+2*3"]

    async def client(stub, channel, server) -> dict[str, Any]:
        store, orch = server.service.store, server.service.orchestrator
        await stub.SubmitBatch(batch_request(problems, "slots"))
        over = await outcome(stub.SubmitBatch(batch_request(["1+1", "2+2", "3+3"], "over")))
        fits = await outcome(stub.SubmitBatch(batch_request(["1+1", "2+2"], "fits")))
        most_live = most_accepted = most_queued = 0
        for batch_id in ("slots", "fits"):
            while not (await stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id))).done:
                most_live = max(most_live, orch.live)
                most_accepted = max(most_accepted, orch.accepted)
                queued = [j for j in await store.list_unfinished() if j.status is JobStatus.QUEUED]
                most_queued = max(most_queued, len(queued))
                await asyncio.sleep(0.02)
        later = await outcome(stub.SubmitBatch(batch_request(["1+1", "2+2", "3+3"], "over")))
        return dict(
            over=over,
            fits=fits,
            later=later,
            most_live=most_live,
            most_accepted=most_accepted,
            most_queued=most_queued,
        )

    seen = serve(
        models, client, delay_s=0.1, orchestrator={"max_live": 2}, max_queued_batch_items=10
    )
    code, details = seen["over"]
    assert code is Code.RESOURCE_EXHAUSTED and "8 batch items are queued" in details
    assert "most is 10" in details
    assert seen["fits"] == seen["later"] == (Code.OK, "")
    assert 1 <= seen["most_live"] <= 2 and seen["most_accepted"] <= 2
    assert seen["most_queued"] >= 6  # 10 items, at most 2 live


def test_cancel_batch_ends_every_item_and_the_result_stream_completes(models) -> None:
    problems = ["(3+4)*5", "9-8*7", "7*6-5", "2*(3+4)", "8+7*6", "(5-4)*3", "6*6-6", "1+2*3"]
    ids = [f"cx.{i:06d}" for i in range(len(problems))]

    async def client(stub, channel, server) -> dict[str, Any]:
        store = server.service.store
        await stub.SubmitBatch(batch_request(problems, "cx"))
        while not any([await stepped(store, i) for i in ids]):
            await asyncio.sleep(0.02)
        stream = asyncio.ensure_future(
            _collect(stub.StreamBatchResults(pb.StreamBatchResultsRequest(batch_id="cx")))
        )
        cancelled = await stub.CancelBatch(pb.CancelBatchRequest(batch_id="cx"))
        results = await asyncio.wait_for(stream, 30)
        errors = [
            await outcome(stub.CancelBatch(pb.CancelBatchRequest(batch_id=batch_id)))
            for batch_id in ("missing", "", "bad id")
        ]
        return dict(
            cancelled=cancelled,
            results=results,
            final=await stub.GetBatch(pb.GetBatchRequest(batch_id="cx")),
            again=await stub.CancelBatch(pb.CancelBatchRequest(batch_id="cx")),
            started=[await stepped(store, i) for i in ids],
            errors=errors,
        )

    seen = serve(models, client, delay_s=0.3, orchestrator={"max_live": 2})
    cancelled, results, final = seen["cancelled"], seen["results"], seen["final"]
    assert cancelled.batch_id == "cx" and cancelled.cancelled >= 8 - 2 - cancelled.succeeded
    assert sorted(r.index for r in results) == list(range(8))
    ended = {pb.SEARCH_STATE_SUCCEEDED, pb.SEARCH_STATE_CANCELLED}
    assert all(r.status.state in ended for r in results)
    for r in results:  # an item that never started was cancelled
        if not seen["started"][r.index]:
            assert r.status.state == pb.SEARCH_STATE_CANCELLED
    assert sum(not s for s in seen["started"]) >= 4  # at most 2 live, one step each
    assert final.done and final.succeeded + final.cancelled == 8 and final.failed == 0
    assert seen["again"] == final
    assert [code for code, _ in seen["errors"]] == [
        Code.NOT_FOUND,
        Code.INVALID_ARGUMENT,
        Code.INVALID_ARGUMENT,
    ]
    assert all(details.startswith(("no batch", "batch_id")) for _, details in seen["errors"])
