"""Reliability benchmark: the load a real service holds, how it answers bad inputs, and the
faults it survives. A measurement, not a test: it exits 0 whatever the figures say (a message a
client should not see is printed in red).

    .venv/bin/python -m lodestar.evaluation.reliability [--quick] [--json FILE]

The service is the whole `lodestar serve` path in this process: `services.runtime` (a
private local Ray, the shipped policy and the verifier reward as Ray actors, the orchestrator, a
Redis state store on a private `redis-server`) behind a `LodestarServer` on 127.0.0.1, started
in `serve()`'s order, with the watchdog probing every 0.25 s instead of every 10 s so that a
few seconds' fault can show in health. The figures:

1. load held: concurrent unary `Search` and `StreamSearch` calls (PF, 4 particles, held-out
   2-operation problems) over a few channels with bounded client concurrency: completed, failed
   by status code, latency p50 / p99 of each kind;
2. bad inputs: each answered with which code, how fast, and whether its message is client-safe
   (one line, at most `MAX_MESSAGE_CHARS`, no traceback, colour code, address, path, process or
   actor id, and never another request's text); then 50 good searches and a bad one at once;
3. faults survived: Redis paused (SIGSTOP) for a few seconds mid-wave, and the policy actor
   killed mid-wave (Ray restarts it): searches succeeded / failed, by when they were sent,
   health, recovery time. A wave is `concurrency` clients each sending its next search as soon
   as its last is answered, so it spans the fault however fast the machine is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lodestar.orchestrator.errors import MAX_MESSAGE_CHARS
from lodestar.v1 import search_pb2 as pb

SECRET = "hello world SECRET-OF-TENANT-B"
"""The text of one tenant's bad request: it must never appear in another request's answer."""

OK = "OK"


@dataclass(frozen=True)
class Sizes:
    unary: int
    """Concurrent unary `Search` calls of the load figure."""
    stream: int
    """Concurrent `StreamSearch` calls of the load figure (interleaved with the unary ones)."""
    concurrency: int
    """Calls in flight at once from this client (over `channels` channels)."""
    channels: int
    pause_s: float = 3.0
    """How long Redis stays stopped."""
    fault_after_s: float = 2.0
    """How far into a fault's wave the fault strikes."""
    tail_s: float = 3.0
    """How long a wave goes on once the fault is over (Redis resumed, actor back)."""
    good: int = 50
    """Good searches submitted together with one bad one."""
    canaries: int = 8
    """Searches running while the bad inputs are sent."""
    call_timeout_s: float = 180.0
    """Every call's gRPC deadline (a call past it counts as DEADLINE_EXCEEDED)."""


FULL = Sizes(unary=200, stream=200, concurrency=64, channels=4)
"""64 in flight: the orchestrator's default `max_live`."""
QUICK = Sizes(unary=40, stream=40, concurrency=16, channels=4)

WATCH_INTERVAL_S = 0.25
WATCH_TIMEOUT_S = 1.0
"""The watchdog's probe period and patience here (`lodestar serve`: 10 s and 10 s)."""


# -- pure parts ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) by linear interpolation between the closest ranks (numpy's
    default method); nan for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


FLAW_PATTERNS = (
    ("traceback", re.compile(r"Traceback|File \"|\bline \d+, in\b")),
    ("colour code", re.compile(r"\x1b\[")),
    ("address", re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9a-fA-F:]*:[0-9a-fA-F:]+\]")),
    ("path", re.compile(r"(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}|\w+\.py\b")),
    ("process id", re.compile(r"\bpid\b", re.I)),
    ("actor id", re.compile(r"ActorID|actor_id|node_id|worker_id|\b[0-9a-f]{24,}\b")),
)
"""What a client's error message must not carry (docs/service.md, "Limits and errors")."""


def message_flaws(message: str, foreign: Sequence[str] = ()) -> list[str]:
    """Why `message` is not client-safe (empty: it is): over `MAX_MESSAGE_CHARS`, more than one
    line, a traceback, colour code, address, path, process or actor id, or any of `foreign`
    (another request's text or id)."""
    flaws = [name for name, pattern in FLAW_PATTERNS if pattern.search(message)]
    if len(message) > MAX_MESSAGE_CHARS:
        flaws.append(f"{len(message)} chars > {MAX_MESSAGE_CHARS}")
    if "\n" in message or "\r" in message:
        flaws.append("more than one line")
    flaws += [f"carries {text[:24]!r}" for text in foreign if text and text in message]
    return flaws


@dataclass
class Outcome:
    """One call as the client saw it."""

    kind: str
    """"unary" or "stream"."""
    code: str
    """"OK" or the status code's name."""
    latency_s: float
    message: str = ""
    events: int = 0
    """Progress events received (streams)."""
    first_event_s: float | None = None
    """Time to the first event (streams)."""
    answer: str = ""
    """The whole result as text (to check it carries nothing of another request)."""
    search_id: str = ""
    """The client-chosen id, where there is one."""
    sent_at: float = 0.0
    """`time.monotonic()` when the call was sent."""


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Completed, failed by code, and latency percentiles (seconds, all calls) of `outcomes`."""
    latencies = [o.latency_s for o in outcomes]
    failed = Counter(o.code for o in outcomes if o.code != OK)
    firsts = [o.first_event_s for o in outcomes if o.first_event_s is not None]
    return {
        "calls": len(outcomes),
        "completed": sum(o.code == OK for o in outcomes),
        "failed": dict(sorted(failed.items())),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies, default=math.nan),
        "first_event_p50_s": percentile(firsts, 50),
        "mean_events": sum(o.events for o in outcomes) / len(outcomes) if outcomes else 0.0,
    }


# -- the service ---------------------------------------------------------------------------------


@dataclass
class Service:
    server: Any
    orchestrator: Any
    pool: Any
    redis: Any
    stubs: list[Any]
    health: Any
    channel: grpc.aio.Channel
    """The first channel (raw calls go through it)."""

    def stub(self, i: int) -> Any:
        return self.stubs[i % len(self.stubs)]


@contextlib.asynccontextmanager
async def service(sizes: Sizes) -> AsyncIterator[Service]:
    """The real service, started in `services.app.serve`'s order, and client channels to it."""
    import torch
    from grpc_health.v1 import health_pb2_grpc

    from lodestar.orchestrator.worker_pool import PoolConfig
    from lodestar.services.app import ServeConfig
    from lodestar.services.local_redis import LocalRedis
    from lodestar.services.runtime import RuntimeConfig, open_runtime
    from lodestar.services.server import LodestarServer, ServerConfig
    from lodestar.services.watchdog import WatchConfig, watch_workers
    from lodestar.v1 import search_pb2_grpc as pb_grpc

    gpus = 0.5 if torch.cuda.is_available() else 0.0  # the two actors share one GPU
    with LocalRedis() as redis:
        config = ServeConfig(
            server=ServerConfig(address="127.0.0.1:0"),
            runtime=RuntimeConfig(PoolConfig(threads=1, num_gpus=gpus), store_url=redis.url),
            watch=WatchConfig(interval_s=WATCH_INTERVAL_S, timeout_s=WATCH_TIMEOUT_S),
        )
        async with open_runtime(config.runtime) as runtime:
            orchestrator, pool = runtime.orchestrator, runtime.workers
            server = LodestarServer(orchestrator, config.server)
            watchdog: asyncio.Task[None] | None = None
            channels: list[grpc.aio.Channel] = []
            try:
                port = await server.start()
                await runtime.start()
                await server.set_serving()
                watchdog = asyncio.create_task(
                    watch_workers(pool, server, config.watch, store=orchestrator.store)
                )
                options = config.server.channel_options
                for _ in range(sizes.channels):
                    channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options))
                yield Service(
                    server=server,
                    orchestrator=orchestrator,
                    pool=pool,
                    redis=redis,
                    stubs=[pb_grpc.SearchServiceStub(c) for c in channels],
                    health=health_pb2_grpc.HealthStub(channels[0]),
                    channel=channels[0],
                )
            finally:
                for channel in channels:
                    await channel.close()
                if watchdog is not None:
                    watchdog.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watchdog
                await server.stop()


def search_request(problem: str, seed: int, search_id: str = "", **pf: Any) -> pb.SearchRequest:
    """PF with 4 particles (unless `pf` says otherwise) on a text problem."""
    return pb.SearchRequest(
        problem=pb.Problem(text=problem),
        params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(**{"n": 4, **pf})),
        seed=seed,
        search_id=search_id,
    )


def held_out(count: int, seed: int) -> list[str]:
    from lodestar.tasks.arithmetic import Difficulty, generate_problems

    return [p.expression for p in generate_problems("test", count, Difficulty(ops=2), seed=seed)]


async def call_unary(stub: Any, request: pb.SearchRequest, timeout_s: float) -> Outcome:
    sent_at, started = time.monotonic(), time.perf_counter()
    try:
        result = await stub.Search(request, timeout=timeout_s)
        code, message, answer = OK, "", str(result)
    except grpc.aio.AioRpcError as e:
        code, message, answer = e.code().name, e.details() or "", ""
    elapsed = time.perf_counter() - started
    return Outcome(
        "unary", code, elapsed, message, answer=answer, search_id=request.search_id, sent_at=sent_at
    )


async def call_stream(stub: Any, request: pb.SearchRequest, timeout_s: float) -> Outcome:
    sent_at, started = time.monotonic(), time.perf_counter()
    events, first, answer, message = 0, None, "", ""
    try:
        async for event in stub.StreamSearch(request, timeout=timeout_s):
            if first is None:
                first = time.perf_counter() - started
            if event.WhichOneof("kind") == "progress":
                events += 1
            else:
                answer = str(event.result)
        code = OK if answer else "NO_RESULT"
    except grpc.aio.AioRpcError as e:
        code, message = e.code().name, e.details() or ""
    elapsed = time.perf_counter() - started
    return Outcome(
        "stream", code, elapsed, message, events, first, answer, request.search_id, sent_at
    )


def send(kind: str) -> Callable[[Any, pb.SearchRequest, float], Awaitable[Outcome]]:
    return call_unary if kind == "unary" else call_stream


async def drive(
    svc: Service, calls: Sequence[tuple[str, pb.SearchRequest]], sizes: Sizes
) -> list[Outcome]:
    """Every call, at most `sizes.concurrency` in flight, spread round-robin over the channels;
    a call's latency starts when it is sent, not while it waits for a slot."""
    slots = asyncio.Semaphore(sizes.concurrency)

    async def one(i: int, kind: str, request: pb.SearchRequest) -> Outcome:
        async with slots:
            return await send(kind)(svc.stub(i), request, sizes.call_timeout_s)

    return list(await asyncio.gather(*(one(i, k, r) for i, (k, r) in enumerate(calls))))


def mixed_calls(problems: Sequence[str], streams: int, seed: int = 0) -> list[tuple[str, Any]]:
    """A search per problem (seed `seed` + i), `streams` of them streamed, spread evenly."""
    total = len(problems)
    kinds = [
        "stream" if (i + 1) * streams // total > i * streams // total else "unary"
        for i in range(total)
    ]
    return [
        (k, search_request(p, seed + i))
        for i, (k, p) in enumerate(zip(kinds, problems, strict=True))
    ]


# -- 1. load -------------------------------------------------------------------------------------


async def load_held(svc: Service, sizes: Sizes) -> dict[str, Any]:
    problems = held_out(sizes.unary + sizes.stream, seed=101)
    calls = mixed_calls(problems, sizes.stream)
    started = time.perf_counter()
    outcomes = await drive(svc, calls, sizes)
    wall_s = time.perf_counter() - started
    kinds = {
        kind: summarize([o for o in outcomes if o.kind == kind]) for kind in ("unary", "stream")
    }
    messages = sorted({o.message for o in outcomes if o.code != OK})[:5]
    return {
        "wall_s": wall_s,
        "searches_per_s": len(outcomes) / wall_s,
        "concurrency": sizes.concurrency,
        "channels": sizes.channels,
        "kinds": kinds,
        "failure_messages": messages,
    }


# -- 2. bad inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    name: str
    expected: str
    """The status code docs/service.md promises."""
    send: Callable[[Service], Awaitable[Any]]
    carries_secret: bool = False
    """This request's own text is `SECRET` (its answer may name it; no other may)."""


def _chat(messages: int) -> pb.Problem:
    chat = [pb.ChatMessage(role="user", content="1+2") for _ in range(messages)]
    return pb.Problem(chat=pb.ChatMessages(messages=chat))


def bad_inputs() -> list[BadInput]:
    def search(request: pb.SearchRequest) -> Callable[[Service], Awaitable[Any]]:
        return lambda svc: svc.stub(0).Search(request, timeout=30)

    pf = pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=2))
    batch = pb.SubmitBatchRequest(
        items=[
            pb.BatchItem(problem=pb.Problem(text=t))
            for t in ("1+2", "3*4", "what is the capital of France?", "5-1")
        ],
        params=pf,
        batch_id="rel-batch-one-bad",
    )

    async def not_utf8(svc: Service) -> Any:
        raw = svc.channel.unary_unary(
            "/lodestar.v1.SearchService/GetSearch",
            request_serializer=lambda b: b,
            response_deserializer=pb.SearchStatus.FromString,
        )
        return await raw(b"\x0a\x03\xff\xfe\xfd", timeout=30)  # search_id: 3 bytes, not UTF-8

    invalid = "INVALID_ARGUMENT"
    return [
        BadInput(
            "not arithmetic (tenant B's text)",
            invalid,
            search(search_request(SECRET, 0)),
            carries_secret=True,
        ),
        BadInput("1 MB problem", invalid, search(search_request("1" * 1_000_000, 0))),
        BadInput(
            "problem over the token limit",
            invalid,
            search(search_request("+".join(["7"] * 200), 0)),
        ),
        BadInput("empty problem", invalid, search(search_request("", 0))),
        BadInput(
            "1 MB step_delimiter",
            invalid,
            search(search_request("1+2", 0, step_delimiter="\n" * 1_000_000)),
        ),
        BadInput("pf n=0", invalid, search(search_request("1+2", 0, n=0))),
        BadInput(
            "pf resampling='bogus'", invalid, search(search_request("1+2", 0, resampling="bogus"))
        ),
        BadInput("no algorithm", invalid, search(pb.SearchRequest(problem=pb.Problem(text="1+2")))),
        BadInput(
            "budget above the server maximum",
            invalid,
            search(
                pb.SearchRequest(
                    problem=pb.Problem(text="1+2"),
                    params=pf,
                    budget=pb.Budget(max_generated_tokens=10**12),
                )
            ),
        ),
        BadInput(
            "unknown policy model",
            invalid,
            search(
                pb.SearchRequest(
                    problem=pb.Problem(text="1+2"), params=pf, policy_model="gpt-unknown"
                )
            ),
        ),
        BadInput(
            "chat of 100 messages", invalid, search(pb.SearchRequest(problem=_chat(100), params=pf))
        ),
        BadInput(
            "GetSearch, malformed id",
            invalid,
            lambda svc: svc.stub(0).GetSearch(
                pb.GetSearchRequest(search_id="no spaces {}"), timeout=30
            ),
        ),
        BadInput(
            "CancelSearch, 500-char id",
            invalid,
            lambda svc: svc.stub(0).CancelSearch(
                pb.CancelSearchRequest(search_id="x" * 500), timeout=30
            ),
        ),
        BadInput("GetSearch, bytes not UTF-8", invalid, not_utf8),
        BadInput(
            "GetSearch, unknown id",
            "NOT_FOUND",
            lambda svc: svc.stub(0).GetSearch(
                pb.GetSearchRequest(search_id="no-such-search"), timeout=30
            ),
        ),
        BadInput(
            "Search, id another search has",
            "ALREADY_EXISTS",
            search(search_request("1+2", 0, search_id="canary-0")),
        ),
        BadInput(
            "SubmitBatch, 1 bad item of 4",
            invalid,
            lambda svc: svc.stub(0).SubmitBatch(batch, timeout=30),
        ),
    ]


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    """The `google.rpc.BadRequest` field violations an error carries, as "field: description"."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return []
    out = []
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [f"{v.field}: {v.description}" for v in bad.field_violations]
    return out


async def try_bad(svc: Service, bad: BadInput) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        reply = await bad.send(svc)
        code, message, details, answer = OK, "", [], str(reply)
    except grpc.aio.AioRpcError as e:
        code, message, details, answer = e.code().name, e.details() or "", violations(e), ""
    return {
        "name": bad.name,
        "expected": bad.expected,
        "code": code,
        "ms": (time.perf_counter() - started) * 1000,
        "message": message,
        "message_chars": len(message),
        "details": details,
        "answer": answer,
        "carries_secret": bad.carries_secret,
    }


def judge(rows: list[dict[str, Any]]) -> None:
    """Each row's flaws: its message's and its details', with SECRET foreign to every row but the
    one that sent it."""
    for row in rows:
        foreign = () if row["carries_secret"] else (SECRET, "SECRET-OF-TENANT-B")
        texts = [row["message"], *row["details"]]
        flaws = sorted({f for t in texts for f in message_flaws(t, foreign)})
        if any(s in row["answer"] for s in foreign):
            flaws.append("answer carries SECRET")
        row["flaws"] = flaws
        row["safe"] = not flaws
        row["code_as_documented"] = row["code"] == row["expected"]


async def bad_inputs_figure(svc: Service, sizes: Sizes) -> dict[str, Any]:
    """Each bad request alone, in turn, while `sizes.canaries` good searches (ids `canary-i`)
    run."""
    problems = held_out(sizes.canaries, 7)
    canaries = [("unary", search_request(p, i, f"canary-{i}")) for i, p in enumerate(problems)]
    running = asyncio.ensure_future(drive(svc, canaries, sizes))
    await asyncio.sleep(0.5)
    rows = [await try_bad(svc, bad) for bad in bad_inputs()]
    judge(rows)
    canary_outcomes = await running
    return {"rows": rows, "canaries": summarize(canary_outcomes)}


async def fifty_and_one(svc: Service, sizes: Sizes) -> dict[str, Any]:
    """`sizes.good` good searches and one bad one (SECRET, its own id) in one burst."""
    problems = held_out(sizes.good, seed=23)
    ids = [f"good-{i}" for i in range(sizes.good)]
    calls = [("unary", search_request(p, i, ids[i])) for i, p in enumerate(problems)]
    calls.insert(len(calls) // 2, ("unary", search_request(SECRET, 0, "tenant-b")))
    slots = dataclasses.replace(sizes, concurrency=len(calls))  # all at once
    outcomes = await drive(svc, calls, slots)
    bad = outcomes.pop(len(calls) // 2)
    leaked = [o for o in outcomes if SECRET in o.answer or "tenant-b" in o.answer]
    return {
        "good": summarize(outcomes),
        "bad_code": bad.code,
        "bad_message": bad.message,
        "bad_flaws": message_flaws(bad.message, ids),
        "good_answers_carrying_secret": len(leaked),
    }


# -- 3. faults -----------------------------------------------------------------------------------


class HealthWatch:
    """Polls grpc.health.v1 (name "") every `interval_s`, recording (time, status) changes."""

    def __init__(self, stub: Any, interval_s: float = 0.1) -> None:
        self.stub, self.interval_s = stub, interval_s
        self.changes: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def _check(self) -> str:
        from grpc_health.v1 import health_pb2

        try:
            reply = await self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.aio.AioRpcError as e:
            return f"error {e.code().name}"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def _run(self) -> None:
        while True:
            status = await self._check()
            if not self.changes or self.changes[-1][1] != status:
                self.changes.append((time.monotonic(), status))
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> HealthWatch:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def seen(self, status: str, start: float, end: float = math.inf) -> float | None:
        """Seconds after `start` at which `status` was first in force within [start, end]: 0 if
        it already was at `start`; None if it never was."""
        in_force = [s for t, s in self.changes if t <= start][-1:]
        if in_force == [status]:
            return 0.0
        for t, s in self.changes:
            if start < t <= end and s == status:
                return t - start
        return None

    def timeline(self, origin: float) -> list[tuple[float, str]]:
        return [(round(t - origin, 2), s) for t, s in self.changes]

    async def wait_for(self, status: str, after: float, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (t := self.seen(status, after)) is not None:
                return t
            await asyncio.sleep(self.interval_s)
        return None


async def wave(
    svc: Service, sizes: Sizes, prefix: str, seed: int, stop: asyncio.Event
) -> list[Outcome]:
    """Searches (every other one streamed, ids `prefix-i`) from `sizes.concurrency` clients,
    each sending its next as soon as its last is answered, until `stop` is set."""
    problems = held_out(200, seed=seed)
    numbers = iter(range(1_000_000))

    async def client() -> list[Outcome]:
        out = []
        while not stop.is_set():
            i = next(numbers)
            kind = "stream" if i % 2 else "unary"
            request = search_request(problems[i % len(problems)], i, f"{prefix}-{i}")
            out.append(await send(kind)(svc.stub(i), request, sizes.call_timeout_s))
        return out

    clients = await asyncio.gather(*(client() for _ in range(sizes.concurrency)))
    return sorted((o for c in clients for o in c), key=lambda o: o.sent_at)


def by_window(outcomes: Sequence[Outcome], start: float, end: float) -> dict[str, dict[str, Any]]:
    """Outcomes of the calls sent before `start`, between `start` and `end`, and after."""
    windows: dict[str, list[Outcome]] = {"before": [], "during": [], "after": []}
    for o in outcomes:
        key = "before" if o.sent_at < start else "during" if o.sent_at <= end else "after"
        windows[key].append(o)
    return {
        key: {
            "completed": sum(o.code == OK for o in os_),
            "calls": len(os_),
            "failed": dict(Counter(o.code for o in os_ if o.code != OK)),
        }
        for key, os_ in windows.items()
    }


async def stored_states(svc: Service, search_ids: Sequence[str]) -> dict[str, int]:
    """What the store says now of these searches (by state, or the error code of asking)."""
    states: Counter[str] = Counter()
    for search_id in search_ids:
        try:
            status = await svc.stub(0).GetSearch(
                pb.GetSearchRequest(search_id=search_id), timeout=10
            )
            states[pb.SearchState.Name(status.state).removeprefix("SEARCH_STATE_")] += 1
        except grpc.aio.AioRpcError as e:
            states[e.code().name] += 1
    return dict(sorted(states.items()))


def failed_ids(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.search_id for o in outcomes if o.code != OK and o.search_id]


async def settled(
    svc: Service, search_ids: Sequence[str], since: float, timeout_s: float
) -> dict[str, Any]:
    """Wait (up to `timeout_s` after `since`) until none of these searches is queued or running
    in the store; their states then, and when that was (seconds after `since`)."""
    while True:
        states = await stored_states(svc, search_ids)
        open_ = states.get("RUNNING", 0) + states.get("QUEUED", 0)
        now = time.monotonic()
        if not open_ or now - since > timeout_s:
            return {"states": states, "after_s": now - since, "open": open_}
        await asyncio.sleep(1.0)


def fault_figures(
    outcomes: Sequence[Outcome], watch: HealthWatch, start: float, end: float
) -> dict[str, Any]:
    messages = sorted({o.message for o in outcomes if o.code != OK})
    failed = [o.sent_at - start for o in outcomes if o.code != OK]
    done = [o.sent_at + o.latency_s for o in outcomes if o.code == OK]
    first_ok = min((t for t in done if t > end), default=None)
    return {
        "first_success_after_s": None if first_ok is None else first_ok - end,
        "outcomes": summarize(outcomes),
        "by_window": by_window(outcomes, start, end),
        "failed_sent_s": [min(failed), max(failed)] if failed else None,
        "failure_messages": messages[:5],
        "unsafe_failure_messages": [m for m in messages if message_flaws(m)],
        "failed_ids": failed_ids(outcomes),
        "health_timeline": watch.timeline(start),
    }


async def redis_paused(svc: Service, sizes: Sizes) -> dict[str, Any]:
    """A wave of searches; `fault_after_s` in, Redis stopped (SIGSTOP) for `pause_s`; the wave
    goes on `tail_s` after SIGCONT."""
    stop = asyncio.Event()
    with HealthWatch(svc.health) as watch:
        running = asyncio.ensure_future(wave(svc, sizes, "redis-wave", 31, stop))
        await asyncio.sleep(sizes.fault_after_s)
        paused = time.monotonic()
        svc.redis.pause()
        try:
            await asyncio.sleep(sizes.pause_s)
        finally:
            svc.redis.resume()
        resumed = time.monotonic()
        await asyncio.sleep(sizes.tail_s)
        stop.set()
        outcomes = await running
        serving_after = await watch.wait_for("SERVING", resumed, timeout_s=15.0)
    await asyncio.sleep(1.0)  # anything the store still finishes
    return {
        "pause_s": resumed - paused,
        **fault_figures(outcomes, watch, paused, resumed),
        "stored_states_of_failed": await stored_states(svc, failed_ids(outcomes)),
        "resumed_at": resumed,
        "not_serving_during_pause_after_s": watch.seen("NOT_SERVING", paused, resumed),
        "serving_after_resume_s": serving_after,
    }


async def actor_back(handle: Any, old_pid: int, timeout_s: float = 120.0) -> float | None:
    """Seconds until the actor answers `info()` from a new process; None if it never does."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            async with asyncio.timeout(2.0):
                info = await handle.info.remote()
            if info["pid"] != old_pid:
                return time.monotonic() - started
        except Exception:  # dead, restarting, or too slow: ask again
            pass
        await asyncio.sleep(0.1)
    return None


async def policy_killed(svc: Service, sizes: Sizes) -> dict[str, Any]:
    """A wave of searches; `fault_after_s` in, the policy actor killed (Ray restarts it); the
    wave goes on `tail_s` after the actor answers again."""
    handle = svc.pool.policy_members[0].handle
    old_pid = (await handle.info.remote())["pid"]
    stop = asyncio.Event()
    with HealthWatch(svc.health) as watch:
        running = asyncio.ensure_future(wave(svc, sizes, "kill-wave", 41, stop))
        await asyncio.sleep(sizes.fault_after_s)
        killed = time.monotonic()
        svc.pool.crash(handle)
        back_s = await actor_back(handle, old_pid)
        back = killed + (back_s if back_s is not None else 0.0)
        await asyncio.sleep(sizes.tail_s)
        stop.set()
        outcomes = await running
        serving_after = await watch.wait_for("SERVING", back, 15.0)
    return {
        **fault_figures(outcomes, watch, killed, back),
        "stored_states_of_failed": await stored_states(svc, failed_ids(outcomes)),
        "actor_back_s": back_s,
        "not_serving_after_kill_s": watch.seen("NOT_SERVING", killed),
        "serving_after_back_s": serving_after,
    }


# -- the run -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch

    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


async def measure(sizes: Sizes, progress: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = time.monotonic()
    progress("starting Ray, the model actors, Redis and the server")
    async with service(sizes) as svc:
        out["startup_s"] = time.monotonic() - started
        progress(f"1/5 load: {sizes.unary} unary + {sizes.stream} streamed searches")
        out["load"] = await load_held(svc, sizes)
        progress("2/5 bad inputs, one at a time, while canaries run")
        out["bad_inputs"] = await bad_inputs_figure(svc, sizes)
        progress(f"3/5 {sizes.good} good searches and one bad one together")
        out["fifty_and_one"] = await fifty_and_one(svc, sizes)
        progress(f"4/5 Redis paused {sizes.pause_s:.0f} s mid-wave")
        out["redis_paused"] = await redis_paused(svc, sizes)
        progress("5/5 policy actor killed mid-wave")
        out["policy_killed"] = await policy_killed(svc, sizes)
        redis = out["redis_paused"]
        if redis["failed_ids"]:  # in the store, unfinished: resumed once their lease runs out?
            progress("waiting for the searches that failed during the Redis pause to settle")
            lease_s = svc.orchestrator.config.lease_s
            redis["settled"] = await settled(
                svc, redis["failed_ids"], redis["resumed_at"], lease_s + 30
            )
        progress("shutting down")
    out["total_s"] = time.monotonic() - started
    return out


# -- tables --------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _failed(failed: dict[str, int]) -> str:
    if not failed:
        return "0"
    return "[red]" + ", ".join(f"{code} {n}" for code, n in failed.items()) + "[/red]"


def _after(seconds: float | None, never: str) -> str:
    return f"yes, after {seconds:.2f} s" if seconds is not None else never


def load_table(load: dict[str, Any]) -> Table:
    table = Table(
        title=(
            f"1. Load held: {load['wall_s']:.1f} s, {load['searches_per_s']:.2f} searches/s "
            f"({load['concurrency']} in flight over {load['channels']} channels)"
        )
    )
    for column in ("kind", "calls", "completed", "failed (code n)", "p50", "p99", "max", "notes"):
        table.add_column(column)
    for kind, s in load["kinds"].items():
        notes = ""
        if kind == "stream":
            notes = f"{s['mean_events']:.1f} progress events each, first after {_ms(s['first_event_p50_s'])} (p50)"  # noqa: E501
        table.add_row(
            "Search" if kind == "unary" else "StreamSearch",
            str(s["calls"]),
            str(s["completed"]),
            _failed(s["failed"]),
            _ms(s["p50_s"]),
            _ms(s["p99_s"]),
            _ms(s["max_s"]),
            notes,
        )
    return table


def bad_table(figure: dict[str, Any]) -> Table:
    canaries = figure["canaries"]
    table = Table(
        title=(
            "2. Bad inputs tried, one at a time, and how each was answered "
            f"(while {canaries['calls']} good searches ran: {canaries['completed']} completed, "
            f"failed {_failed(canaries['failed'])})"
        ),
        show_lines=True,
    )
    for column in ("request", "code", "ms", "chars", "client-safe", "message"):
        table.add_column(column, overflow="fold")
    for row in figure["rows"]:
        code = row["code"]
        if not row["code_as_documented"]:
            code = f"[red]{code}[/red]\n(documented: {row['expected']})"
        safe = "yes" if row["safe"] else "[red]NO: " + "; ".join(row["flaws"]) + "[/red]"
        extra = [d for d in row["details"] if d != row["message"]]
        message = row["message"] + "".join(f"\n- {d}" for d in extra)
        message = escape(message) if row["safe"] else f"[red]{escape(message)}[/red]"
        table.add_row(
            row["name"], code, f"{row['ms']:.1f}", str(row["message_chars"]), safe, message
        )
    return table


def mix_lines(mix: dict[str, Any]) -> list[str]:
    g = mix["good"]
    ok = g["completed"] == g["calls"]
    verdict = "all succeeded" if ok else "[red]NOT all succeeded[/red]"
    bad_safe = "client-safe" if not mix["bad_flaws"] else f"[red]UNSAFE: {mix['bad_flaws']}[/red]"
    leaked = mix["good_answers_carrying_secret"]
    leak = "none" if not leaked else f"[red]{leaked}[/red]"
    return [
        f"2b. {g['calls']} good searches + 1 bad, sent together: {g['completed']}/{g['calls']} "
        f"good {verdict} (failed {_failed(g['failed'])}; p50 {_ms(g['p50_s'])}, "
        f"p99 {_ms(g['p99_s'])}); the bad one: {mix['bad_code']}, {bad_safe}: "
        f"{escape(mix['bad_message'])!r}; good answers carrying tenant B's text or id: {leak}",
    ]


def _windows(windows: dict[str, dict[str, Any]], during: str) -> str:
    lines = []
    for key, w in windows.items():
        name = during if key == "during" else key
        lines.append(
            f"sent {name}: {w['completed']}/{w['calls']} ok, failed {_failed(w['failed'])}"
        )
    return "\n".join(lines)


def fault_table(redis: dict[str, Any], kill: dict[str, Any]) -> Table:
    table = Table(
        title="3. Faults survived (a wave of searches, every other one streamed)", show_lines=True
    )
    for column in (
        "fault",
        "searches",
        "failed (code n)",
        "by when sent",
        "p50 / p99",
        "health",
        "recovery",
    ):
        table.add_column(column, overflow="fold")
    for name, f, during in (
        (
            f"Redis SIGSTOP for {redis['pause_s']:.1f} s mid-wave, then SIGCONT",
            redis,
            "during the pause",
        ),
        (
            "policy actor killed mid-wave (ray.kill, no_restart=False; max_restarts 4)",
            kill,
            "while it restarted",
        ),
    ):
        o = f["outcomes"]
        failed = _failed(o["failed"])
        if f["failed_sent_s"] is not None:
            first, last = f["failed_sent_s"]
            failed += f"\nsent {first:+.1f} s to {last:+.1f} s from the fault"
            failed += "".join(f"\n{escape(m)!r}" for m in f["failure_messages"])
            failed += f"\nthe store then said of them: {f['stored_states_of_failed']}"
            if "settled" in f:
                later = f["settled"]
                failed += f"\n{later['after_s']:.0f} s after SIGCONT: {later['states']}"
            if f["unsafe_failure_messages"]:
                failed += f"\n[red]UNSAFE: {escape(str(f['unsafe_failure_messages']))}[/red]"
        if f is redis:
            health = (
                "NOT_SERVING during the pause: "
                f"{_after(f['not_serving_during_pause_after_s'], '[red]no[/red]')}\n"
                f"SERVING after SIGCONT: {_after(f['serving_after_resume_s'], '[red]no[/red]')}"
            )
            recovery = f"first search done after SIGCONT: +{_ms(f['first_success_after_s'])}"
        else:
            health = (
                f"NOT_SERVING after the kill: {_after(f['not_serving_after_kill_s'], 'no')}\n"
                f"SERVING once back: {_after(f['serving_after_back_s'], '[red]no[/red]')}"
            )
            recovery = (
                f"actor answers info() from a new process after {_ms(f['actor_back_s'])}; "
                f"first search done after that: +{_ms(f['first_success_after_s'])}"
            )
        health += f"\ntimeline (s from the fault): {f['health_timeline']}"
        table.add_row(
            name,
            f"{o['completed']}/{o['calls']} ok",
            failed,
            _windows(f["by_window"], during),
            f"{_ms(o['p50_s'])} / {_ms(o['p99_s'])}",
            health,
            recovery,
        )
    return table


def report(console: Console, out: dict[str, Any]) -> None:
    console.print(load_table(out["load"]))
    for message in out["load"]["failure_messages"]:
        flaws = message_flaws(message)
        line = f"  load failure message: {escape(message)!r}"
        console.print(f"[red]{line} UNSAFE: {flaws}[/red]" if flaws else line)
    console.print(bad_table(out["bad_inputs"]))
    for line in mix_lines(out["fifty_and_one"]):
        console.print(line)
    console.print(fault_table(out["redis_paused"], out["policy_killed"]))
    unsafe = [r["name"] for r in out["bad_inputs"]["rows"] if not r["safe"]]
    miscoded = [r["name"] for r in out["bad_inputs"]["rows"] if not r["code_as_documented"]]
    if unsafe:
        console.print(f"[bold red]unsafe messages: {unsafe}[/bold red]")
    if miscoded:
        console.print(
            f"[bold red]answered with another code than documented: {miscoded}[/bold red]"
        )
    console.print(
        f"startup {out['startup_s']:.1f} s, whole run {out['total_s']:.0f} s; "
        f"server log: {out['log']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lodestar.evaluation.reliability",
        description="Reliability benchmark: load held, bad inputs answered, faults survived.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (about 40 s on 2 cores)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--log", type=Path, help="server log file (default: a temporary file)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    log_path = args.log or Path(tempfile.mkstemp(prefix="lodestar-reliability-", suffix=".log")[1])
    logging.basicConfig(
        filename=log_path,
        filemode="w",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets wide tables
    command = " ".join(
        [
            Path(sys.executable).name,
            "-m",
            "lodestar.evaluation.reliability",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    host = machine()
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    console.print(f"[bold]{command}[/bold]   ({now})")
    console.print(
        f"machine: {host['cores']} cores, {host['platform']}, Python {host['python']}, "
        f"torch threads {host['torch_threads']}, GPU {host['gpu'] or 'none'}"
    )
    console.print(f"sizes: {dataclasses.asdict(sizes)}")
    with console.status("reliability") as status:
        out = asyncio.run(measure(sizes, lambda text: status.update(f"reliability: {text}")))
    out |= {"command": command, "date": now, "machine": host, "sizes": dataclasses.asdict(sizes)}
    out["log"] = str(log_path)
    report(console, out)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))
        console.print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
