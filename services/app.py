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
import dataclasses
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console

from lodestar.services.client import BatchFileJob, run_batch_file
from lodestar.services.metrics import Metrics
from lodestar.services.runtime import Runtime, RuntimeConfig, open_runtime
from lodestar.services.server import LodestarServer, ServerConfig
from lodestar.services.watchdog import WatchConfig, watch_workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    metrics_port: int | None = None
    """Serve Prometheus metrics at http://<metrics host>:<port>/metrics; None: off."""
    metrics_host: str | None = None
    """Where /metrics binds; None: the gRPC server's host (a server on loopback stays there)."""
    watch: WatchConfig = field(default_factory=WatchConfig)
    """How health follows the workers and the store once serving."""

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) the /metrics endpoint binds; None when metrics are off."""
        if self.metrics_port is None:
            return None
        host = self.metrics_host or self.server.address.rpartition(":")[0]
        return host.strip("[]"), self.metrics_port  # "[::1]:50051" binds "::1"


async def serve(config: ServeConfig, announce: Callable[[str], None] = print) -> None:
    """Run until SIGINT/SIGTERM."""
    if config.runtime.ray_address.startswith("ray://"):
        log.warning(
            "--ray-address %s is Ray Client, which is not for serving (a dropped connection "
            "loses this gateway's work): run the gateway as a Ray node (ray start "
            "--address=<head>:6379 --num-cpus=0) and use --ray-address auto",
            config.runtime.ray_address,
        )
    async with open_runtime(config.runtime) as runtime:
        orchestrator = runtime.orchestrator
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
            infos = await runtime.start()
            await server.set_serving()
            watchdog = asyncio.create_task(
                watch_workers(
                    runtime.workers,
                    server,
                    config.watch,
                    metrics.record_worker_stats,
                    store=orchestrator.store,
                )
            )
            if runtime.keeper is not None:
                for line in fleet_lines(runtime, orchestrator.owner):
                    announce(line)
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


def fleet_lines(runtime: Runtime, owner: str) -> list[str]:
    """Which fleet this gateway uses (as which orchestrator) and who keeps it, then each actor
    as namespace/name and Ray id: short lines, which the console does not wrap."""
    from lodestar.orchestrator.worker_pool import RayWorkerPool, fleet_namespace

    pool = runtime.workers
    assert isinstance(pool, RayWorkerPool) and runtime.keeper is not None
    fleet = runtime.keeper.fleet
    keeper = "this gateway" if runtime.keeper.held else "another gateway"
    actors = [
        f"lodestar: fleet actor {fleet_namespace(fleet)}/{m.name} {m.handle._actor_id.hex()}"
        for m in pool.members
    ]
    return [f"lodestar: fleet {fleet} as {owner} (kept by {keeper})", *actors]


async def run_batch(config: ServeConfig, job: BatchFileJob, console: Console) -> int:
    """`lodestar batch run` (the batch as a Ray job: `ray job submit -- lodestar batch run ...`):
    the runtime and a server on a free loopback port of this process, driven as any client
    drives one, so the batch takes exactly the service's path."""
    server_config = dataclasses.replace(
        config.server, address="127.0.0.1:0", auth_token=None, tls_cert=None, tls_key=None
    )
    async with open_runtime(config.runtime) as runtime:
        server = LodestarServer(runtime.orchestrator, server_config)
        port = await server.start()
        try:
            await runtime.start()
            await server.set_serving()
            return await run_batch_file(f"127.0.0.1:{port}", None, job, console)
        finally:
            await server.stop()
