"""Keeps a running server's health honest about its model workers and its state store.

Start-up turns health SERVING once the actors have loaded; after that the actors can still die
for good (restarts used up, node gone) or the gateway can lose its Ray client connection. The
watchdog asks every actor for `info()` (answered on its own actor thread, never queued behind
model calls) and, while any does not answer in time, keeps readiness NOT_SERVING so traffic goes
to other replicas; after `dead_after_s` of that it turns liveness NOT_SERVING too, so Kubernetes
restarts the gateway, which reconnects and starts fresh actors (with a fleet: finds the fleet's
actors by name again). Both recover when the workers answer again.

The same round pings the state store: while it does not answer in time readiness is NOT_SERVING
too (every search needs it), but liveness never follows it, since restarting the gateway does not
bring Redis back. Readiness is SERVING exactly when the workers and the store both answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from lodestar.orchestrator.driver import being_cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")


class Probed(Protocol):
    async def ready(self) -> list[dict[str, Any]]: ...


class Pinged(Protocol):
    async def ping(self) -> None: ...


class HealthSink(Protocol):
    async def set_serving(self, serving: bool = True) -> None: ...
    async def set_live(self, live: bool) -> None: ...


@dataclass(frozen=True)
class WatchConfig:
    interval_s: float = 10.0
    timeout_s: float = 10.0
    """Longest wait for every actor's `info()`, and for the store's ping; a restarting actor
    (reloading its models) and a lost Ray client connection both show up as this timeout."""
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
    store: Pinged | None = None,
) -> None:
    """Run until cancelled (cancel it before the server's own shutdown sets health). `on_info`
    gets every successful round's infos (the metrics scrape the workers' counters from them).
    With `store`, readiness also needs `store.ping()` to answer within `timeout_s`."""
    down_since: float | None = None
    """When the workers stopped answering; None while they answer."""
    store_down = False
    serving, live = True, True
    while True:
        infos, failure = await _ask(pool.ready(), config.timeout_s)
        now = clock()
        if failure is None:
            if down_since is not None:
                log.warning("workers answer again after %.0f s", now - down_since)
            down_since = None
            if on_info is not None:
                on_info(infos)
        elif down_since is None:
            down_since = now
            log.warning("workers not answering (%s)", _reason(failure))
        if store is not None:
            _, failure = await _ask(store.ping(), config.timeout_s)
            if (failure is not None) != store_down:
                store_down = failure is not None
                if failure is not None:
                    log.warning("state store not answering (%s)", _reason(failure))
                else:
                    log.warning("state store answers again")
        if serving != (ready := down_since is None and not store_down):
            serving = ready
            log.warning("readiness %s", "SERVING" if ready else "NOT_SERVING")
            await health.set_serving(ready)
        down_for = 0.0 if down_since is None else now - down_since
        dead = down_since is not None and down_for >= config.dead_after_s
        if live == dead:
            live = not dead
            if dead:
                log.error("workers unreachable for %.0f s: liveness NOT_SERVING", down_for)
            else:
                log.warning("workers answer again: liveness SERVING")
            await health.set_live(live)
        await sleep(config.interval_s)


async def _ask(call: Awaitable[T], timeout_s: float) -> tuple[T | None, Exception | None]:
    """(answer, None), or (None, why not) when `call` fails or takes longer than `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await call, None
    except Exception as e:  # any failure to answer is "not answering"
        if being_cancelled():  # a cancel racing the timeout can arrive as TimeoutError
            raise asyncio.CancelledError from e
        return None, e


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
