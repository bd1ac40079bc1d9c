"""The watchdog's decisions with a scripted pool and store (pure logic); the same paths with real
Ray actors, a real redis-server, a real server and a real gRPC health client are in
test_distributed.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lodestar.orchestrator.state_store import StateStoreUnavailable
from lodestar.services.watchdog import WatchConfig, watch_workers

CONFIG = WatchConfig(interval_s=10.0, timeout_s=0.05, dead_after_s=25.0)


class ScriptedPool:
    """`ready()` answers, raises or hangs as scripted, one entry per round; then the watchdog is
    cancelled (the way `serve` stops it)."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.rounds = 0

    async def ready(self) -> list[dict[str, Any]]:
        if not self.script:
            raise asyncio.CancelledError
        self.rounds += 1
        outcome = self.script.pop(0)
        if outcome == "hang":
            await asyncio.sleep(60)
        if outcome == "error":
            raise ConnectionError("Ray client disconnected")
        return [{"pid": self.rounds}]


class ScriptedStore:
    """`ping()` answers, raises or hangs as scripted, one entry per round."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)

    async def ping(self) -> None:
        outcome = self.script.pop(0)
        if outcome == "hang":
            await asyncio.sleep(60)
        if outcome == "down":
            raise StateStoreUnavailable("ping: Connection refused")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, float]] = []
        self.now = 0.0

    async def set_serving(self, serving: bool = True) -> None:
        self.calls.append(("ready", serving, self.now))

    async def set_live(self, live: bool) -> None:
        self.calls.append(("live", live, self.now))

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def watch(
    script: list[str], store_script: list[str] | None = None
) -> tuple[Recorder, list[list[dict[str, Any]]]]:
    health, infos = Recorder(), []
    pool = ScriptedPool(script)
    store = None if store_script is None else ScriptedStore(store_script)
    clock = lambda: health.now  # noqa: E731
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(
            watch_workers(pool, health, CONFIG, infos.append, clock, health.sleep, store=store)
        )
    assert pool.rounds == len(script)
    assert store is None or store.script == [], "every scripted ping was asked"
    return health, infos


def test_healthy_workers_change_nothing_and_feed_the_metrics() -> None:
    health, infos = watch(["ok", "ok", "ok"])
    assert health.calls == []
    assert infos == [[{"pid": 1}], [{"pid": 2}], [{"pid": 3}]]


def test_a_short_outage_drops_readiness_only_and_recovery_restores_it() -> None:
    health, infos = watch(["ok", "error", "hang", "ok"])
    assert health.calls == [("ready", False, 10.0), ("ready", True, 30.0)]
    assert len(infos) == 2


def test_a_long_outage_also_drops_liveness_once_and_recovery_restores_both() -> None:
    # down from t=10; t=20 is 10 s, t=30 is 20 s, t=40 is 30 s >= dead_after_s (25 s)
    health, _ = watch(["ok", "hang", "error", "hang", "error", "hang", "ok", "ok"])
    assert health.calls == [
        ("ready", False, 10.0),
        ("live", False, 40.0),
        ("ready", True, 60.0),
        ("live", True, 60.0),
    ]


def test_a_store_outage_drops_readiness_however_long_and_never_liveness() -> None:
    # store down from t=10 to t=40: 30 s, past dead_after_s (25 s), which is the workers' alone
    health, infos = watch(["ok"] * 6, store_script=["ok", "down", "hang", "down", "hang", "ok"])
    assert health.calls == [("ready", False, 10.0), ("ready", True, 50.0)]
    assert len(infos) == 6  # the workers answered throughout: their metrics keep coming


def test_readiness_needs_the_workers_and_the_store_both_answering() -> None:
    # workers down at t=10; back at t=20 while the store is down; both answer at t=30
    health, _ = watch(["ok", "error", "ok", "ok"], store_script=["ok", "ok", "down", "ok"])
    assert health.calls == [("ready", False, 10.0), ("ready", True, 30.0)]


def test_a_cancel_while_probing_stops_the_watchdog_without_touching_health() -> None:
    async def main() -> Recorder:
        health = Recorder()
        task = asyncio.create_task(watch_workers(ScriptedPool(["hang"]), health, CONFIG))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return health

    assert asyncio.run(main()).calls == []


def test_bad_settings_are_refused() -> None:
    for bad in ({"interval_s": 0}, {"timeout_s": -1}, {"dead_after_s": -1}):
        with pytest.raises(ValueError):
            WatchConfig(**bad)
