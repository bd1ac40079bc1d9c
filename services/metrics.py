"""Prometheus metrics of a Lodestar server (prometheus_client: the exposition format, histograms
and the scrape endpoint are its job, not ours).

Rates are PromQL's job: tokens/s is `rate(lodestar_generated_tokens_total[1m])`; the cache hit
rate is hits / (hits + misses) over `rate(lodestar_kv_cache_{hits,misses}_total[5m])`.
Metrics live in their own registry so several servers can share a process (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from lodestar.orchestrator.driver import Orchestrator
from lodestar.orchestrator.state_store import JobStatus

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Implements the orchestrator's `SearchObserver`; `watch` wires in the rest."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.finished = Counter(
            "lodestar_searches_finished", "Searches finished, by final state", ["state"], registry=r
        )
        self.live = Gauge("lodestar_searches_live", "Searches advancing now", registry=r)
        self.accepted = Gauge(
            "lodestar_searches_accepted",
            "Searches accepted and unfinished (live + queued)",
            registry=r,
        )
        self.step_seconds = Histogram(
            "lodestar_step_seconds",
            "Wall time of one algorithm step",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lodestar_worker_batch_size",
            "Requests per worker call (merged across searches)",
            ["role"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "lodestar_generated_tokens", "Policy tokens generated", registry=r
        )
        self.prm_passes = Counter("lodestar_prm_passes", "Partial solutions scored", registry=r)
        self.cache_hits = Counter(
            "lodestar_kv_cache_hits", "Worker KV-cache lookups that hit", ["role"], registry=r
        )
        self.cache_misses = Counter(
            "lodestar_kv_cache_misses", "Worker KV-cache lookups that missed", ["role"], registry=r
        )
        self._seen: dict[tuple[int, str], tuple[int, int]] = {}

    # -- SearchObserver ------------------------------------------------------------------------

    def step(self, seconds: float, spent: Mapping[str, int]) -> None:
        self.step_seconds.observe(seconds)
        self.generated_tokens.inc(spent.get("generated_tokens", 0))
        self.prm_passes.inc(spent.get("prm_passes", 0))

    def search_finished(self, status: JobStatus) -> None:
        self.finished.labels(state=str(status)).inc()

    # -- wiring --------------------------------------------------------------------------------

    def watch(self, orchestrator: Orchestrator) -> None:
        """Observe the orchestrator's steps, its load and its workers' batches."""
        orchestrator.observer = self
        self.live.set_function(lambda: orchestrator.live)
        self.accepted.set_function(lambda: orchestrator.accepted)
        for role, batchers in orchestrator.workers.batchers().items():
            histogram = self.batch_size.labels(role=role)
            for batcher in batchers:
                batcher.on_batch = histogram.observe

    def record_worker_stats(self, infos: list[dict[str, Any]]) -> None:
        """Turn the workers' cumulative cache counters (from `info()`) into counter increments;
        a restarted worker's counters start again from zero."""
        for info in infos:
            for role, stats in info.get("stats", {}).items():
                if "hits" not in stats:
                    continue
                key = (info["pid"], role)
                hits0, misses0 = self._seen.get(key, (0, 0))
                self.cache_hits.labels(role=role).inc(max(0, stats["hits"] - hits0))
                self.cache_misses.labels(role=role).inc(max(0, stats["misses"] - misses0))
                self._seen[key] = (stats["hits"], stats["misses"])

    def serve(self, port: int, host: str) -> Any:
        """The /metrics endpoint on `host` only, on its own thread; returns the HTTP server
        (`shutdown()` stops it)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server

    def text(self) -> str:
        return generate_latest(self.registry).decode()
