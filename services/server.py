"""The gRPC front door: `lodestar.v1.SearchService` over an `Orchestrator`, plus health,
reflection, optional bearer-token auth and optional TLS.

The servicer translates and nothing more: wire -> `JobSpec` (validation stays in the algorithm
registry), orchestrator errors -> status codes, records and events -> wire. A client that
cancels, or whose deadline passes, cancels its search (workers free its caches at the next step).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from lodestar.orchestrator.algorithms.registry import ParamError
from lodestar.orchestrator.driver import ItemsRefused, Orchestrator, Overloaded
from lodestar.orchestrator.errors import SearchError, client_message
from lodestar.orchestrator.state_store import (
    BatchExists,
    BatchNotFound,
    JobExists,
    JobNotFound,
    JobRecord,
    JobSpec,
    JobStatus,
    StateStoreUnavailable,
)
from lodestar.orchestrator.state_store.base import MAX_ID_CHARS, check_search_id
from lodestar.services.convert import (
    batch_to_wire,
    params_from_wire,
    problem_from_wire,
    progress_to_wire,
    result_to_wire,
    set_fields,
    status_to_wire,
)
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc
from lodestar.workers.messages import ErrorKind

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["SearchService"].full_name
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME)
"""Reachable without a token: probes and tooling must work on a locked-down server."""
RECONCILE_AFTER_S = 5.0
STOP_BOUND_S = 1.0
"""After a drain, how long calls still open get before `stop` cuts them (replies in flight)."""
"""A batch stream that has waited this long with nothing arriving recounts the batch."""
LIVENESS = "liveness"
"""Health name that is SERVING while the process answers, models loaded or not: a Kubernetes
liveness probe must not restart a server that is still loading its models (readiness, the
overall "" status, waits for them)."""


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:50051"
    max_message_bytes: int = 16 * 1024 * 1024
    auth_token: str | None = None
    """When set, every SearchService call needs `authorization: Bearer <token>`."""
    max_generated_tokens: int = 1_000_000
    """The most one search may generate; also the cap of a search that names none."""
    max_prm_passes: int = 100_000
    max_batch_items: int = 100_000
    max_queued_batch_items: int = 200_000
    """Most batch items unfinished (queued or running) over the whole store, all batches and
    servers together; a SubmitBatch that would pass it is RESOURCE_EXHAUSTED. The default holds
    two full batches; a queued item takes about 650 B of Redis plus its problem's text
    (docs/service.md, "Batch limits")."""
    policy_model: str = "arith-policy"
    """The names this deployment answers to; a request naming another model is refused."""
    reward_model: str = "verifier"
    grace_s: float = 5.0
    """On stop, how long live searches get to finish their current step (`Orchestrator.drain`);
    the server is gone within grace_s + STOP_BOUND_S + 2 * DRAIN_BOUND_S."""
    tls_cert: Path | None = None
    """PEM certificate chain; with `tls_key` the port speaks TLS only (plaintext is refused)."""
    tls_key: Path | None = None
    health_address: str | None = None
    """A second port serving grpc.health.v1 alone, in plaintext: Kubernetes' gRPC probes speak
    no TLS. None: no such port."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")

    @property
    def channel_options(self) -> list[tuple[str, int]]:
        """Message limits for both the server and its clients (gRPC's default is 4 MiB)."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


STATUS_OF_KIND = {
    ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
"""The status code of each error kind: the only place a failure becomes a code."""


MAX_VIOLATIONS = 1000
"""Most refused batch items listed in one error's details (the message counts them all)."""


def items_refused_status(error: ItemsRefused) -> grpc.Status:
    """INVALID_ARGUMENT with a `google.rpc.BadRequest` naming each refused item's field."""
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=field, description=client_message(message)
            )
            for field, message in error.violations[:MAX_VIOLATIONS]
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    status = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
        message=client_message(str(error)),
        details=[detail],
    )
    return rpc_status.to_status(status)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Every message leaves through here: short, one line, nothing of the machine in it."""
    await context.abort(code, client_message(message))


@contextlib.asynccontextmanager
async def status_codes(context: grpc.aio.ServicerContext, what: str) -> AsyncIterator[None]:
    """Every failure of a handler leaves as the status code that fits; none crashes the server."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except grpc.aio.AbortError:
        raise
    except _Refused as e:
        await _abort(context, e.code, str(e))
    except ItemsRefused as e:  # every bad item, as google.rpc.BadRequest details
        await context.abort_with_status(items_refused_status(e))
    except ParamError as e:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Overloaded as e:
        await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except (JobExists, BatchExists) as e:
        await _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(e))
    except (JobNotFound, BatchNotFound) as e:
        await _abort(context, grpc.StatusCode.NOT_FOUND, str(e))
    except StateStoreUnavailable:
        log.warning("%s: state store unavailable", what, exc_info=True)
        await _abort(context, grpc.StatusCode.UNAVAILABLE, "the state store is unavailable")
    except SearchError as e:
        await _abort(context, STATUS_OF_KIND[e.kind], e.message)
    except Exception:
        log.exception("%s failed", what)
        await _abort(context, grpc.StatusCode.INTERNAL, f"{what} failed on the server")


class SearchService(pb_grpc.SearchServiceServicer):
    def __init__(self, orchestrator: Orchestrator, config: ServerConfig) -> None:
        self.orchestrator = orchestrator
        self.store = orchestrator.store
        self.config = config

    # -- searches --------------------------------------------------------------------------------

    async def Search(self, request: pb.SearchRequest, context: Any) -> pb.SearchResult:
        async with status_codes(context, "Search"):
            spec = self._spec(request)
            await self.orchestrator.submit(spec, context.time_remaining())
            with self._cancel_on_disconnect(spec.search_id):
                record = await self.orchestrator.wait(spec.search_id)
            return self._final(record)

    async def StreamSearch(
        self, request: pb.SearchRequest, context: Any
    ) -> AsyncIterator[pb.SearchEvent]:
        async with status_codes(context, "StreamSearch"):
            spec = self._spec(request)
            await self.orchestrator.submit(spec, context.time_remaining())
            with self._cancel_on_disconnect(spec.search_id):
                async for event in self.store.follow(spec.search_id, wait_s=1.0):
                    if event.terminal:
                        break
                    yield progress_to_wire(spec.search_id, json.loads(event.data))
                record = await self.orchestrator.wait(spec.search_id)
            yield pb.SearchEvent(search_id=spec.search_id, result=self._final(record))

    async def GetSearch(self, request: pb.GetSearchRequest, context: Any) -> pb.SearchStatus:
        async with status_codes(context, "GetSearch"):
            return status_to_wire(await self._record(request.search_id))

    async def CancelSearch(self, request: pb.CancelSearchRequest, context: Any) -> pb.SearchStatus:
        async with status_codes(context, "CancelSearch"):
            await self._record(request.search_id)  # NOT_FOUND before flagging anything
            return status_to_wire(await self.orchestrator.cancel(request.search_id))

    # -- batches -------------------------------------------------------------------------------

    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context: Any) -> pb.BatchStatus:
        async with status_codes(context, "SubmitBatch"):
            batch_id, settings, specs = self._batch(request)
            await self._admit_batch(len(specs))
            record = await self.orchestrator.submit_batch(batch_id, settings, specs)
            return batch_to_wire(record)

    async def GetBatch(self, request: pb.GetBatchRequest, context: Any) -> pb.BatchStatus:
        async with status_codes(context, "GetBatch"):
            record = await self.store.get_batch(_checked_id(request.batch_id, "batch_id"))
            if record is None:
                raise BatchNotFound(request.batch_id)
            return batch_to_wire(record)

    async def CancelBatch(self, request: pb.CancelBatchRequest, context: Any) -> pb.BatchStatus:
        async with status_codes(context, "CancelBatch"):
            batch_id = _checked_id(request.batch_id, "batch_id")
            return batch_to_wire(await self.orchestrator.cancel_batch(batch_id))

    async def StreamBatchResults(
        self, request: pb.StreamBatchResultsRequest, context: Any
    ) -> AsyncIterator[pb.BatchItemResult]:
        async with status_codes(context, "StreamBatchResults"):
            batch_id = _checked_id(request.batch_id, "batch_id")
            batch = await self.store.get_batch(batch_id)
            if batch is None:
                raise BatchNotFound(batch_id)
            if request.after < 0:
                raise ParamError("after", "must be >= 0")
            keys = batch.settings.get("keys", [])
            after = request.after
            # A server killed between finishing a job and counting it in its batch leaves the
            # item uncounted for good; while the stream waits with nothing arriving, recount
            # from the jobs now and then (backing off: it reads every pending job).
            quiet_for, quiet_since = RECONCILE_AFTER_S, time.monotonic()
            while not (batch.done and after >= batch.finished):
                results = await self.store.read_batch_results(batch_id, after, wait_s=1.0)
                for item in results:
                    job = await self._record(item.search_id)
                    key = keys[item.index] if item.index < len(keys) else ""
                    yield pb.BatchItemResult(
                        offset=item.offset, index=item.index, key=key, status=status_to_wire(job)
                    )
                    after = item.offset
                if results:
                    quiet_for, quiet_since = RECONCILE_AFTER_S, time.monotonic()
                elif time.monotonic() - quiet_since >= quiet_for:
                    batch = await self.store.reconcile_batch(batch_id)
                    quiet_for, quiet_since = min(2 * quiet_for, 60.0), time.monotonic()
                else:
                    batch = await self.store.get_batch(batch_id) or batch

    # -- helpers ---------------------------------------------------------------------------------

    def _batch(self, request: pb.SubmitBatchRequest) -> tuple[str, dict[str, Any], list[JobSpec]]:
        """The batch a request asks for; the orchestrator validates every item before storing."""
        if not request.items:
            raise ParamError("items", "must not be empty")
        if len(request.items) > self.config.max_batch_items:
            raise ParamError("items", f"at most {self.config.max_batch_items} per batch")
        batch_id = request.batch_id or f"b-{uuid.uuid4().hex}"
        if len(batch_id) > 100:
            raise ParamError("batch_id", "at most 100 characters")
        _checked_id(batch_id, "batch_id")
        algorithm, params = params_from_wire(request.params)
        budget = self._budget(set_fields(request.budget))
        specs = []
        for i, item in enumerate(request.items):
            try:
                problem = problem_from_wire(item.problem)
            except ParamError as e:
                raise ParamError(f"items[{i}].{e.field}", e.message) from None
            seed = item.seed if item.HasField("seed") else request.seed + i
            search_id = f"{batch_id}.{i:06d}"
            specs.append(JobSpec(search_id, algorithm, params, problem, seed, budget, batch_id, i))
        settings = {
            "algorithm": algorithm,
            "params": params,
            "budget": budget,
            "seed": request.seed,
            "keys": [item.key for item in request.items],
        }
        return batch_id, settings, specs

    def _spec(self, request: pb.SearchRequest) -> JobSpec:
        """The job a request asks for; the orchestrator validates the rest before storing it."""
        c = self.config
        if request.policy_model and request.policy_model != c.policy_model:
            raise ParamError("policy_model", f"this server serves {c.policy_model!r}")
        if request.reward_model and request.reward_model != c.reward_model:
            raise ParamError("reward_model", f"this server serves {c.reward_model!r}")
        search_id = request.search_id or f"s-{uuid.uuid4().hex}"
        _checked_id(search_id, "search_id")
        problem = problem_from_wire(request.problem)
        algorithm, params = params_from_wire(request.params)
        budget = self._budget(set_fields(request.budget))
        return JobSpec(search_id, algorithm, params, problem, request.seed, budget)

    async def _admit_batch(self, size: int) -> None:
        """RESOURCE_EXHAUSTED when `size` more items would pass `max_queued_batch_items`: the
        store holds every queued item as a job, and orchestrators start them only as slots free,
        so the queue, not the workers, is what a flood of batches fills."""
        limit = self.config.max_queued_batch_items
        queued = await self.store.open_batch_items()
        if queued + size > limit:
            message = (
                f"items: {queued} batch items are queued or running on this service, the most "
                f"is {limit}; retry this batch of {size} later or split it"
            )
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _budget(self, asked: dict[str, int]) -> dict[str, int]:
        caps = {
            "max_generated_tokens": self.config.max_generated_tokens,
            "max_prm_passes": self.config.max_prm_passes,
        }
        for key, value in asked.items():
            if value > caps[key]:
                raise ParamError(f"budget.{key}", f"at most {caps[key]} on this server")
        return {**caps, **asked}

    async def _record(self, search_id: str) -> JobRecord:
        _checked_id(search_id, "search_id")
        record = await self.store.get_job(search_id)
        if record is None:
            raise JobNotFound(search_id)
        return record

    def _final(self, record: JobRecord) -> pb.SearchResult:
        """The result of a finished search, or its failure as the status its kind maps to."""
        if record.status is JobStatus.SUCCEEDED and record.result is not None:
            return result_to_wire(record.result, record)
        if record.status is JobStatus.CANCELLED:
            if record.error_kind is ErrorKind.DEADLINE_EXCEEDED:
                message = f"search {record.search_id} ran past its deadline"
                raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, message)
            raise _Refused(grpc.StatusCode.CANCELLED, f"search {record.search_id} was cancelled")
        kind = record.error_kind or ErrorKind.INTERNAL
        message = f"search {record.search_id} failed: {record.error or kind.value}"
        raise _Refused(STATUS_OF_KIND[kind], message)

    @contextlib.contextmanager
    def _cancel_on_disconnect(self, search_id: str) -> Iterator[None]:
        """A client that goes away (cancel, deadline) takes its search with it."""
        try:
            yield
        except asyncio.CancelledError:
            if self.orchestrator.draining:  # the server is going, not the client: resumable
                raise
            log.info(
                "search %s: client gone, cancelling", search_id, extra={"search_id": search_id}
            )
            task = asyncio.ensure_future(self.orchestrator.cancel(search_id))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise


def _checked_id(value: str, field: str) -> str:
    """A search or batch id as the store takes it; a malformed one is the client's error."""
    if not value:
        raise ParamError(field, "must not be empty")
    try:
        return check_search_id(value)
    except ValueError:
        raise ParamError(field, f"must be 1-{MAX_ID_CHARS} of A-Z a-z 0-9 . _ : -") from None


class BearerAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for SearchService calls without the token; health and reflection open."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        return _refusal(handler)


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message of its type."""


UNDECODABLE_MESSAGE = "request: not a valid message of this RPC's type (strings must be UTF-8)"


class DecodeRequests(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT for a request that does not decode (e.g. a string that is not UTF-8),
    where grpc would answer UNKNOWN with its own text."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def deserializer(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception:
                return _Undecodable()

        codec = dict(
            request_deserializer=deserializer, response_serializer=handler.response_serializer
        )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, **codec)
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **codec)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    codec = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **codec)
    return grpc.unary_unary_rpc_method_handler(unary, **codec)


class LodestarServer:
    """The grpc.aio server: NOT_SERVING until `set_serving()` (workers ready), then SERVING while
    the watchdog (services/watchdog.py) sees the workers and the state store answer."""

    def __init__(self, orchestrator: Orchestrator, config: ServerConfig | None = None) -> None:
        self.config = config = config or ServerConfig()
        interceptors: list[grpc.aio.ServerInterceptor] = [DecodeRequests()]
        if config.auth_token:
            interceptors.insert(0, BearerAuth(config.auth_token))
        self.server = grpc.aio.server(interceptors=interceptors, options=config.channel_options)
        self.service = SearchService(orchestrator, config)
        pb_grpc.add_SearchServiceServicer_to_server(self.service, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, *OPEN_SERVICES), self.server)
        self.port: int | None = None
        self.health_server: grpc.aio.Server | None = None
        """The plaintext health-only server on `health_address` (same statuses as the main one)."""
        self.health_port: int | None = None
        if config.health_address:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)

    async def start(self) -> int:
        """Bind and start; returns the port (useful with an address ending in :0)."""
        c = self.config
        if c.tls_cert is not None and c.tls_key is not None:
            pair = (c.tls_key.read_bytes(), c.tls_cert.read_bytes())
            credentials = grpc.ssl_server_credentials([pair])
            self.port = self.server.add_secure_port(c.address, credentials)
        else:
            self.port = self.server.add_insecure_port(c.address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {c.address}")
        if self.health_server is not None and c.health_address:
            self.health_port = self.health_server.add_insecure_port(c.health_address)
            if self.health_port == 0:
                raise RuntimeError(f"could not bind {c.health_address}")
        await self.set_serving(False)
        await self.set_live(True)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        return self.port

    async def set_serving(self, serving: bool = True) -> None:
        """Readiness: SERVING routes traffic here (the workers answer)."""
        S = health_pb2.HealthCheckResponse
        for name in ("", SERVICE):
            await self.health.set(name, S.SERVING if serving else S.NOT_SERVING)

    async def set_live(self, live: bool) -> None:
        """Liveness: NOT_SERVING asks Kubernetes to restart this process."""
        S = health_pb2.HealthCheckResponse
        await self.health.set(LIVENESS, S.SERVING if live else S.NOT_SERVING)

    async def stop(self) -> None:
        """Shut down without losing work: readiness NOT_SERVING and new searches and batches
        refused (UNAVAILABLE) at once; live searches stop after their current step, checkpointed
        and handed back for another server to resume (`Orchestrator.drain`, at most `grace_s`
        for a step), their callers answered UNAVAILABLE; then the calls still open (streams,
        searches followed from elsewhere) get STOP_BOUND_S before they are cut."""
        await self.set_serving(False)
        await self.service.orchestrator.drain(self.config.grace_s)
        await self.set_live(False)
        await self.server.stop(STOP_BOUND_S)
        if self.health_server is not None:  # probes see NOT_SERVING through the grace period
            await self.health_server.stop(None)
