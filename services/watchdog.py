"""Keeps a running server's health honest about its model workers.

Start-up turns health SERVING once the actors have loaded; after that the actors can still die
for good (restarts used up, node gone) or the gateway can lose its Ray client connection. The
watchdog asks every actor for `info()` (answered on its own actor thread, never queued behind
model calls) and, while any does not answer in time, keeps readiness NOT_SERVING so traffic goes
to other replicas; after `dead_after_s` of that it turns liveness NOT_SERVING too, so Kubernetes
restarts the gateway, which reconnects and starts fresh actors. Both recover when the workers
answer again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from lodestar.orchestrator.driver import being_cancelled

log = logging.getLogger(__name__)


class Probed(Protocol):
    async def ready(self) -> list[dict[str, Any]]: ...


class HealthSink(Protocol):
    async def set_serving(self, serving: bool = True) -> None: ...
    async def set_live(self, live: bool) -> None: ...


@dataclass(frozen=True)
class WatchConfig:
    interval_s: float = 10.0
    timeout_s: float = 10.0
    """Longest wait for every actor's `info()`; a restarting actor (reloading its models) and a
    lost Ray client connection both show up as this timeout."""
    dead_after_s: float = 120.0
    """Workers unreachable this long: liveness NOT_SERVING (the container gets restarted)."""

    def __post_init__(self) -> None:
        if min(self.interval_s, self.timeout_s) <= 0 or self.dead_after_s < 0:
            raise ValueError("need interval_s > 0, timeout_s > 0 and dead_after_s >= 0")


async def watch_workers(
    pool: Probed,
    health: HealthSink,
    config: WatchConfig,
    on_info: Callable[[list[dict[str, Any]]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run until cancelled (cancel it before the server's own shutdown sets health). `on_info`
    gets every successful round's infos (the metrics scrape the workers' counters from them)."""
    down_since: float | None = None
    dead = False
    while True:
        try:
            async with asyncio.timeout(config.timeout_s):
                infos = await pool.ready()
        except Exception as e:  # any failure to answer is "not answering"
            if being_cancelled():  # a cancel racing the timeout can arrive as TimeoutError
                raise asyncio.CancelledError from e
            now = clock()
            if down_since is None:
                down_since = now
                log.warning("workers not answering (%s): readiness NOT_SERVING", _reason(e))
                await health.set_serving(False)
            if not dead and now - down_since >= config.dead_after_s:
                dead = True
                log.error("workers unreachable for %.0f s: liveness NOT_SERVING", now - down_since)
                await health.set_live(False)
        else:
            if down_since is not None:
                log.warning("workers answer again after %.0f s: SERVING", clock() - down_since)
                await health.set_serving(True)
                if dead:
                    await health.set_live(True)
                down_since, dead = None, False
            if on_info is not None:
                on_info(infos)
        await sleep(config.interval_s)


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
