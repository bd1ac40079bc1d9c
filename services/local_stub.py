"""A SearchService stub that calls a servicer in this process: `lodestar batch run` (a Ray job
on the cluster, no gRPC hop) drives the same service code as a remote client does.

Calls take `(request, metadata=None)` like a channel's stub; a refusal raises the same
`grpc.aio.AioRpcError` a channel would, so callers handle both the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from lodestar.services.server import SearchService


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        empty = grpc.aio.Metadata()
        raise grpc.aio.AioRpcError(code, empty, empty, details=details)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        trailing = grpc.aio.Metadata(*status.trailing_metadata)
        raise grpc.aio.AioRpcError(
            status.code, grpc.aio.Metadata(), trailing, details=status.details
        )

    def time_remaining(self) -> float | None:
        return None


class LocalStub:
    def __init__(self, service: SearchService) -> None:
        self._service = service

    def __getattr__(self, method: str) -> Any:
        handler = getattr(self._service, method)

        def call(request: Any, metadata: Any = None) -> Any:
            return handler(request, _Context())

        return call


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]
