"""Every state-store contract test runs on both backends: the memory one and a real Redis.

A test takes the `backend` fixture (tests/conftest.py) and calls `backend.run(body)` with an async
body that receives an open store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lodestar.orchestrator.state_store import StateStore

Body = Callable[[StateStore], Awaitable[None]]


@dataclass
class Backend:
    name: str
    open: Callable[..., StateStore]

    def run(self, body: Body, **settings: Any) -> None:
        async def main() -> None:
            async with self.open(**settings) as store:
                await body(store)

        asyncio.run(main())
