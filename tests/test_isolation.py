"""One request's bad input, size or failure never harms another, and errors say only what its
client may know: the batcher's per-caller outcomes (pure, scripted calls), then the shipped
models in process, then a real gRPC server with the submit-time checks."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from rich.console import Console

from lodestar.orchestrator.batching import RequestBatcher, WorkersUnavailable
from lodestar.orchestrator.driver import INTERNAL_MESSAGE, Orchestrator, OrchestratorConfig
from lodestar.orchestrator.errors import MAX_MESSAGE_CHARS, client_message
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import JobSpec, JobStatus, MemoryStateStore
from lodestar.services.client import BatchFileJob, drive_batch_file, refused_items
from lodestar.services.server import LodestarServer, ServerConfig
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc
from lodestar.workers.factory import ModelConfig, build_intake
from lodestar.workers.intake import ProblemIntake, ProblemLimits
from lodestar.workers.messages import ErrorKind, ExtendRequest
from lodestar.workers.verifier import NOT_ARITHMETIC
from tests.runtime_parts import assert_same_results, comparable, problem_specs, shipped_workers

Code = grpc.StatusCode
SECRET = "hello world SECRET-OF-TENANT-B"
LEAKS = re.compile(
    r"Traceback|File \"|\x1b\[|\b\d{1,3}(\.\d{1,3}){3}\b|(/[\w.-]+){2,}|\bpid\b|ActorID|actor_id",
)
"""What a client's error message must never contain: tracebacks, colour codes, addresses,
source paths, process or actor ids."""


def assert_client_safe(message: str, *others: str) -> None:
    assert len(message) <= MAX_MESSAGE_CHARS, message
    assert LEAKS.search(message) is None, message
    for other in others:
        assert other not in message, f"{other!r} leaked into {message!r}"


# -- the batcher: per-caller outcomes --------------------------------------------------------


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def poisoned_call(calls: list[list[str]]) -> Callable[[list[str]], Awaitable[list[str]]]:
    """A worker call that fails as a whole when any request is "bad" (nothing says which)."""

    async def call(requests: list[str]) -> list[str]:
        calls.append(list(requests))
        if "bad" in requests:
            raise RuntimeError('Traceback (most recent call last): File "/srv/w.py" at 10.0.0.7')
        return [r.upper() for r in requests]

    return call


def test_a_call_failing_as_a_whole_is_bisected_so_only_the_guilty_caller_fails() -> None:
    calls: list[list[str]] = []

    async def main() -> list[Any]:
        batcher = RequestBatcher(poisoned_call(calls), max_batch=64, max_wait_s=0.01)
        callers = [["a1", "a2"], ["b"], ["bad"], ["c1", "c2", "c3"], ["d"]]
        out = await asyncio.gather(*(batcher.submit(c) for c in callers), return_exceptions=True)
        assert batcher.bisections >= 1
        return out

    a, b, bad, c, d = run(main())
    assert (a, b, c, d) == (["A1", "A2"], ["B"], ["C1", "C2", "C3"], ["D"])
    assert isinstance(bad, RuntimeError)
    assert calls[0] == ["a1", "a2", "b", "bad", "c1", "c2", "c3", "d"]  # one call first
    assert sum("bad" in c for c in calls) <= 4  # log2 of five callers, plus the first


def test_a_worker_gone_for_good_fails_every_caller_without_retrying() -> None:
    calls: list[list[str]] = []

    async def gone(requests: list[str]) -> list[str]:
        calls.append(requests)
        raise WorkersUnavailable("policy worker unavailable")

    async def main() -> list[Any]:
        batcher = RequestBatcher(gone, max_batch=64, max_wait_s=0.01)
        return await asyncio.gather(*(batcher.submit([x]) for x in "abc"), return_exceptions=True)

    assert all(isinstance(e, WorkersUnavailable) for e in run(main()))
    assert len(calls) == 1


def test_a_caller_that_stops_waiting_leaves_the_queue_unsent() -> None:
    calls: list[list[str]] = []

    async def main() -> list[str]:
        batcher = RequestBatcher(poisoned_call(calls), max_batch=64, max_wait_s=0.05)
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        kept = asyncio.ensure_future(batcher.submit(["kept"]))
        await asyncio.sleep(0.01)  # both queued, the window still open
        gone.cancel()
        return await kept

    assert run(main()) == ["KEPT"]
    assert calls == [["kept"]]


def test_calls_are_bounded_in_size_so_a_long_prefill_travels_alone() -> None:
    calls: list[list[str]] = []

    async def main() -> list[list[str]]:
        batcher = RequestBatcher(
            poisoned_call(calls), max_batch=64, max_wait_s=0.01, cost=len, max_cost=10
        )
        return await asyncio.gather(
            batcher.submit(["aaaa", "bbbb"]), batcher.submit(["x" * 50]), batcher.submit(["cccc"])
        )

    assert run(main()) == [["AAAA", "BBBB"], ["X" * 50], ["CCCC"]]
    assert all(sum(map(len, c)) <= 10 or len(c) == 1 for c in calls)
    assert ["x" * 50] in calls


def test_client_messages_lose_tracebacks_addresses_paths_and_length() -> None:
    raw = (
        "\x1b[31mRayTaskError\x1b[0m(ValueError): ray::ModelHost.extend() (pid=4242, "
        'ip=10.244.1.17, actor_id=8a7c1e0b9d2f4a6b8c0d1e2f3a4b5c6d) File "/opt/app/w.py", '
        "line 3\nTraceback (most recent call last):\n  boom"
    )
    safe = client_message(raw * 20)
    assert_client_safe(safe)
    assert "RayTaskError" in safe  # what is left still says what failed


# -- the shipped models in process -------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return shipped_workers()


@pytest.fixture(scope="module")
def intake() -> ProblemIntake:
    return build_intake(ModelConfig())


def orchestrate(
    models: tuple[Any, Any], main: Callable[[Orchestrator], Awaitable[Any]], **kw: Any
) -> Any:
    async def go() -> Any:
        store = MemoryStateStore()
        orch = Orchestrator(store, LocalWorkers(*models), OrchestratorConfig(max_live=64), **kw)
        await orch.start()
        try:
            return await main(orch)
        finally:
            await orch.close()

    return run(go())


def test_a_problem_the_reward_cannot_score_fails_only_its_own_search(models) -> None:
    """No submit-time check here: the bad problem reaches the shared worker batch, and the
    verifier's per-request outcome fails it alone."""
    specs = problem_specs(50, "good", params={"n": 2})
    bad = JobSpec("tenant-b", "pf", {"n": 2}, SECRET, seed=0)

    async def together(orch: Orchestrator) -> list[Any]:
        for spec in [*specs[:25], bad, *specs[25:]]:
            await orch.submit(spec)
        return [await orch.wait(s.search_id) for s in [*specs, bad]]

    async def undisturbed(orch: Orchestrator) -> list[Any]:
        return [await orch.solve(s) for s in specs]

    *good, failed = orchestrate(models, together)
    alone = orchestrate(models, undisturbed)
    assert [r.status for r in good] == [JobStatus.SUCCEEDED] * 50
    assert_same_results([comparable(r.result) for r in good], [comparable(r.result) for r in alone])
    assert failed.status is JobStatus.FAILED and failed.error_kind is ErrorKind.INVALID_INPUT
    assert failed.error == NOT_ARITHMETIC
    assert_client_safe(failed.error, SECRET, *(s.search_id for s in specs))


class Poisoned:
    """A policy whose whole call raises (with a traceback, a path and an address in the text)
    whenever one marked problem is in it: a failure the worker cannot pin on a request."""

    concurrent = False

    def __init__(self, worker: Any, marker: str) -> None:
        self.worker = worker
        self.marker = marker
        self.calls = 0

    def extend(self, requests: Sequence[ExtendRequest]) -> list[Any]:
        self.calls += 1
        if any(self.marker in str(r.prompt) for r in requests):
            raise RuntimeError('Traceback (most recent call last): File "/srv/x.py", 10.1.2.3')
        return self.worker.extend(requests)

    def release_prefix(self, prefix: str) -> int:
        return self.worker.release_prefix(prefix)


def test_a_worker_exception_fails_only_the_search_it_belongs_to(models) -> None:
    poison = "9*9-9*9+1"
    policy = Poisoned(models[0], poison)
    specs = problem_specs(10, "good", params={"n": 2})
    bad = JobSpec("poisoned", "pf", {"n": 2}, poison, seed=0)

    async def main(orch: Orchestrator) -> list[Any]:
        for spec in [*specs, bad]:
            await orch.submit(spec)
        return [await orch.wait(s.search_id) for s in [*specs, bad]]

    *good, failed = orchestrate((policy, models[1]), main)
    assert [r.status for r in good] == [JobStatus.SUCCEEDED] * 10
    assert failed.status is JobStatus.FAILED and failed.error_kind is ErrorKind.INTERNAL
    assert failed.error == INTERNAL_MESSAGE
    assert_client_safe(failed.error, poison)


def test_the_intake_refuses_what_the_served_models_cannot_take(intake) -> None:
    from lodestar.workers.intake import ProblemRefused
    from lodestar.workers.messages import ChatMessage

    assert intake.check("(7+5)*3-4") == len("Q: (7+5)*3-4\nA:\n") + 1  # BOS
    cases = {
        SECRET: "problem",
        "1" * 1_000_000: "problem.text",
        "+".join(["1"] * 100): "problem",  # arithmetic, but past the shipped policy's domain
        tuple(ChatMessage("user", "1+1") for _ in range(65)): "problem.chat.messages",
        (ChatMessage("x" * 33, "1+1"),): "problem.chat.messages[0].role",
    }
    for problem, field in cases.items():
        started = time.perf_counter()
        with pytest.raises(ProblemRefused) as info:
            intake.check(problem)
        assert time.perf_counter() - started < 1.0
        assert info.value.field == field
        assert_client_safe(str(info.value), SECRET)
    tight = build_intake(ModelConfig(), ProblemLimits(max_problem_tokens=8))
    with pytest.raises(ProblemRefused, match="tokens for the served policy") as info:
        tight.check("(7+5)*3-4")  # in the domain, but past a server's token limit
    assert info.value.field == "problem.text"


# -- a real server with the submit-time checks -------------------------------------------------


def serve(
    models: tuple[Any, Any],
    intake: ProblemIntake,
    client: Callable[[pb_grpc.SearchServiceStub, grpc.aio.Channel], Awaitable[Any]],
) -> Any:
    async def main() -> Any:
        store = MemoryStateStore()
        orch = Orchestrator(
            store, LocalWorkers(*models), OrchestratorConfig(max_live=64), intake=intake
        )
        await orch.start()
        server = LodestarServer(orch, ServerConfig(address="127.0.0.1:0"))
        port = await server.start()
        await server.set_serving()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", server.config.channel_options)
        try:
            return await client(pb_grpc.SearchServiceStub(channel), channel)
        finally:
            await channel.close()
            await server.stop()
            await orch.close()

    return run(main())


def request(problem: str, search_id: str, **params: Any) -> pb.SearchRequest:
    return pb.SearchRequest(
        problem=pb.Problem(text=problem),
        params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=2, **params)),
        search_id=search_id,
    )


async def outcome(call: Awaitable[Any]) -> Any:
    """The reply, or (code, message) of the error, checked client-safe."""
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        assert_client_safe(e.details() or "")
        return e.code(), e.details()


def test_fifty_good_searches_and_a_bad_one_submitted_together(models, intake) -> None:
    problems = [s.problem for s in problem_specs(50, "x")]

    async def client(stub, channel) -> tuple[list[Any], Any, Any]:
        calls = [stub.Search(request(p, f"good-{i}")) for i, p in enumerate(problems)]
        calls.insert(25, stub.Search(request(SECRET, "tenant-b")))
        (*good,) = await asyncio.gather(*(outcome(c) for c in calls))
        bad = good.pop(25)
        stored = await outcome(stub.GetSearch(pb.GetSearchRequest(search_id="tenant-b")))
        return good, bad, stored

    good, bad, stored = serve(models, intake, client)
    assert all(isinstance(r, pb.SearchResult) for r in good), [r for r in good if type(r) is tuple]
    assert [r.search_id for r in good] == [f"good-{i}" for i in range(50)]
    assert bad[0] is Code.INVALID_ARGUMENT and bad[1].startswith("problem: ")
    assert "the shipped arithmetic models take" in bad[1]
    assert_client_safe(bad[1], SECRET, *(f"good-{i}" for i in range(50)))
    assert stored[0] is Code.NOT_FOUND  # refused before anything was stored


def test_huge_problems_are_refused_at_once_while_canaries_run(models, intake) -> None:
    canaries = [s.problem for s in problem_specs(40, "c")]

    async def client(stub, channel) -> tuple[list[Any], list[Any], float]:
        runs = [
            asyncio.ensure_future(outcome(stub.Search(request(p, f"canary-{i}"))))
            for i, p in enumerate(canaries)
        ]
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        huge = await asyncio.gather(
            outcome(stub.Search(request("1" * 1_000_000, "huge"))),
            outcome(stub.Search(request("+".join(["7"] * 200), "long"))),
            outcome(stub.Search(request("1+2", "delim", step_delimiter="\n" * 1_000_000))),
        )
        refused_in = time.perf_counter() - started
        return huge, await asyncio.gather(*runs), refused_in

    huge, canaries_out, refused_in = serve(models, intake, client)
    assert refused_in < 1.0
    assert [code for code, _ in huge] == [Code.INVALID_ARGUMENT] * 3
    assert huge[0][1].startswith("problem.text: 1000000 characters, at most")
    assert huge[1][1].startswith("problem: 199 operations, at most 4")  # the shipped domain
    assert huge[2][1].startswith("params.pf.step_delimiter")
    assert all(isinstance(r, pb.SearchResult) for r in canaries_out)


def test_malformed_ids_and_undecodable_requests_are_invalid_arguments(models, intake) -> None:
    async def client(stub, channel) -> list[Any]:
        raw = channel.unary_unary(
            "/lodestar.v1.SearchService/GetSearch",
            request_serializer=lambda b: b,
            response_deserializer=pb.SearchStatus.FromString,
        )
        not_utf8 = b"\x0a\x03\xff\xfe\xfd"  # field 1 (search_id), 3 bytes that are not UTF-8
        return [
            await outcome(stub.GetSearch(pb.GetSearchRequest(search_id="no spaces {}"))),
            await outcome(stub.CancelSearch(pb.CancelSearchRequest(search_id="x" * 500))),
            await outcome(stub.GetBatch(pb.GetBatchRequest(batch_id="b/../c"))),
            await outcome(raw(not_utf8)),
            await outcome(stub.GetSearch(pb.GetSearchRequest(search_id="well-formed"))),
        ]

    *bad, unknown = serve(models, intake, client)
    assert [code for code, _ in bad] == [Code.INVALID_ARGUMENT] * 4
    assert [m.split(":")[0] for _, m in bad[:3]] == ["search_id", "search_id", "batch_id"]
    assert bad[3][1].startswith("request: not a valid message")
    assert unknown[0] is Code.NOT_FOUND


def test_a_batch_names_every_refused_item_and_the_file_client_skips_only_those(
    models, intake, tmp_path: Path
) -> None:
    problems = tmp_path / "problems.jsonl"
    lines = ['"(7+5)*3-4"', f'"{SECRET}"', '"2*3+4"', '"what is the capital of France?"', '"9-2"']
    problems.write_text("\n".join(lines) + "\n")
    output = tmp_path / "results.jsonl"
    console = Console(record=True, width=200)

    async def client(stub, channel) -> tuple[Any, int]:
        items = [pb.BatchItem(problem=pb.Problem(text=t)) for t in ("1+1", SECRET, "2+2", "hi")]
        submit = pb.SubmitBatchRequest(
            items=items, params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=2))
        )
        try:
            await stub.SubmitBatch(submit)
            raise AssertionError("a batch with bad items was accepted")
        except grpc.aio.AioRpcError as e:
            refused = e.code(), refused_items(e)
            assert_client_safe(e.details() or "", SECRET)
        job = BatchFileJob(problems, output, "pf", {"n": 2}, seed=0, budget={})
        return refused, await drive_batch_file(stub, None, job, console)

    (code, refused), exit_code = serve(models, intake, client)
    assert code is Code.INVALID_ARGUMENT and sorted(refused) == [1, 3]
    assert all(reason.startswith(f"items[{i}].problem") for i, reason in refused.items())
    assert exit_code == 0
    written = [line for line in output.read_text().splitlines() if line]
    assert len(written) == 3 and all('"succeeded"' in line for line in written)
    text = console.export_text()
    assert "problems.jsonl:2" in text and "problems.jsonl:4" in text and "skipped" in text


def test_an_actor_call_unanswered_past_its_timeout_is_an_unavailable_worker() -> None:
    """The pool's call bound, on a stand-in handle whose `extend.remote` never answers in time
    (a hung actor); the real actors' failure paths are in test_distributed.py."""
    from lodestar.orchestrator.worker_pool import PoolConfig, _Member

    class Hung:
        async def remote(self, requests: list[Any]) -> list[Any]:
            await asyncio.sleep(10)
            return []

    class Handle:
        extend = score = Hung()

    member = _Member(Handle(), ("policy",), PoolConfig(call_timeout_s=0.05))
    started = time.perf_counter()
    with pytest.raises(WorkersUnavailable, match=r"^policy worker unavailable$"):
        run(member._extend([]))
    assert time.perf_counter() - started < 1.0


def test_a_server_made_search_id_survives_the_scrub() -> None:
    sid = "s-0123456789abcdef0123456789abcdef"
    assert client_message(f"search {sid} was cancelled") == f"search {sid} was cancelled"
    assert "0123456789abcdef0123456789" not in client_message("ActorID 0123456789abcdef01234567")


def test_a_search_that_fills_the_policys_context_finishes_instead_of_failing() -> None:
    """Before, a prefix that reached the shipped policy's 256 tokens failed the whole search
    (seen in `lodestar eval` at budget 32 on a 4-operation problem)."""
    policy, reward = shipped_workers()
    policy.context_tokens = 24  # the prompt is 17: room for a step or so
    (spec,) = problem_specs(1, "tight", ops=4, params={"n": 4})

    async def main(orch: Orchestrator) -> Any:
        return await orch.solve(spec)

    record = orchestrate((policy, reward), main)
    assert record.status is JobStatus.SUCCEEDED, record.error
    stops = {c["stop"] for c in json.loads(record.result)["candidates"]}
    assert "context" in stops
