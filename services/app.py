"""`lodestar serve`: everything on one machine (or the front end of a cluster) in one process.

Start order matters for probes: the gRPC port opens NOT_SERVING first, then the model actors
load, then health turns SERVING; from then on the watchdog keeps readiness following the workers
and the state store (liveness: the workers only).
SIGINT/SIGTERM: health NOT_SERVING, new work refused, live searches finish their current step
within the grace period (`LodestarServer.stop`); unfinished jobs keep their checkpoints and
their leases are handed back (another server resumes them from Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lodestar.orchestrator.driver import Orchestrator, OrchestratorConfig
from lodestar.orchestrator.state_store import open_state_store
from lodestar.orchestrator.worker_pool import PoolConfig, RayWorkerPool
from lodestar.services.metrics import Metrics
from lodestar.services.server import LodestarServer, ServerConfig
from lodestar.services.watchdog import WatchConfig, watch_workers
from lodestar.workers.factory import build_intake
from lodestar.workers.intake import ProblemLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    store_url: str = "memory://"
    """memory:// (one process, nothing survives) or redis://host:port/db."""
    store_password: str | None = None
    """Redis password when the url has none (from LODESTAR_REDIS_PASSWORD, a Secret on k8s)."""
    ray_address: str = "local"
    """"local" starts a private Ray; "auto" or "ray://host:10001" joins a cluster."""
    connect_attempts: int = 5
    """Tries at joining a cluster before giving up (see `connect_ray`)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics at http://<metrics host>:<port>/metrics; None: off."""
    metrics_host: str | None = None
    """Where /metrics binds; None: the gRPC server's host (a server on loopback stays there)."""
    watch: WatchConfig = field(default_factory=WatchConfig)
    """How health follows the workers and the store once serving."""
    limits: ProblemLimits = field(default_factory=ProblemLimits)
    """What one problem may be; checked at submit against the served policy's tokenizer."""

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) the /metrics endpoint binds; None when metrics are off."""
        if self.metrics_port is None:
            return None
        host = self.metrics_host or self.server.address.rpartition(":")[0]
        return host.strip("[]"), self.metrics_port  # "[::1]:50051" binds "::1"


@contextlib.asynccontextmanager
async def runtime(config: ServeConfig) -> AsyncIterator[tuple[Orchestrator, RayWorkerPool]]:
    """Ray, the state store, the model actors and the orchestrator, torn down in reverse. The
    actors are still loading on entry (`await pool.ready()`); the orchestrator is not started."""
    import ray

    if not ray.is_initialized():
        await connect_ray(config.ray_address, config.connect_attempts)
    settings = {"password": config.store_password} if config.store_password else {}
    store = open_state_store(config.store_url, **settings)
    try:
        await store.ping()
        pool = RayWorkerPool(config.pool)  # the actors load while the intake loads here
        intake = await asyncio.to_thread(build_intake, config.pool.models, config.limits)
        orchestrator = Orchestrator(store, pool, config.orchestrator, intake=intake)
        try:
            yield orchestrator, pool
        finally:
            await orchestrator.close()
            pool.shutdown()
    finally:
        await store.close()
        ray.shutdown()


async def connect_ray(address: str, attempts: int, wait_s: float = 2.0) -> None:
    """`ray.init`, retried on a connection failure when joining a cluster: on Kubernetes the
    gateway starts beside the head, whose client server may not be up yet, and the head's Ray
    client proxier sometimes fails to start the per-connection server (seen here on about 1
    connection in 8, the child dying at fork; a new connection gets a new server)."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            return
        except ConnectionError as e:
            if address == "local" or attempt == attempts:
                raise
            log.warning("Ray at %s refused (%s); retry %d/%d", address, e, attempt, attempts - 1)
            ray.shutdown()
            await asyncio.sleep(wait_s * attempt)


async def serve(config: ServeConfig, announce: Callable[[str], None] = print) -> None:
    """Run until SIGINT/SIGTERM."""
    async with runtime(config) as (orchestrator, pool):
        stop = asyncio.Event()  # handlers after ray.init, which installs its own for SIGTERM
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        metrics = Metrics()
        metrics.watch(orchestrator)
        if config.metrics_address is not None:
            metrics_host, metrics_port = config.metrics_address
            metrics.serve(metrics_port, metrics_host)
        server = LodestarServer(orchestrator, config.server)
        watchdog = None
        try:
            port = await server.start()
            host = config.server.address.rpartition(":")[0]
            announce(f"lodestar: listening on {host}:{port} (NOT_SERVING while models load)")
            infos = await pool.ready()
            await orchestrator.start()
            await server.set_serving()
            watchdog = asyncio.create_task(
                watch_workers(
                    pool,
                    server,
                    config.watch,
                    metrics.record_worker_stats,
                    store=orchestrator.store,
                )
            )
            devices = ", ".join(sorted({i["device"] for i in infos}))
            announce(f"lodestar: SERVING on {host}:{port} with {len(infos)} worker(s) on {devices}")
            await stop.wait()
            announce("lodestar: shutting down")
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog  # gone before stop() sets health for the last time
            await server.stop()


async def run_batch(config: ServeConfig, run: Callable[[Any], Awaitable[int]]) -> int:
    """`run(stub)` against a SearchService in this process (no server, no port): the batch job
    that `ray job submit -- lodestar batch run ...` starts on a cluster."""
    from lodestar.services.local_stub import LocalStub
    from lodestar.services.server import SearchService

    async with runtime(config) as (orchestrator, pool):
        await pool.ready()
        await orchestrator.start()
        return await run(LocalStub(SearchService(orchestrator, config.server)))
